"""Checkpoints imported by reference: ``POST /v1/checkpoints/imports`` checks the source against the policy
(422 at once when refused), records the import and hands it to a worker; ``GET .../{id}`` follows it.
The fetching and the ingest run in the worker (worker.imports); storage.sources holds the policy."""

import logging
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api import idempotency, quotas
from api.deps import SessionDep, SettingsDep, TenantDep
from api.idempotency import MAX_KEY_LENGTH
from api.problems import Problem, not_found
from core.schemas import Problem as ProblemSchema
from storage.models import CheckpointImport, utcnow
from storage.sources import MAX_SOURCE_CHARS, SourceRefused, check_source
from worker.imports import enqueue_import

log = logging.getLogger("rebasin.api")


class ImportCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=MAX_SOURCE_CHARS, description=(
        "s3://bucket/key (REBASIN_IMPORT_S3_BUCKETS), https://host/path (REBASIN_IMPORT_HTTP_HOSTS), "
        "models:/name/version or runs:/run_id/path (REBASIN_MLFLOW_TRACKING_URI)"))
    name: str | None = Field(None, min_length=1, max_length=255, description="display name; default: the source's last segment")


class ImportOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    source: str
    checkpoint_id: str | None = Field(description="the checkpoint it became, once succeeded")
    error: ProblemSchema | None = Field(description="why it failed (or, while queued again, why the last attempt did)")
    attempts: int
    created_at: datetime
    finished_at: datetime | None


router = APIRouter(prefix="/v1/checkpoints/imports", tags=["checkpoints"])


def _create(body: ImportCreate, session, tenant: str, settings) -> CheckpointImport:
    try:
        check_source(body.source, settings)  # resolves an https host: off the event loop
    except SourceRefused as error:
        raise Problem(422, "Import source refused", str(error), kind="import-refused") from None
    quotas.check_storage(session, tenant, settings, 0)
    row = CheckpointImport(tenant=tenant, source=body.source, name=body.name, status="queued", attempts=0)
    session.add(row)
    session.commit()
    try:
        enqueue_import(row.id)
    except Exception:
        log.exception("import %s: could not reach the broker", row.id)  # the workers' sweep sends it later
        return row
    row.enqueued_at = utcnow()
    session.commit()
    return row


@router.post("", status_code=202, response_model=ImportOut, summary="Import a checkpoint by reference (S3, HTTPS, MLflow)")
async def create_import(
    body: ImportCreate,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=MAX_KEY_LENGTH, description="Retries with the same key and body return the first answer.")
    ] = None,
):
    if idempotency_key is not None:
        fingerprint = idempotency.fingerprint(body.model_dump(mode="json"))
        replay = await run_in_threadpool(idempotency.begin, session, tenant, "imports", idempotency_key, fingerprint)
        if replay is not None:
            return replay
    try:
        row = ImportOut.model_validate(await run_in_threadpool(_create, body, session, tenant, settings))
    except BaseException:
        if idempotency_key is not None:
            await run_in_threadpool(idempotency.abandon, session, tenant, "imports", idempotency_key)
        raise
    location = f"/v1/checkpoints/imports/{row.id}"
    if idempotency_key is not None:
        await run_in_threadpool(idempotency.complete, session, tenant, "imports", idempotency_key, 202, row, location)
    response.headers["Location"] = location
    return row


@router.get("/{import_id}", response_model=ImportOut, summary="A checkpoint import: status, checkpoint_id once done, error")
def get_import(import_id: str, session: SessionDep, tenant: TenantDep):
    row = session.get(CheckpointImport, import_id)
    if row is None or row.tenant != tenant:
        raise not_found("import", import_id)
    return row
