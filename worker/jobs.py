"""Running one merge job: claim it in the database, run ``matching``, store the artifacts, finish it.

Every state change is a short transaction guarded by the job's current
status, so a redelivered or cancelled job finishes exactly once.
"""

import logging
import os
import socket
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

from billiard.exceptions import SoftTimeLimitExceeded
import torch
from safetensors.torch import load_file
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

import matching
from core.config import Settings
from core.logs import job_id_var
from core.schemas import JobOut
from storage.artifacts import ArtifactStore, open_store, sha256_file
from storage.db import session_scope
from storage.models import Artifact, Checkpoint, Dataset, Job, utcnow
from worker import devices
from worker.app import enqueue_callback, enqueue_job

log = logging.getLogger("rebasin.worker")

PROGRESS_INTERVAL_S = 1.0
INVALID_INPUT_TITLE = "The inputs cannot be merged"  # at submission (422) and when the job runs (its error)


def problem(kind: str, title: str, detail: str, status: int = 422) -> dict:
    """A failed job's error, in the same problem-details form as the API's errors."""
    return {"type": f"https://rebasin.dev/problems/{kind}", "title": title, "status": status, "detail": detail}


def log_ending(job_id: str, status: str, error: dict | None = None) -> None:
    """One line for every job's end, with the reason when it did not succeed."""
    if error:
        log.warning("job %s: %s: %s: %s", job_id, status, error.get("title"), error.get("detail"))
    else:
        log.info("job %s: %s", job_id, status)


def artifact_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/{name}"


def job_payload(job: Job) -> dict:
    return JobOut.model_validate(job).model_dump(mode="json")


def _announce_end(job: Job) -> None:
    if job.request.get("callback_url"):
        enqueue_callback(job.id)


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _holder_alive(job: Job, heartbeat_timeout_s: float) -> bool:
    """Whether the process that claimed this running job may still be working on it."""
    host, _, pid = (job.claimed_by or "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
    return job.heartbeat_at is not None and utcnow() - job.heartbeat_at < timedelta(seconds=heartbeat_timeout_s)


def claim_job(session: Session, job_id: str, settings: Settings) -> Job | None:
    """Mark the job running and count the attempt; None when there is nothing to run."""
    job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
    if job is None or job.status not in ("queued", "running"):
        return None
    if job.status == "running" and _holder_alive(job, settings.job_heartbeat_timeout_s):
        return None  # a duplicate delivery while the job runs elsewhere
    if job.cancel_requested:
        job.status, job.finished_at = "cancelled", utcnow()
    elif job.attempts >= settings.job_max_attempts:
        # Each delivery that got this far and never finished took its worker down with it.
        job.status, job.finished_at = "failed", utcnow()
        job.error = problem(
            "worker-lost",
            "The job stopped its worker too many times",
            f"The job was started {job.attempts} times and its worker process died each time "
            "(for example out of memory). Try a smaller model, fewer checkpoints or another device.",
        )
    else:
        job.status, job.attempts, job.claimed_by = "running", job.attempts + 1, this_process()
        job.started_at = job.heartbeat_at = utcnow()
        job.progress = {"stage": "loading", "completed": 0, "total": 0, "message": "loading inputs"}
        session.commit()
        return job
    session.commit()
    log_ending(job.id, job.status, job.error)
    _announce_end(job)
    return None


def finish_job(db_url: str, job_id: str, **values) -> bool:
    """Move a running job to its final state; False if it was no longer running."""
    with session_scope(db_url) as session:
        artifacts = values.pop("artifacts", [])
        updated = session.execute(
            update(Job).where(Job.id == job_id, Job.status == "running").values(finished_at=utcnow(), **values)
        ).rowcount
        if updated and artifacts:
            session.add_all(Artifact(job_id=job_id, **artifact) for artifact in artifacts)
        session.commit()
        if updated:
            _announce_end(session.get(Job, job_id))
        return bool(updated)


def requeue_lost_jobs(settings: Settings) -> list[str]:
    """Queue again the jobs the broker lost: running ones whose worker stopped sending
    heartbeats, and queued ones that never reached the broker (a crash between commit and send)."""
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.job_heartbeat_timeout_s)
    lost = or_(
        and_(Job.status == "running", Job.heartbeat_at < stale_before),
        and_(Job.status == "queued", Job.enqueued_at.is_(None), Job.created_at < now - timedelta(seconds=30)),
    )
    requeued = []
    with session_scope(settings.resolved_database_url()) as session:
        for job_id, heartbeat_at, request in session.execute(select(Job.id, Job.heartbeat_at, Job.request).where(lost)).all():
            # Only one sweeper wins the conditional update, so the job is queued once.
            won = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.heartbeat_at.is_(None) if heartbeat_at is None else Job.heartbeat_at == heartbeat_at)
                .values(heartbeat_at=now, enqueued_at=now)
            ).rowcount
            session.commit()
            if won:
                enqueue_job(job_id, request.get("device", "auto"))
                requeued.append(job_id)
    return requeued


class JobMonitor:
    """Progress, heartbeats and cancellation checks, at about one database round trip a second."""

    def __init__(self, db_url: str, job_id: str, heartbeat_interval_s: float):
        self.db_url, self.job_id = db_url, job_id
        self.last_write = self.last_check = float("-inf")
        self.cancel_requested = False
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, args=(heartbeat_interval_s,), daemon=True)

    def __enter__(self):
        self._heartbeat.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._heartbeat.join()

    def _beat(self, interval_s: float) -> None:
        # A thread, so that the heartbeat goes on while matching sits in one long computation.
        while not self._stop.wait(interval_s):
            try:
                with session_scope(self.db_url) as session:
                    session.execute(update(Job).where(Job.id == self.job_id, Job.status == "running").values(heartbeat_at=utcnow()))
                    session.commit()
            except Exception:
                log.exception("job %s: heartbeat failed", self.job_id)

    def _read_cancel_flag(self, session: Session) -> None:
        self.cancel_requested = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        self.last_check = time.monotonic()

    def progress(self, stage: str, completed: int, total: int, message: str = "") -> None:
        if time.monotonic() - self.last_write < PROGRESS_INTERVAL_S and completed < total:
            return
        with session_scope(self.db_url) as session:
            session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.status == "running")
                .values(progress={"stage": stage, "completed": completed, "total": total, "message": message})
            )
            self._read_cancel_flag(session)
            session.commit()
        self.last_write = time.monotonic()

    def should_cancel(self, fresh: bool = False) -> bool:
        if fresh or time.monotonic() - self.last_check >= PROGRESS_INTERVAL_S:
            with session_scope(self.db_url) as session:
                self._read_cancel_flag(session)
        return self.cancel_requested


def _download(store: ArtifactStore, key: str, workdir: Path) -> Path:
    local = store.local_path(key)
    if local is not None:
        return local
    path = workdir / key.replace("/", "_")
    store.get_file(key, path)
    return path


def run_merge(job: Job, store: ArtifactStore, monitor: JobMonitor, workdir: Path, settings: Settings) -> dict:
    """Load the inputs, merge, upload the artifacts; returns the job's result and artifact records."""
    request = job.request
    with session_scope(settings.resolved_database_url()) as session:
        checkpoints = {c.id: c for c in session.scalars(select(Checkpoint).where(Checkpoint.id.in_(request["checkpoints"])))}
        dataset_ids = [i for i in (request.get("dataset"), request.get("eval_dataset")) if i]
        datasets = {d.id: d for d in session.scalars(select(Dataset).where(Dataset.id.in_(dataset_ids)))}
    missing = [i for i in request["checkpoints"] + dataset_ids if i not in checkpoints and i not in datasets]
    if missing:
        raise matching.MatchingError(f"inputs were deleted before the job ran: {', '.join(missing)}")

    states = []
    for position, checkpoint_id in enumerate(request["checkpoints"]):
        monitor.progress("loading", position, len(request["checkpoints"]), f"loading checkpoint {checkpoint_id}")
        states.append(load_file(_download(store, checkpoints[checkpoint_id].object_key, workdir)))

    def dataset_path(dataset_id: str | None) -> Path | None:
        return _download(store, datasets[dataset_id].object_key, workdir) if dataset_id else None

    device = devices.job_device(request.get("device") or "auto", settings.worker_device)
    with session_scope(settings.resolved_database_url()) as session:
        session.execute(update(Job).where(Job.id == job.id).values(device_used=device))
        session.commit()
    outcome = matching.merge_checkpoints(
        states,
        method=request["method"],
        architecture=request.get("architecture"),
        permutation_spec=request.get("permutation_spec"),
        dataset=dataset_path(request.get("dataset")),
        eval_dataset=dataset_path(request.get("eval_dataset")),
        options=request.get("options") or {},
        device=device,
        progress=monitor.progress,
        should_cancel=monitor.should_cancel,
    )
    del states

    monitor.progress("writing", 0, 1, "writing artifacts")
    records = []
    for path in matching.write_artifacts(outcome, workdir / "out"):
        if monitor.should_cancel():
            raise matching.Cancelled()
        key = artifact_key(job.id, path.name)
        # Fixed keys: a redelivered job overwrites its own earlier partial output.
        store.put_file(key, path)
        records.append({"name": path.name, "size_bytes": path.stat().st_size, "sha256": sha256_file(path), "object_key": key})
    return {"result": outcome.report, "artifacts": records}


def _ending_of(error: BaseException, job: Job, settings: Settings) -> dict:
    """How a job that raised ends: its final status and, for a failure, a problem the user can act on."""
    if isinstance(error, matching.Cancelled):
        return {"status": "cancelled"}
    if isinstance(error, matching.MatchingError):
        return {"status": "failed", "error": problem("invalid-input", INVALID_INPUT_TITLE, str(error))}
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        detail = (f"The job ran out of memory on {job.request.get('device', 'auto')}. Use a device with more memory, "
                  "fewer checkpoints, or smaller evaluation data; batch_size lowers the memory of activation and STE matching.")
        return {"status": "failed", "error": problem("out-of-memory", "Out of memory", detail, 507)}
    if isinstance(error, SoftTimeLimitExceeded):
        detail = f"The job ran longer than the limit of {settings.job_time_limit_s} s (REBASIN_JOB_TIME_LIMIT_S)."
        return {"status": "failed", "error": problem("time-limit", "The job took too long", detail)}
    detail = f"{type(error).__name__}: {error}"[:2000]
    return {"status": "failed", "error": problem("internal", "The job failed unexpectedly", detail, 500)}


def _execute_job(job_id: str, settings: Settings) -> None:
    db_url = settings.resolved_database_url()
    with session_scope(db_url) as session:
        job = claim_job(session, job_id, settings)
    if job is None:
        return
    job_id_var.set(job_id)
    store = open_store(settings.resolved_artifact_uri(), settings.s3_endpoint_url)
    log.info("job %s: attempt %d started", job_id, job.attempts)
    heartbeat_interval_s = max(0.5, settings.job_heartbeat_timeout_s / 4)
    with JobMonitor(db_url, job_id, heartbeat_interval_s) as monitor, tempfile.TemporaryDirectory(prefix=f"rebasin-{job_id}-") as workdir:
        try:
            output = run_merge(job, store, monitor, Path(workdir), settings)
            if monitor.should_cancel(fresh=True):
                raise matching.Cancelled()
        except Exception as error:
            ending = _ending_of(error, job, settings)
            if ending.get("error", {}).get("status") == 500:
                log.exception("job %s: crashed", job_id)
            # Whatever this attempt already wrote goes: a job that did not succeed has no artifacts.
            for path in Path(workdir, "out").glob("*"):
                store.delete(artifact_key(job_id, path.name))
            if finish_job(db_url, job_id, **ending):
                log_ending(job_id, ending["status"], ending.get("error"))
            return
    progress = {"stage": "done", "completed": 1, "total": 1, "message": "finished"}
    if finish_job(db_url, job_id, status="succeeded", progress=progress, **output):
        log_ending(job_id, "succeeded")


def execute_job(job_id: str, settings: Settings) -> None:
    try:
        _execute_job(job_id, settings)
    finally:
        # After the job's frames and its exception's traceback (which hold its tensors) are gone: the
        # memory it cached goes back to the GPU, and the next job (say, after an OOM) starts with all of it.
        devices.release()


def unfinished_jobs(db_url: str) -> list[tuple[str, str]]:
    """(id, device) of the jobs still queued or running, oldest first."""
    with session_scope(db_url) as session:
        jobs = session.scalars(select(Job).where(Job.status.in_(("queued", "running"))).order_by(Job.created_at))
        return [(job.id, job.request.get("device", "auto")) for job in jobs]
