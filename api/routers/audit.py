"""The audit log, read by tenants (their own rows) and administrators (everyone's)."""

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from api.deps import PrincipalDep, SessionDep
from api.pagination import MAX_PAGE_SIZE, paginate
from api.problems import Problem
from core.schemas import AuditEventOut, Page
from storage.models import AuditEvent

router = APIRouter(prefix="/v1/audit", tags=["audit"])
ISO_8601 = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:\d{2})?$"


def _instant(text: str) -> datetime:
    # A string, not a datetime parameter: pydantic would also take a number of seconds, which the document does not say.
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise Problem(422, "Invalid request", f"since: {text!r} is not a date-time", kind="validation",
                      errors=[{"field": "since", "message": "not a date-time"}]) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@router.get("", response_model=Page[AuditEventOut],
            summary="State-changing requests, newest first: the caller's tenant's (an admin's: everyone's, or one tenant's)")
def list_audit_events(
    session: SessionDep,
    principal: PrincipalDep,
    action: Annotated[str | None, Query(max_length=64, description="an operation id, e.g. create_job")] = None,
    object_id: Annotated[str | None, Query(max_length=255)] = None,
    since: Annotated[str | None, Query(max_length=64, pattern=ISO_8601, json_schema_extra={"format": "date-time"},
                                       description="only rows at or after this time (RFC 3339)")] = None,
    tenant: Annotated[str | None, Query(max_length=100, description="admins only; others always read their own")] = None,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
    page_token: str | None = None,
):
    query = select(AuditEvent)
    if not principal.allows("admin"):
        query = query.where(AuditEvent.tenant == principal.tenant)
    elif tenant is not None:
        query = query.where(AuditEvent.tenant == tenant)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if object_id is not None:
        query = query.where(AuditEvent.object_id == object_id)
    if since is not None:
        query = query.where(AuditEvent.created_at >= _instant(since))
    items, token = paginate(session, query, AuditEvent, page_size, page_token)
    return {"items": items, "next_page_token": token}
