from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlalchemy import select

import matching
from api.deps import SessionDep, StoreDep, TenantDep
from api.pagination import MAX_PAGE_SIZE, paginate
from api.problems import Problem, not_found
from api.routers.files import download_response
from api.schemas import JobCreate, JobOut, JobStatus, Page
from storage.models import Checkpoint, Dataset, Job, JobInput, utcnow
from worker.app import enqueue_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def get_owned_job(session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant != tenant:
        raise not_found("job", job_id)
    return job


def _owned(session, model, tenant: str, ids: list[str], noun: str) -> list:
    rows = {row.id: row for row in session.scalars(select(model).where(model.id.in_(ids), model.tenant == tenant))}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise Problem(422, "Unknown input", f"No {noun} with id {missing[0]!r}.", kind="unknown-input")
    return [rows[i] for i in ids]


@router.post("", status_code=202, response_model=JobOut, summary="Start a merge job")
def create_job(body: JobCreate, response: Response, session: SessionDep, tenant: TenantDep):
    checkpoints = _owned(session, Checkpoint, tenant, body.checkpoints, "checkpoint")
    dataset_roles = {role: i for role, i in (("dataset", body.dataset), ("eval_dataset", body.eval_dataset)) if i}
    _owned(session, Dataset, tenant, list(dataset_roles.values()), "dataset")
    request = body.model_dump(mode="json", exclude_none=True)
    try:
        matching.check_inputs(
            [{name: tuple(t["shape"]) for name, t in c.tensors.items()} for c in checkpoints],
            method=body.method,
            architecture=request.get("architecture"),
            permutation_spec=body.permutation_spec,
            options=request["options"],
            has_dataset=body.dataset is not None,
        )
    except matching.MatchingError as error:
        raise Problem(422, "Inputs cannot be merged", str(error), kind="invalid-input") from None

    job = Job(tenant=tenant, method=body.method, request=request, status="queued")
    job.inputs = [JobInput(resource_id=c.id, position=i, role="checkpoint") for i, c in enumerate(checkpoints)]
    job.inputs += [JobInput(resource_id=i, position=0, role=role) for role, i in dataset_roles.items()]
    job.progress = {"stage": "queued", "completed": 0, "total": 0, "message": "waiting for a worker"}
    session.add(job)
    session.commit()
    try:
        enqueue_job(job.id, body.device)
    except Exception:
        session.delete(job)
        session.commit()
        raise Problem(503, "Queue unavailable", "The job queue cannot be reached; try again shortly.", kind="broker")
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.get("", response_model=Page[JobOut], summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: JobStatus | None = None,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
    page_token: str | None = None,
):
    query = select(Job).where(Job.tenant == tenant)
    if status:
        query = query.where(Job.status == status)
    items, token = paginate(session, query, Job, page_size, page_token)
    return {"items": items, "next_page_token": token}


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep, tenant: TenantDep):
    return get_owned_job(session, tenant, job_id)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, summary="Cancel a queued or running job")
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep):
    job = get_owned_job(session, tenant, job_id)
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", utcnow()
    elif job.status == "running":
        job.cancel_requested = True  # the worker stops at its next check and cleans up
    else:
        raise Problem(409, "Job already finished", f"Job {job_id!r} is {job.status}; only queued or running jobs can be cancelled.", kind="not-cancellable")
    session.commit()
    return job


@router.get("/{job_id}/artifacts/{name}", response_class=Response, summary="Download an artifact")
def download_artifact(job_id: str, name: str, session: SessionDep, store: StoreDep, tenant: TenantDep):
    job = get_owned_job(session, tenant, job_id)
    artifact = next((a for a in job.artifacts if a.name == name), None)
    if artifact is None:
        raise not_found(f"artifact of job {job_id!r}", name)
    return download_response(store, artifact.object_key, name)
