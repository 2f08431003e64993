"""Checkpoints and datasets: the same upload/list/get/download/delete resource over two tables."""

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy import exists, select
from starlette.concurrency import run_in_threadpool

from api import idempotency, quotas
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.pagination import MAX_PAGE_SIZE, paginate
from api.idempotency import MAX_KEY_LENGTH
from api.openapi import download_responses, problems
from api.problems import Problem, not_found
from core.schemas import CheckpointOut, DatasetOut, Page
from api.uploads import KINDS, create_resource, receive_multipart_file, staging_workdir, validate_file
from storage.artifacts import ArtifactStore
from storage.models import ACTIVE_STATUSES, Job, JobInput
from storage.objects import delete_referencing_row


# Bytes of a multipart body that are not the file (boundaries, part headers): not charged to the quota.
MULTIPART_SLACK = 16 * 1024


def download_response(store: ArtifactStore, key: str, filename: str) -> Response:
    """A presigned redirect (S3), or the file streamed from disk; FileResponse answers Range requests (206)."""
    url = store.presigned_get_url(key, filename)
    if url:
        return RedirectResponse(url, status_code=307)
    return FileResponse(store.local_path(key), media_type="application/octet-stream", filename=filename)


def multipart_upload_body(noun: str) -> dict:
    """OpenAPI for the body we parse ourselves (streamed, so FastAPI's form parsing is not used)."""
    schema = {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {
                "type": "string",
                "format": "binary",
                "description": "safetensors, or a torch.save state dict (.pt/.pth/.bin)"
                + (", or a model folder (config.json and its weights, as save_pretrained writes them) as one .tar, "
                   ".tar.gz or .zip" if noun == "checkpoint" else ""),
            },
            "name": {"type": "string", "maxLength": 255, "description": f"display name of the {noun}"},
        },
    }
    idempotency_key = {
        "name": "Idempotency-Key", "in": "header", "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
        "description": "Retries with the same key and file return the first answer.",
    }
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}},
            "parameters": [idempotency_key]}


def make_router(kind_name: str, schema) -> APIRouter:
    kind = KINDS[kind_name]
    model, path, noun = kind.model, kind.path, kind.noun
    router = APIRouter(prefix=f"/v1/{path}", tags=[path])

    def get_owned(session, tenant: str, resource_id: str):
        row = session.get(model, resource_id)
        if row is None or row.tenant != tenant:
            raise not_found(noun, resource_id)
        return row

    @router.post(
        "",
        status_code=201,
        response_model=schema,
        summary=f"Upload a {noun}",
        name=f"upload_{noun}",
        openapi_extra=multipart_upload_body(noun),
    )
    async def upload(
        request: Request, response: Response, session: SessionDep, store: StoreDep, settings: SettingsDep, tenant: TenantDep
    ):
        key = request.headers.get("idempotency-key")
        length = request.headers.get("content-length", "")
        announced = int(length) - MULTIPART_SLACK if length.isdigit() else 0
        await run_in_threadpool(quotas.check_storage, session, tenant, settings, announced)
        with staging_workdir(store, settings) as workdir:
            received, name = await receive_multipart_file(request, workdir / "upload", settings.max_upload_bytes)
            if key is not None:
                # Known only once the bytes are in: a retry re-sends the file, but never stores it twice.
                request_sha256 = idempotency.fingerprint({"sha256": received.sha256, "name": name})
                replay = await run_in_threadpool(idempotency.begin, session, tenant, path, key, request_sha256)
                if replay is not None:
                    return replay
            try:
                # Validation reads the whole file and the DB session is synchronous: both off the event loop.
                info = await run_in_threadpool(validate_file, kind, received.path, workdir, settings)
                row = await run_in_threadpool(
                    create_resource, session, store, tenant, kind, info, received, name or received.filename or "",
                    settings=settings,
                )
            except BaseException:
                if key is not None:
                    await run_in_threadpool(idempotency.abandon, session, tenant, path, key)
                raise
        location = f"/v1/{path}/{row.id}"
        if key is not None:
            await run_in_threadpool(idempotency.complete, session, tenant, path, key, 201, schema.model_validate(row), location)
        response.headers["Location"] = location
        return row

    @router.get("", response_model=Page[schema], summary=f"List {path}, newest first", name=f"list_{path}")
    def list_all(
        session: SessionDep,
        tenant: TenantDep,
        page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
        page_token: str | None = None,
    ):
        items, token = paginate(session, select(model).where(model.tenant == tenant), model, page_size, page_token)
        return {"items": items, "next_page_token": token}

    @router.get("/{resource_id}", response_model=schema, summary=f"A {noun}", name=f"get_{noun}")
    def get_one(resource_id: str, session: SessionDep, tenant: TenantDep):
        return get_owned(session, tenant, resource_id)

    @router.get("/{resource_id}/content", summary="Download the stored safetensors", response_class=Response,
                name=f"download_{noun}", responses=download_responses(f"the {noun} as safetensors"))
    def content(resource_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep):
        row = get_owned(session, tenant, resource_id)
        return download_response(store, row.object_key, f"{resource_id}.safetensors")

    @router.delete("/{resource_id}", status_code=204, response_class=Response, summary=f"Delete a {noun}",
                   name=f"delete_{noun}", responses=problems(409, on_409="A queued or running job uses it"))
    def delete(resource_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep):
        row = get_owned(session, tenant, resource_id)
        in_use = session.scalar(
            select(
                exists().where(
                    JobInput.resource_id == resource_id, JobInput.job_id == Job.id, Job.status.in_(ACTIVE_STATUSES)
                )
            )
        )
        if in_use:
            raise Problem(409, "In use", f"A queued or running job uses {noun} {resource_id!r}; cancel it or wait.", kind="in-use")
        delete_referencing_row(session, store, row)

    return router


checkpoints = make_router("checkpoint", CheckpointOut)
datasets = make_router("dataset", DatasetOut)
