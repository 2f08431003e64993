import asyncio
import json
import logging
import time
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select

import matching
from api import idempotency, quotas
from api.idempotency import MAX_KEY_LENGTH
from api.openapi import download_responses, problems
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.pagination import MAX_PAGE_SIZE, paginate
from api.problems import Problem, not_found
from api.routers.files import download_response
from core.schemas import JobCreate, JobOut, JobStatus, Page
from matching.folders import FOLDER_FORMAT
from storage.db import get_sessionmaker
from storage.ingest import stored_folder_config
from storage.models import TERMINAL_STATUSES, Checkpoint, Dataset, Job, JobInput, utcnow
from worker.app import enqueue_callback, enqueue_job
from worker.callbacks import CallbackRefused, check_callback_url
from worker.devices import DeviceUnavailable, gpu_worker_connected, resolve_worker_device
from worker.jobs import INVALID_INPUT_TITLE, log_ending
from api.routers.exports import check_mlflow

log = logging.getLogger("rebasin.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
EVENT_POLL_S = 0.5
KEEPALIVE_S = 15


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


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


def _waiting_for_gpu(device: str, session, settings) -> str | None:
    """A job asking for a GPU: on the embedded server (whose worker runs on this machine) refused when the
    machine has none; with a broker, accepted, and the message it waits with when no GPU worker is connected."""
    if not device.startswith("cuda"):
        return None
    if settings.broker_url is None:
        try:
            resolve_worker_device(device)
        except DeviceUnavailable as error:
            raise Problem(422, "No GPU for this job", f"This server runs jobs on its own machine: {error}. "
                          "Ask for device 'auto' or 'cpu'.", kind="no-gpu") from None
        return None
    if gpu_worker_connected(session, utcnow() - timedelta(seconds=settings.job_heartbeat_timeout_s)):
        return None
    return (f"waiting for a GPU worker: none is connected (the job asks for {device}); it starts once "
            "one is (`rebasin worker --device cuda:N`), or cancel it and ask for 'auto' or 'cpu'")


def _create_job(body: JobCreate, session, tenant: str, settings, store) -> Job:
    process_lock = quotas.lock_tenant(session, tenant) if settings.tenant_max_active_jobs > 0 else None
    try:
        return _check_and_create_job(body, session, tenant, settings, store)
    finally:
        if process_lock is not None:
            process_lock.release()


def _folder_configs(store, checkpoints: list[Checkpoint]) -> list[dict | None]:
    """Each checkpoint's config.json when it is a model folder (architecture hf builds the model from them)."""
    configs = []
    for checkpoint in checkpoints:
        if checkpoint.format != FOLDER_FORMAT:
            configs.append(None)
            continue
        handle = store.open(checkpoint.object_key)
        try:
            configs.append(stored_folder_config(handle))
        finally:
            handle.close()
    return configs


def _check_and_create_job(body: JobCreate, session, tenant: str, settings, store) -> Job:
    quotas.check_active_jobs(session, tenant, settings)
    checkpoints = _owned(session, Checkpoint, tenant, body.checkpoints, "checkpoint")
    dataset_roles = {role: i for role, i in (("dataset", body.dataset), ("eval_dataset", body.eval_dataset)) if i}
    datasets = _owned(session, Dataset, tenant, list(dataset_roles.values()), "dataset")
    request = body.model_dump(mode="json", exclude_none=True)
    if body.callback_url is not None:
        if not settings.callback_secret:
            raise Problem(422, "Callbacks are off", "This server has no REBASIN_CALLBACK_SECRET to sign callbacks with; poll the job instead.", kind="callbacks-off")
        try:
            check_callback_url(request["callback_url"], settings.callback_allow_private)
        except CallbackRefused as error:
            raise Problem(422, "Callback URL refused", str(error), kind="callback-refused") from None
    if body.mlflow is not None:
        check_mlflow(settings)
    try:
        matching.check_inputs(
            [{name: tuple(t["shape"]) for name, t in c.tensors.items()} for c in checkpoints],
            method=body.method,
            architecture=request.get("architecture"),
            permutation_spec=body.permutation_spec,
            options=request["options"],
            has_dataset=body.dataset is not None,
            has_eval_dataset=body.eval_dataset is not None,
            example_shapes=[tuple(d.tensors["inputs"]["shape"][1:]) for d in datasets],
            configs=_folder_configs(store, checkpoints) if body.architecture and body.architecture.name == "hf" else None,
        )
    except matching.MatchingError as error:
        raise Problem(422, INVALID_INPUT_TITLE, str(error), kind="invalid-input") from None

    no_gpu_yet = _waiting_for_gpu(body.device, session, settings)
    job = Job(tenant=tenant, method=body.method, request=request, status="queued")
    job.inputs = [JobInput(resource_id=c.id, position=i, role="checkpoint") for i, c in enumerate(checkpoints)]
    # Positions go on after the checkpoints: one dataset may serve as both roles.
    job.inputs += [
        JobInput(resource_id=i, position=len(checkpoints) + n, role=role) for n, (role, i) in enumerate(dataset_roles.items())
    ]
    job.progress = {"stage": "queued", "completed": 0, "total": 0, "message": no_gpu_yet or "waiting for a worker"}
    session.add(job)
    session.commit()
    try:
        enqueue_job(job.id, body.device)
    except Exception:
        # The job is safe in the database; workers' sweep queues it once the broker is back.
        log.exception("job %s: could not reach the broker", job.id)
        return job
    job.enqueued_at = utcnow()
    session.commit()
    return job


@router.post("", status_code=202, response_model=JobOut, summary="Start a merge job")
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=MAX_KEY_LENGTH, description="Retries with the same key and body return the first answer.")
    ] = None,
):
    if idempotency_key is not None:
        replay = idempotency.begin(session, tenant, "jobs", idempotency_key, idempotency.fingerprint(body.model_dump(mode="json")))
        if replay is not None:
            return replay
    try:
        job = JobOut.model_validate(_create_job(body, session, tenant, settings, store))
    except BaseException:
        if idempotency_key is not None:
            idempotency.abandon(session, tenant, "jobs", idempotency_key)
        raise
    location = f"/v1/jobs/{job.id}"
    if idempotency_key is not None:
        idempotency.complete(session, tenant, "jobs", idempotency_key, 202, job, location)
    response.headers["Location"] = location
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


async def read_job(settings, tenant: str, job_id: str) -> JobOut:
    """One job as the API shows it, read in a single trip to the thread pool (session opened and closed
    there). Pipelines poll this all the time: the per-request session dependency costs it two more trips
    and about a fifth of its throughput."""

    def read() -> JobOut:
        with get_sessionmaker(settings.resolved_database_url())() as session:
            return JobOut.model_validate(get_owned_job(session, tenant, job_id))

    return await run_in_threadpool(read)


@router.get("/{job_id}", response_model=JobOut, summary="A job: status, progress, result, artifacts, error")
async def get_job(job_id: str, settings: SettingsDep, tenant: TenantDep):
    return await read_job(settings, tenant, job_id)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, summary="Cancel a queued or running job",
             responses=problems(409, on_409="The job has already ended"))
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep):
    job = get_owned_job(session, tenant, job_id)
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", utcnow()
        log_ending(job.id, "cancelled")
        if job.request.get("callback_url"):
            enqueue_callback(job.id)
    elif job.status == "running":
        job.cancel_requested = True  # the worker stops at its next check and cleans up
    else:
        raise Problem(409, "Job already finished", f"Job {job_id!r} is {job.status}; only queued or running jobs can be cancelled.", kind="not-cancellable")
    session.commit()
    return job


@router.get("/{job_id}/artifacts/{name}", response_class=Response, summary="Download an artifact",
            responses=download_responses("the artifact's bytes"))
def download_artifact(job_id: str, name: str, session: SessionDep, store: StoreDep, tenant: TenantDep):
    job = get_owned_job(session, tenant, job_id)
    artifact = next((a for a in job.artifacts if a.name == name), None)
    if artifact is None:
        raise not_found(f"artifact of job {job_id!r}", name)
    return download_response(store, artifact.object_key, name)


@router.get("/{job_id}/events", summary="Server-Sent Events: the job on every change, until it ends", response_class=EventStream,
            responses={200: {"description": "`event: progress` with the job as `data` on every change, then `event: end`",
                             "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def job_events(job_id: str, request: Request, settings: SettingsDep, tenant: TenantDep):
    await read_job(settings, tenant, job_id)  # 404 before the stream starts

    async def snapshot() -> dict | None:
        try:
            return (await read_job(settings, tenant, job_id)).model_dump(mode="json")
        except Problem:  # deleted meanwhile
            return None

    async def stream():
        last, last_sent, sequence = None, time.monotonic(), 0
        while not await request.is_disconnected():
            job = await snapshot()
            if job is None:
                return
            if job != last:
                sequence += 1
                event = "end" if job["status"] in TERMINAL_STATUSES else "progress"
                yield f"id: {sequence}\nevent: {event}\ndata: {json.dumps(job)}\n\n"
                last, last_sent = job, time.monotonic()
                if event == "end":
                    return
            elif time.monotonic() - last_sent > KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            await asyncio.sleep(EVENT_POLL_S)

    return EventStream(stream(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
