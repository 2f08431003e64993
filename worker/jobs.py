"""Running one merge job: claim it in the database, run ``matching``, store the artifacts, finish it.

Every state change is a short transaction guarded by the job's current
status, so a redelivered or cancelled job finishes exactly once.
"""

import hashlib
import logging
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file
from sqlalchemy import select, update
from sqlalchemy.orm import Session

import matching
from api.config import Settings
from storage.artifacts import ArtifactStore, open_store
from storage.db import session_scope
from storage.models import Artifact, Checkpoint, Dataset, Job, utcnow

log = logging.getLogger("rebasin.worker")

PROGRESS_INTERVAL_S = 1.0


def problem(kind: str, title: str, detail: str) -> dict:
    return {"type": f"https://rebasin.dev/problems/{kind}", "title": title, "status": 422, "detail": detail}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/{name}"


def claim_job(session: Session, job_id: str, max_attempts: int) -> Job | None:
    """Mark the job running and count the attempt; None when there is nothing to run."""
    job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
    if job is None or job.status not in ("queued", "running"):
        return None
    if job.cancel_requested:
        job.status, job.finished_at = "cancelled", utcnow()
        session.commit()
        return None
    if job.attempts >= max_attempts:
        # Each delivery that got this far and never finished took its worker down with it.
        job.status, job.finished_at = "failed", utcnow()
        job.error = problem(
            "worker-lost",
            "The job stopped its worker too many times",
            f"The job was started {job.attempts} times and its worker process died each time "
            "(for example out of memory). Try a smaller model, fewer checkpoints or another device.",
        )
        session.commit()
        return None
    job.status, job.attempts, job.started_at = "running", job.attempts + 1, utcnow()
    job.progress = {"stage": "loading", "completed": 0, "total": 0, "message": "loading inputs"}
    session.commit()
    return job


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
        return bool(updated)


class JobMonitor:
    """Progress reports and cancellation checks, throttled to about one database round trip a second."""

    def __init__(self, db_url: str, job_id: str):
        self.db_url, self.job_id = db_url, job_id
        self.last_write = self.last_check = float("-inf")
        self.cancel_requested = False

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
    """Load the inputs, merge, upload the artifacts; returns their records."""
    request = job.request
    with session_scope(settings.resolved_database_url()) as session:
        checkpoints = {c.id: c for c in session.scalars(select(Checkpoint).where(Checkpoint.id.in_(request["checkpoints"])))}
        dataset_ids = [i for i in (request.get("dataset"), request.get("eval_dataset")) if i]
        datasets = {d.id: d for d in session.scalars(select(Dataset).where(Dataset.id.in_(dataset_ids)))}
    missing = [i for i in request["checkpoints"] if i not in checkpoints]
    missing += [i for i in dataset_ids if i not in datasets]
    if missing:
        raise matching.MatchingError(f"inputs were deleted before the job ran: {', '.join(missing)}")

    states = []
    for position, checkpoint_id in enumerate(request["checkpoints"]):
        monitor.progress("loading", position, len(request["checkpoints"]), f"loading checkpoint {checkpoint_id}")
        states.append(load_file(_download(store, checkpoints[checkpoint_id].object_key, workdir)))

    def dataset_path(dataset_id: str | None) -> Path | None:
        return _download(store, datasets[dataset_id].object_key, workdir) if dataset_id else None

    device = request.get("device") or "auto"
    outcome = matching.merge_checkpoints(
        states,
        method=request["method"],
        architecture=request.get("architecture"),
        permutation_spec=request.get("permutation_spec"),
        dataset=dataset_path(request.get("dataset")),
        eval_dataset=dataset_path(request.get("eval_dataset")),
        options=request.get("options") or {},
        device=settings.worker_device if device == "auto" else device,
        progress=monitor.progress,
        should_cancel=monitor.should_cancel,
    )
    del states

    monitor.progress("writing", 0, 1, "writing artifacts")
    records = []
    for path in matching.write_artifacts(outcome, workdir / "out"):
        key = artifact_key(job.id, path.name)
        # Fixed keys: a redelivered job overwrites its own earlier partial output.
        store.put_file(key, path)
        records.append({"name": path.name, "size_bytes": path.stat().st_size, "sha256": sha256_file(path), "object_key": key})
    return {"result": outcome.report, "artifacts": records}


def execute_job(job_id: str, settings: Settings) -> None:
    db_url = settings.resolved_database_url()
    with session_scope(db_url) as session:
        job = claim_job(session, job_id, settings.job_max_attempts)
    if job is None:
        return
    store = open_store(settings.resolved_artifact_uri(), settings.s3_endpoint_url)
    monitor = JobMonitor(db_url, job_id)
    log.info("job %s: attempt %d started", job_id, job.attempts)
    with tempfile.TemporaryDirectory(prefix=f"rebasin-{job_id}-") as workdir:
        try:
            output = run_merge(job, store, monitor, Path(workdir), settings)
        except matching.Cancelled:
            _discard_artifacts(store, job_id, [path.name for path in Path(workdir, "out").glob("*")])
            finish_job(db_url, job_id, status="cancelled")
            log.info("job %s: cancelled", job_id)
            return
        except matching.MatchingError as error:
            finish_job(db_url, job_id, status="failed", error=problem("invalid-input", "The inputs cannot be merged", str(error)))
            log.info("job %s: failed: %s", job_id, error)
            return
        except Exception as error:
            log.exception("job %s: crashed", job_id)
            detail = f"{type(error).__name__}: {error}"[:2000]
            finish_job(db_url, job_id, status="failed", error=problem("internal", "The job failed unexpectedly", detail))
            return
    if monitor.should_cancel(fresh=True):
        _discard_artifacts(store, job_id, [a["name"] for a in output["artifacts"]])
        finish_job(db_url, job_id, status="cancelled")
        return
    progress = {"stage": "done", "completed": 1, "total": 1, "message": "finished"}
    finish_job(db_url, job_id, status="succeeded", progress=progress, **output)
    log.info("job %s: succeeded", job_id)


def _discard_artifacts(store: ArtifactStore, job_id: str, names: list[str]) -> None:
    for name in names:
        store.delete(artifact_key(job_id, name))


def unfinished_jobs(db_url: str) -> list[tuple[str, str]]:
    """(id, device) of the jobs still queued or running, oldest first."""
    with session_scope(db_url) as session:
        jobs = session.scalars(select(Job).where(Job.status.in_(("queued", "running"))).order_by(Job.created_at))
        return [(job.id, job.request.get("device", "auto")) for job in jobs]
