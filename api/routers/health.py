from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SessionDep, StoreDep
from worker.app import celery_app

router = APIRouter(tags=["health"])


class Liveness(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(description="database, artifact_store, broker: 'ok' or the error")


def _check_broker() -> None:
    with celery_app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


@router.get("/healthz", summary="Liveness", response_model=Liveness)
def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database, artifact store and broker answer", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready: a check failed"}})
def readyz(session: SessionDep, store: StoreDep):
    checks = {}
    for name, probe in (
        ("database", lambda: session.execute(text("SELECT 1"))),
        ("artifact_store", store.check),
        ("broker", _check_broker),
    ):
        try:
            probe()
            checks[name] = "ok"
        except Exception as error:
            checks[name] = f"error: {type(error).__name__}: {error}"[:300]
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)
