"""Checkpoints and datasets: the same upload/list/get/download/delete resource over two tables."""

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy import exists, select

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.pagination import MAX_PAGE_SIZE, paginate
from api.problems import Problem, not_found
from api.schemas import CheckpointOut, DatasetOut, Page
from api.uploads import stored_upload
from storage.artifacts import ArtifactStore
from storage.ingest import check_dataset
from storage.models import ACTIVE_STATUSES, Checkpoint, Dataset, Job, JobInput, new_id


def download_response(store: ArtifactStore, key: str, filename: str) -> Response:
    url = store.presigned_get_url(key, filename)
    if url:
        return RedirectResponse(url, status_code=307)
    return FileResponse(store.local_path(key), media_type="application/octet-stream", filename=filename)


def make_router(model, schema, path: str, noun: str, id_prefix: str, fields_from_upload) -> APIRouter:
    router = APIRouter(prefix=f"/v1/{path}", tags=[path])

    def get_owned(session, tenant: str, resource_id: str):
        row = session.get(model, resource_id)
        if row is None or row.tenant != tenant:
            raise not_found(noun, resource_id)
        return row

    @router.post("", status_code=201, response_model=schema, summary=f"Upload a {noun}")
    def upload(
        response: Response,
        file: Annotated[UploadFile, File(description="safetensors, or a torch.save state dict (.pt/.pth/.bin)")],
        session: SessionDep,
        store: StoreDep,
        settings: SettingsDep,
        tenant: TenantDep,
        name: Annotated[str | None, Form(max_length=255)] = None,
    ):
        resource_id = new_id(id_prefix)
        key = f"{path}/{resource_id}.safetensors"
        check = check_dataset if model is Dataset else None
        with stored_upload(file, settings, store, key, check) as stored:
            row = model(
                id=resource_id,
                tenant=tenant,
                name=name or file.filename or resource_id,
                sha256=stored.sha256,
                size_bytes=stored.size_bytes,
                format=stored.info.format,
                num_tensors=stored.info.num_tensors,
                tensors=stored.tensor_table(),
                object_key=key,
                **fields_from_upload(stored.info),
            )
            session.add(row)
            session.commit()
        response.headers["Location"] = f"/v1/{path}/{resource_id}"
        return row

    @router.get("", response_model=Page[schema], summary=f"List {path}, newest first")
    def list_all(
        session: SessionDep,
        tenant: TenantDep,
        page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
        page_token: str | None = None,
    ):
        items, token = paginate(session, select(model).where(model.tenant == tenant), model, page_size, page_token)
        return {"items": items, "next_page_token": token}

    @router.get("/{resource_id}", response_model=schema)
    def get_one(resource_id: str, session: SessionDep, tenant: TenantDep):
        return get_owned(session, tenant, resource_id)

    @router.get("/{resource_id}/content", summary="Download the stored safetensors", response_class=Response)
    def content(resource_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep):
        row = get_owned(session, tenant, resource_id)
        return download_response(store, row.object_key, f"{resource_id}.safetensors")

    @router.delete("/{resource_id}", status_code=204, response_class=Response)
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
        session.delete(row)
        session.commit()
        store.delete(row.object_key)

    return router


checkpoints = make_router(
    Checkpoint, CheckpointOut, "checkpoints", "checkpoint", "ckpt", lambda info: {"num_parameters": info.num_parameters}
)
datasets = make_router(
    Dataset, DatasetOut, "datasets", "dataset", "ds", lambda info: {"num_examples": info.shapes["targets"][0]}
)
