"""The audit log: one row per state-changing request (who, what, which object, when, from where, the result),
written before the response leaves, so a client that got an answer finds its row."""

import logging
from datetime import timedelta

import anyio
from sqlalchemy import delete

from core.logs import request_id_var
from storage.models import AuditEvent, utcnow

log = logging.getLogger("rebasin.audit")
AUDITED_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def _object_id(scope, headers: list) -> str | None:
    params = scope.get("path_params") or {}
    for name, value in params.items():
        if name.endswith("id"):
            return str(value)[:255]
    location = next((v.decode("latin-1") for k, v in headers if k.lower() == b"location"), None)
    return location.rstrip("/").rsplit("/", 1)[-1][:255] if location else None


class AuditLog:
    def __init__(self, app, sessionmaker):
        self.app, self.sessionmaker = app, sessionmaker

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in AUDITED_METHODS or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})

        async def send_after_audit(message):
            if message["type"] == "http.response.start":
                await self._record(scope, state, message["status"], message.get("headers", []))
            await send(message)

        await self.app(scope, receive, send_after_audit)

    async def _record(self, scope, state, status: int, headers: list) -> None:
        principal = state.get("principal")
        route = scope.get("route")
        client = scope.get("client")
        event = AuditEvent(
            created_at=utcnow(), tenant=principal.tenant if principal else None, principal=principal.id if principal else None,
            action=getattr(route, "name", None) or "unmatched", method=scope["method"], path=scope["path"][:1024],
            object_id=_object_id(scope, headers), status_code=status, client=client[0][:255] if client else None,
            request_id=request_id_var.get(None),
        )
        try:
            await anyio.to_thread.run_sync(self._write, event)
        except Exception:
            log.exception("could not write the audit row of %s %s", scope["method"], scope["path"])

    def _write(self, event: AuditEvent) -> None:
        with self.sessionmaker() as session:
            session.add(event)
            session.commit()


def delete_old_events(sessionmaker, retention_days: int) -> int:
    if retention_days <= 0:
        return 0
    with sessionmaker() as session:
        deleted = session.execute(delete(AuditEvent).where(AuditEvent.created_at < utcnow() - timedelta(days=retention_days)))
        session.commit()
        return deleted.rowcount or 0
