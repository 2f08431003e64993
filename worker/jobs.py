"""Running one merge job: claim it in the database, run ``matching``, store the artifacts, finish it.

Every state change is a short transaction guarded by the job's current
status, so a redelivered or cancelled job finishes exactly once.
"""

import errno
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from billiard.exceptions import SoftTimeLimitExceeded
import torch
from safetensors.torch import load_file
from sqlalchemy import select, update
from sqlalchemy.orm import Session

import matching
from core.config import Settings
from core.logs import job_id_var
from core.schemas import JobOut
from matching.folders import FOLDER_FORMAT, read_stored_layout
from matching.memory import PeakSampler
from storage.artifacts import ArtifactStore, open_store, sha256_file
from storage.db import DATABASE_UNAVAILABLE, session_scope
from storage.models import Artifact, Checkpoint, Dataset, Job, utcnow
from worker import devices, memory
from worker.app import enqueue_callback, enqueue_job, queue_for
from worker.dispatch import next_job_id, send_missing_messages
from worker.mlflow_export import export_after_merge

log = logging.getLogger("rebasin.worker")

PROGRESS_INTERVAL_S = 1.0
INVALID_INPUT_TITLE = "The inputs cannot be merged"  # at submission (422) and when the job runs (its error)
# How long a worker waits for an unreachable database before it gives up on a step (the sweep recovers).
DATABASE_PATIENCE_S = 300.0
# No space left, disk quota exceeded, file size limit: all mean the scratch disk cannot take the job.
OUT_OF_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# After its scratch disk ran out, a worker waits this long before it takes another job.
OUT_OF_DISK_PAUSE_S = 10.0
T = TypeVar("T")


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


def while_database_down(action: Callable[[], T], what: str, give_up_after_s: float = DATABASE_PATIENCE_S) -> T:
    """Run a database action, waiting (with backoff) while the database is unreachable: the worker
    pauses through an outage instead of losing the job it holds."""
    deadline, delay = time.monotonic() + give_up_after_s, 0.5
    while True:
        try:
            return action()
        except DATABASE_UNAVAILABLE as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unreachable (%s); retrying in %.1f s", what, type(error.orig or error).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def release_if_abandoned(session: Session, job_id: str, settings: Settings) -> Job | None:
    """Put a running job whose process is gone back in the queue (its message came back after a crash);
    returns the job, or None if there is none."""
    job = session.get(Job, job_id)
    if job is not None and job.status == "running" and not _holder_alive(job, settings.job_heartbeat_timeout_s):
        _release(session, job)
        session.commit()
    return job


def _release(session: Session, job: Job) -> bool:
    # Guarded by the heartbeat we saw: if the holder beat meanwhile, it is alive after all.
    same_beat = Job.heartbeat_at.is_(None) if job.heartbeat_at is None else Job.heartbeat_at == job.heartbeat_at
    progress = {"stage": "queued", "completed": 0, "total": 0, "message": "waiting for a worker (the previous one was lost)"}
    return bool(
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "running", same_beat)
            .values(status="queued", claimed_by=None, enqueued_at=None, progress=progress)
        ).rowcount
    )


def claim_next_job(settings: Settings, queue: str) -> Job | None:
    """Take the job the database says runs next in this queue: mark it running and count the attempt.
    None when nothing is waiting. Cancelled and exhausted jobs met on the way are ended, not run."""
    for _ in range(1000):
        with session_scope(settings.resolved_database_url()) as session:
            job_id = next_job_id(session, queue)
            if job_id is None:
                return None
            job = session.get(Job, job_id)
            now = utcnow()
            if job.cancel_requested:
                values = {"status": "cancelled", "finished_at": now}
            elif job.attempts >= settings.job_max_attempts:
                # Each delivery that got this far and never finished took its worker down with it.
                values = {"status": "failed", "finished_at": now, "error": problem(
                    "worker-lost",
                    "The job stopped its worker too many times",
                    f"The job was started {job.attempts} times and its worker process died each time "
                    "(for example out of memory). Try a smaller model, fewer checkpoints or another device.",
                )}
            else:
                values = {"status": "running", "attempts": job.attempts + 1, "claimed_by": this_process(),
                          "started_at": now, "heartbeat_at": now,
                          "progress": {"stage": "loading", "completed": 0, "total": 0, "message": "loading inputs"}}
            # Only one claimer wins the conditional update; a loser looks again.
            won = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(**values)).rowcount
            session.commit()
            if not won:
                continue
            job = session.get(Job, job_id, populate_existing=True)
            if job.status == "running":
                return job
            log_ending(job.id, job.status, job.error)
            _announce_end(job)
    return None


def finish_job(db_url: str, job_id: str, holder: str | None = None, **values) -> bool:
    """Move a running job to its final state; False if it was no longer running (or, with ``holder``,
    no longer held by that process: it was handed to another worker meanwhile)."""

    def finish() -> bool:
        with session_scope(db_url) as session:
            artifacts = values.get("artifacts", [])
            fields = {k: v for k, v in values.items() if k != "artifacts"}
            held = Job.claimed_by == holder if holder is not None else Job.id.is_not(None)
            updated = session.execute(
                update(Job).where(Job.id == job_id, Job.status == "running", held).values(finished_at=utcnow(), **fields)
            ).rowcount
            if not updated:
                # Our own earlier try may have committed before its connection broke (the reply was lost).
                current = session.get(Job, job_id)
                if not (current and holder is not None and current.claimed_by == holder and current.status == fields.get("status")):
                    return False
            else:
                session.add_all(Artifact(job_id=job_id, **artifact) for artifact in artifacts)
                session.commit()
            _announce_end(session.get(Job, job_id))
            return True

    return while_database_down(finish, f"job {job_id}: finishing")


def requeue_lost_jobs(settings: Settings, release_stale: bool = True) -> list[str]:
    """Queue again the jobs the broker lost: running ones whose worker is gone (no heartbeat for
    job_heartbeat_timeout_s, or a dead process on this host), and queued ones without a broker
    message (Redis restarted empty, a crash between commit and send). ``release_stale=False`` spares
    jobs whose heartbeats are merely late (the database was away: their holders could not beat)."""
    released = []
    with session_scope(settings.resolved_database_url()) as session:
        for job in session.scalars(select(Job).where(Job.status == "running")).all():
            alive = _holder_alive(job, settings.job_heartbeat_timeout_s if release_stale else 1e9)
            if not alive and _release(session, job):
                released.append(job.id)
        session.commit()
        return released + [i for i in send_missing_messages(session) if i not in released]


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
            except DATABASE_UNAVAILABLE as error:
                log.warning("job %s: heartbeat not recorded, database unreachable (%s)", self.job_id, type(error.orig or error).__name__)
            except Exception:
                log.exception("job %s: heartbeat failed", self.job_id)

    def _read_cancel_flag(self, session: Session) -> None:
        self.cancel_requested = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        self.last_check = time.monotonic()

    def progress(self, stage: str, completed: int, total: int, message: str = "") -> None:
        if time.monotonic() - self.last_write < PROGRESS_INTERVAL_S and completed < total:
            return
        self.last_write = time.monotonic()
        try:
            with session_scope(self.db_url) as session:
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.status == "running")
                    .values(progress={"stage": stage, "completed": completed, "total": total, "message": message})
                )
                self._read_cancel_flag(session)
                session.commit()
        except DATABASE_UNAVAILABLE:
            # Progress is a courtesy: the job goes on through a database outage and reports at the end.
            log.warning("job %s: progress not recorded, database unreachable", self.job_id)

    def should_cancel(self, fresh: bool = False) -> bool:
        if fresh or time.monotonic() - self.last_check >= PROGRESS_INTERVAL_S:
            read = lambda: self._read_cancel_flag_now()
            if fresh:
                while_database_down(read, f"job {self.job_id}: reading the cancel flag")
            else:
                try:
                    read()
                except DATABASE_UNAVAILABLE:
                    self.last_check = time.monotonic()
        return self.cancel_requested

    def _read_cancel_flag_now(self) -> None:
        with session_scope(self.db_url) as session:
            self._read_cancel_flag(session)


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
    dataset_ids = [i for i in (request.get("dataset"), request.get("eval_dataset")) if i]

    def read_inputs() -> tuple[dict, dict]:
        with session_scope(settings.resolved_database_url()) as session:
            return (
                {c.id: c for c in session.scalars(select(Checkpoint).where(Checkpoint.id.in_(request["checkpoints"])))},
                {d.id: d for d in session.scalars(select(Dataset).where(Dataset.id.in_(dataset_ids)))},
            )

    checkpoints, datasets = while_database_down(read_inputs, f"job {job.id}: reading inputs")
    missing = [i for i in request["checkpoints"] + dataset_ids if i not in checkpoints and i not in datasets]
    if missing:
        raise matching.MatchingError(f"inputs were deleted before the job ran: {', '.join(missing)}")
    # Before anything is loaded: a job that cannot fit fails now, not at the hands of the OOM killer.
    estimate, budget, source = memory.check_fits(request, checkpoints, datasets, settings)
    with PeakSampler() as sampler:
        output = _merge_and_upload(job, store, monitor, workdir, settings, checkpoints, datasets)
    output["result"]["memory"] = {"estimated_peak_bytes": estimate.peak_bytes, "measured_peak_bytes": sampler.peak_bytes,
                                  "baseline_bytes": sampler.start_bytes, "worker_budget_bytes": budget,
                                  "budget_source": source}
    log.info("job %s: peak memory %.0f MiB (estimated %.0f MiB, budget %.0f MiB)", job.id, sampler.peak_bytes / 2**20,
             estimate.peak_bytes / 2**20, budget / 2**20)
    return output


def _merge_and_upload(job: Job, store: ArtifactStore, monitor: JobMonitor, workdir: Path, settings: Settings,
                      checkpoints: dict, datasets: dict) -> dict:
    request = job.request
    states, layouts = [], []
    for position, checkpoint_id in enumerate(request["checkpoints"]):
        monitor.progress("loading", position, len(request["checkpoints"]), f"loading checkpoint {checkpoint_id}")
        path = _download(store, checkpoints[checkpoint_id].object_key, workdir)
        states.append(load_file(path))
        # A model folder is stored as one safetensors file holding its layout (config.json, shards).
        layouts.append(read_stored_layout(path) if checkpoints[checkpoint_id].format == FOLDER_FORMAT else None)

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
        configs=[layout.config if layout is not None else None for layout in layouts],
    )
    del states

    monitor.progress("writing", 0, 1, "writing artifacts")
    records = []
    # Model-folder inputs give model-folder outputs (aligned.tar, merged.tar), laid out as checkpoint A.
    for path in matching.write_artifacts(outcome, workdir / "out", layout=layouts[0]):
        if monitor.should_cancel():
            raise matching.Cancelled()
        key = artifact_key(job.id, path.name)
        # Fixed keys: a redelivered job overwrites its own earlier partial output.
        store.put_file(key, path)
        records.append({"name": path.name, "size_bytes": path.stat().st_size, "sha256": sha256_file(path), "object_key": key})
    return {"result": outcome.report, "artifacts": records}


def _out_of_disk(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in OUT_OF_DISK_ERRNOS
    # Libraries with native writers (safetensors) report the OS error only in their message.
    return any(f"(os error {code})" in str(error) for code in OUT_OF_DISK_ERRNOS)


def _ending_of(error: BaseException, job: Job, settings: Settings) -> dict:
    """How a job that raised ends: its final status and, for a failure, a problem the user can act on."""
    if isinstance(error, matching.Cancelled):
        return {"status": "cancelled"}
    if isinstance(error, matching.MatchingError):
        return {"status": "failed", "error": problem("invalid-input", INVALID_INPUT_TITLE, str(error))}
    if isinstance(error, memory.MemoryBudgetExceeded):
        return {"status": "failed", "error": {**problem("memory-budget", "The job needs more memory than the worker has",
                                                        memory.budget_detail(error), 507),
                                              "estimated_peak_bytes": error.estimate.peak_bytes,
                                              "worker_budget_bytes": error.budget_bytes}}
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        detail = (f"The job ran out of memory on {job.request.get('device', 'auto')}. Use a device with more memory, "
                  "fewer checkpoints, or smaller evaluation data; batch_size lowers the memory of activation and STE matching.")
        return {"status": "failed", "error": problem("out-of-memory", "Out of memory", detail, 507)}
    if _out_of_disk(error):
        detail = (f"The job ran out of disk space in each of its {job.attempts} attempts, while writing "
                  f"{getattr(error, 'filename', None) or 'its scratch files'} ({error}). Its scratch files were removed; "
                  "submit it again later. Operators: "
                  f"free space in or enlarge the worker's scratch directory ({tempfile.gettempdir()}, set by TMPDIR).")
        return {"status": "failed", "error": problem("out-of-disk", "Out of disk space", detail, 507)}
    if isinstance(error, SoftTimeLimitExceeded):
        detail = f"The job ran longer than the limit of {settings.job_time_limit_s} s (REBASIN_JOB_TIME_LIMIT_S)."
        return {"status": "failed", "error": problem("time-limit", "The job took too long", detail)}
    detail = f"{type(error).__name__}: {error}"[:2000]
    return {"status": "failed", "error": problem("internal", "The job failed unexpectedly", detail, 500)}


def _execute_job(job_id: str, settings: Settings) -> None:
    """Run the job the database picks next in the queue of ``job_id`` (the job a broker message named):
    usually that job, but another tenant's when that tenant has waited longer."""
    db_url = settings.resolved_database_url()

    def prepare() -> str:
        with session_scope(db_url) as session:
            named = release_if_abandoned(session, job_id, settings)
            return queue_for((named.request.get("device") if named else None) or "auto")

    queue = while_database_down(prepare, f"job {job_id}: looking up")
    job = while_database_down(lambda: claim_next_job(settings, queue), f"queue {queue}: claiming a job")
    if job is None:
        return
    run_claimed_job(job, settings)


def _delete_outputs(store: ArtifactStore, job_id: str, workdir: Path | None) -> None:
    for path in Path(workdir or "/nonexistent", "out").glob("*"):
        store.delete(artifact_key(job_id, path.name))


def _holds(db_url: str, job: Job) -> bool:
    def read() -> bool:
        with session_scope(db_url) as session:
            return session.scalar(select(Job.claimed_by).where(Job.id == job.id, Job.status == "running")) == job.claimed_by

    return while_database_down(read, f"job {job.id}: checking ownership")


def _hand_back(db_url: str, job_id: str) -> None:
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        if job is not None and _release(session, job):
            session.commit()


def run_claimed_job(job: Job, settings: Settings) -> None:
    if _run_claimed_job(job, settings) == "out-of-disk":
        # Step aside for a while, so that a worker with room takes the job (and the next ones).
        time.sleep(OUT_OF_DISK_PAUSE_S)


def _run_claimed_job(job: Job, settings: Settings) -> str:
    db_url, job_id = settings.resolved_database_url(), job.id
    job_id_var.set(job_id)
    store = open_store(settings.resolved_artifact_uri(), settings.s3_endpoint_url, settings.s3_max_attempts)
    log.info("job %s: attempt %d started", job_id, job.attempts)
    heartbeat_interval_s = max(0.5, settings.job_heartbeat_timeout_s / 4)
    with JobMonitor(db_url, job_id, heartbeat_interval_s) as monitor:
        workdir = None
        try:
            # Inside the try: a full scratch disk may refuse even the directory.
            workdir = Path(tempfile.mkdtemp(prefix=f"rebasin-{job_id}-"))
            output = run_merge(job, store, monitor, workdir, settings)
            export_after_merge(job, output, workdir / "out", settings)
            if monitor.should_cancel(fresh=True):
                raise matching.Cancelled()
        except DATABASE_UNAVAILABLE:
            # The outage outlasted our patience mid-job: the job runs again once the database is back.
            log.warning("job %s: database unreachable; handing the job back", job_id)
            if while_database_down(lambda: _holds(db_url, job), f"job {job_id}: handing back", give_up_after_s=3600):
                _delete_outputs(store, job_id, workdir)
                while_database_down(lambda: _hand_back(db_url, job_id), f"job {job_id}: handing back", give_up_after_s=3600)
            return "handed back"
        except Exception as error:
            if _out_of_disk(error) and job.attempts < settings.job_max_attempts:
                log.warning("job %s: out of disk space in %s (%s); handing the job to another worker", job_id, tempfile.gettempdir(), error)
                if _holds(db_url, job):
                    _delete_outputs(store, job_id, workdir)
                    while_database_down(lambda: _hand_back(db_url, job_id), f"job {job_id}: handing back")
                    enqueue_job(job_id, job.request.get("device") or "auto")
                return "out-of-disk"
            ending = _ending_of(error, job, settings)
            if ending.get("error", {}).get("status") == 500:
                log.exception("job %s: crashed", job_id)
            # Whatever this attempt already wrote goes: a job that did not succeed has no artifacts. Unless the
            # job was handed to another worker meanwhile: the keys are shared, the outputs may be its.
            if _holds(db_url, job):
                _delete_outputs(store, job_id, workdir)
            if finish_job(db_url, job_id, holder=job.claimed_by, **ending):
                log_ending(job_id, ending["status"], ending.get("error"))
            return ending["status"]
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
    progress = {"stage": "done", "completed": 1, "total": 1, "message": "finished"}
    if finish_job(db_url, job_id, holder=job.claimed_by, status="succeeded", progress=progress, **output):
        log_ending(job_id, "succeeded")
    return "succeeded"


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
