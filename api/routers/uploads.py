"""Direct-to-S3 uploads: the client sends the parts to presigned URLs, the API only validates the result.

Flow: ``POST /v1/uploads`` starts an S3 multipart upload at a temporary key and returns one presigned
URL per part; the client PUTs each part there and keeps the ``ETag`` S3 answers; ``POST
/v1/uploads/{id}/complete`` with those ETags assembles the object, validates it exactly like a
``POST /v1/checkpoints`` upload, and turns it into a checkpoint or dataset (content-addressed,
server-side copy); a file that fails validation is refused (422) and removed. ``DELETE`` aborts.
Uploads not completed within ``REBASIN_STALE_UPLOAD_AFTER_S`` expire and are aborted by the sweep.

With a local-directory store there is nothing to presign: these endpoints answer 409 and the
ordinary streamed ``POST /v1/checkpoints`` is the way to upload (it handles large files too).

This router also owns the periodic storage sweep (its lifespan), which runs on every API process.
"""

import asyncio
import logging
import math
from contextlib import asynccontextmanager, suppress
from datetime import datetime, timedelta
from typing import Literal

from botocore.exceptions import ClientError
from fastapi import APIRouter, FastAPI, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import update
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from core.config import Settings
from api import quotas
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.openapi import problems
from api.problems import Problem, not_found
from core.schemas import CheckpointOut, DatasetOut
from api.uploads import CHUNK, KINDS, HashingFileWriter, create_resource, staging_workdir, too_large, validate_file
from storage.artifacts import DIRECT_UPLOADS_PREFIX, ArtifactStore, S3Store
from storage.housekeeping import sweep_storage
from storage.db import get_sessionmaker
from api.audit import delete_old_events
from api.sessions import delete_old_sessions
from storage.models import DirectUpload, new_id, utcnow
from storage.objects import tenant_namespace

log = logging.getLogger("rebasin.uploads")

MIN_PART_BYTES = 5 * 1024**2  # S3: every part but the last
MAX_PART_BYTES = 5 * 1024**3
MAX_PARTS = 10_000
RESOURCE_SCHEMAS = {"checkpoint": CheckpointOut, "dataset": DatasetOut}


# Request and response bodies (kept beside their only router).


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["checkpoint", "dataset"]
    name: str = Field(min_length=1, max_length=255)
    size_bytes: int = Field(gt=0, description="Exact size of the file; the completed object must match it.")
    part_size_bytes: int | None = Field(
        None, ge=MIN_PART_BYTES, le=MAX_PART_BYTES, description="Default REBASIN_DIRECT_UPLOAD_PART_BYTES (grown to fit 10000 parts)."
    )


class PartUrl(BaseModel):
    part_number: int
    url: str
    offset: int = Field(description="Byte offset of this part in the file.")
    size_bytes: int


class UploadOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    name: str
    status: Literal["pending", "completing", "completed", "failed", "aborted", "expired"]
    size_bytes: int
    part_size: int
    part_count: int
    created_at: datetime
    expires_at: datetime
    resource_id: str | None = Field(None, description="The checkpoint or dataset it became, once completed.")
    error: dict | None = None
    parts: list[PartUrl] | None = Field(None, description="Presigned PUT URLs, while the upload is pending.")


class CompletedPart(BaseModel):
    part_number: int = Field(ge=1, le=MAX_PARTS)
    etag: str = Field(min_length=1, max_length=200)


class UploadComplete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parts: list[CompletedPart] = Field(min_length=1, max_length=MAX_PARTS)


# Periodic sweep of abandoned temporaries, on every API process (the work is idempotent).


def _extra_staging_dir(settings: Settings, store: ArtifactStore):
    return None if store.staging_dir() is not None else (settings.data_dir / "staging").resolve()


def sweep_once(settings: Settings, store: ArtifactStore) -> dict[str, int]:
    counts = sweep_storage(
        settings.resolved_database_url(), store, _extra_staging_dir(settings, store), settings.stale_upload_after_s
    )
    sessionmaker = get_sessionmaker(settings.resolved_database_url())
    counts["audit_events_deleted"] = delete_old_events(sessionmaker, settings.audit_retention_days)
    counts["sessions_deleted"] = delete_old_sessions(sessionmaker)
    return counts


@asynccontextmanager
async def storage_housekeeping(app: FastAPI):
    async def sweep_forever():
        settings, store = app.state.settings, app.state.store
        while True:
            try:
                await run_in_threadpool(sweep_once, settings, store)
            except Exception:
                log.exception("storage sweep failed; retrying later")
            await asyncio.sleep(settings.storage_sweep_interval_s)

    task = asyncio.create_task(sweep_forever())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


router = APIRouter(
    prefix="/v1/uploads", tags=["uploads"], lifespan=storage_housekeeping,
    responses=problems(409, on_409="The upload is not pending, or the server has no S3 for direct uploads"),
)


def _s3(store: ArtifactStore) -> S3Store:
    if not isinstance(store, S3Store):
        raise Problem(
            409,
            "Direct uploads unavailable",
            "This server keeps artifacts in a local directory, so there is no S3 to upload to directly: "
            "send the file to POST /v1/checkpoints or /v1/datasets (streamed, any size up to the limit).",
            kind="direct-uploads-unavailable",
        )
    return store


def _owned(session: Session, tenant: str, upload_id: str) -> DirectUpload:
    row = session.get(DirectUpload, upload_id)
    if row is None or row.tenant != tenant:
        raise not_found("upload", upload_id)
    return row


def _describe(row: DirectUpload, store: S3Store | None, settings: Settings) -> UploadOut:
    out = UploadOut.model_validate(row)
    if row.status == "pending" and store is not None:
        expires_s = max(1, int((row.expires_at - utcnow()).total_seconds()))
        out.parts = [
            PartUrl(
                part_number=number,
                url=store.presigned_part_url(row.object_key, row.multipart_upload_id, number, expires_s),
                offset=(number - 1) * row.part_size,
                size_bytes=min(row.part_size, row.size_bytes - (number - 1) * row.part_size),
            )
            for number in range(1, row.part_count + 1)
        ]
    return out


@router.post("", status_code=201, response_model=UploadOut, summary="Start a direct-to-S3 multipart upload")
def create_upload(
    body: UploadCreate, response: Response, session: SessionDep, store: StoreDep, settings: SettingsDep, tenant: TenantDep
):
    s3 = _s3(store)
    if body.size_bytes > settings.max_upload_bytes:
        raise too_large(settings.max_upload_bytes)
    quotas.check_storage(session, tenant, settings, body.size_bytes)
    part_size = body.part_size_bytes or settings.direct_upload_part_bytes
    if math.ceil(body.size_bytes / part_size) > MAX_PARTS:
        if body.part_size_bytes is not None:
            raise Problem(422, "Invalid request", f"part_size_bytes: {body.size_bytes} bytes need more than {MAX_PARTS} parts")
        part_size = math.ceil(body.size_bytes / MAX_PARTS / 1024**2) * 1024**2
    row = DirectUpload(
        tenant=tenant,
        kind=body.kind,
        name=body.name,
        size_bytes=body.size_bytes,
        part_size=part_size,
        part_count=math.ceil(body.size_bytes / part_size),
        status="pending",
        expires_at=utcnow() + timedelta(seconds=settings.stale_upload_after_s),
    )
    row.id = new_id("upl")
    # Not under objects/: nothing refers to these bytes until they are validated and copied there.
    row.object_key = f"{DIRECT_UPLOADS_PREFIX}{tenant_namespace(tenant)}/{row.id}"
    # The record first: the sweep aborts any multipart upload under uploads/ that no live record names.
    row.multipart_upload_id = ""
    session.add(row)
    session.commit()
    row.multipart_upload_id = s3.create_multipart(row.object_key)
    try:
        session.commit()
    except BaseException:
        s3.abort_multipart(row.object_key, row.multipart_upload_id)
        raise
    response.headers["Location"] = f"/v1/uploads/{row.id}"
    return _describe(row, s3, settings)


@router.get("/{upload_id}", response_model=UploadOut, summary="A direct upload (with fresh part URLs while pending)")
def get_upload(upload_id: str, session: SessionDep, store: StoreDep, settings: SettingsDep, tenant: TenantDep):
    row = _owned(session, tenant, upload_id)
    return _describe(row, store if isinstance(store, S3Store) else None, settings)


def _claim(session: Session, tenant: str, upload_id: str) -> DirectUpload:
    """pending -> completing, atomically: two concurrent completions cannot both proceed."""
    claimed = session.execute(
        update(DirectUpload)
        .where(
            DirectUpload.id == upload_id,
            DirectUpload.tenant == tenant,
            DirectUpload.status == "pending",
            DirectUpload.expires_at > utcnow(),
        )
        .values(status="completing")
    ).rowcount
    session.commit()
    row = _owned(session, tenant, upload_id)
    session.refresh(row)
    if not claimed:
        if row.status == "pending":  # past expires_at, not swept yet
            raise Problem(410, "Upload expired", f"Upload {upload_id!r} expired at {row.expires_at.isoformat()}; start a new one.")
        if row.status in ("expired", "aborted"):
            raise Problem(410, f"Upload {row.status}", f"Upload {upload_id!r} was {row.status}; start a new one.")
        raise Problem(409, "Upload not pending", f"Upload {upload_id!r} is {row.status}.", kind="upload-not-pending", resource_id=row.resource_id)
    return row


def _finish(session: Session, row: DirectUpload, status: str, **values) -> None:
    session.execute(update(DirectUpload).where(DirectUpload.id == row.id).values(status=status, **values))
    session.commit()


def _assemble(session: Session, s3: S3Store, row: DirectUpload, parts: list[CompletedPart], limit: int) -> None:
    numbers = [part.part_number for part in parts]
    if numbers != list(range(1, row.part_count + 1)):
        _finish(session, row, "pending")
        raise Problem(422, "Invalid request", f"parts: list each of the {row.part_count} parts once, in order, with its ETag", kind="validation")
    try:
        s3.complete_multipart(row.object_key, row.multipart_upload_id, [(p.part_number, p.etag) for p in parts])
    except ClientError as error:
        # Wrong ETags or a missing part: the client can fix that and try again.
        _finish(session, row, "pending")
        message = error.response.get("Error", {}).get("Message") or str(error)
        raise Problem(400, "Parts do not assemble", f"S3 refused to complete the upload: {message}", kind="parts-rejected") from None
    size = s3.size(row.object_key)
    if size != row.size_bytes or size > limit:
        raise Problem(422, "Invalid file", f"the uploaded object has {size} bytes, {row.size_bytes} were announced", kind="invalid-file")


def _download(s3: S3Store, key: str, writer: HashingFileWriter):
    body = s3.open(key)
    try:
        for chunk in body.iter_chunks(CHUNK):
            writer.write(chunk)
    except BaseException:
        writer.discard()
        raise
    finally:
        body.close()
    return writer.close()


def complete_upload_sync(
    upload_id: str, body: UploadComplete, session: Session, s3: S3Store, settings: Settings, tenant: str
):
    row = _claim(session, tenant, upload_id)
    kind = KINDS[row.kind]
    failure = None  # set when the upload is beyond repair: then it is marked failed and its object removed
    try:
        _assemble(session, s3, row, body.parts, settings.max_upload_bytes)
        with staging_workdir(s3, settings) as workdir:
            # The bytes have to be read once anyway to validate them; hashing rides along.
            received = _download(s3, row.object_key, HashingFileWriter(workdir / "upload", settings.max_upload_bytes))
            info = validate_file(kind, received.path, workdir, settings)
            resource = create_resource(
                session, s3, tenant, kind, info, received, row.name, write_original=lambda key: s3.copy(row.object_key, key),
                settings=settings,
            )
    except Problem as problem:
        if problem.kind not in ("parts-rejected", "validation"):  # those went back to pending: the client may retry
            failure = problem
        raise
    except BaseException:
        failure = Problem(500, "Internal error", "The upload could not be completed.", kind="internal")
        raise
    finally:
        if failure is not None:
            # Refused or broken: nothing of it may stay behind.
            session.rollback()
            with suppress(Exception):
                s3.delete(row.object_key)
                s3.abort_multipart(row.object_key, row.multipart_upload_id)
            _finish(session, row, "failed", error=failure.body())
    s3.delete(row.object_key)
    _finish(session, row, "completed", resource_id=resource.id)
    return resource


@router.post(
    "/{upload_id}/complete",
    status_code=201,
    summary="Complete a direct upload: validate it and create the checkpoint or dataset",
    responses={201: {"description": "the checkpoint or dataset created (as from its POST)"}} | problems(400, 410),
)
async def complete_upload(
    upload_id: str, body: UploadComplete, response: Response, session: SessionDep, store: StoreDep, settings: SettingsDep, tenant: TenantDep
):
    s3 = _s3(store)
    resource = await run_in_threadpool(complete_upload_sync, upload_id, body, session, s3, settings, tenant)
    kind_name = next(name for name, kind in KINDS.items() if isinstance(resource, kind.model))
    response.headers["Location"] = f"/v1/{KINDS[kind_name].path}/{resource.id}"
    return RESOURCE_SCHEMAS[kind_name].model_validate(resource)


@router.delete("/{upload_id}", status_code=204, response_class=Response, summary="Abort a direct upload")
def abort_upload(upload_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep):
    s3 = _s3(store)
    row = _owned(session, tenant, upload_id)
    aborted = session.execute(
        update(DirectUpload).where(DirectUpload.id == upload_id, DirectUpload.status == "pending").values(status="aborted")
    ).rowcount
    if not aborted:
        session.refresh(row)
        if row.status == "completing":
            raise Problem(409, "Upload completing", f"Upload {upload_id!r} is being completed; wait for it.", kind="upload-not-pending")
        return  # already finished one way or another: nothing to abort
    s3.abort_multipart(row.object_key, row.multipart_upload_id)
    session.commit()
