"""A succeeded job's results into MLflow (the job option ``mlflow``): after the merge, and again on request
(``POST /v1/jobs/{id}/exports``). MLflow being away never fails the merge: the result then records the
error and a warning, and the export can be retried."""

import logging
import tempfile
from pathlib import Path

from sqlalchemy import select

from core.config import Settings
from storage import mlflow_io
from storage.artifacts import open_store
from storage.db import session_scope
from storage.models import Job
from worker.app import celery_app

log = logging.getLogger("rebasin.worker")
EXPORTED_ARTIFACTS = ("report.json", "barrier.png", "permutation.json", "merged.safetensors")


def export_fields(job_id: str, request: dict, result: dict, option: dict, files: dict[str, Path], settings: Settings) -> dict:
    """The result's ``mlflow`` entry (and ``warnings``) after one try at exporting."""
    warnings = [w for w in result.get("warnings") or [] if not w.startswith("MLflow export failed")]
    try:
        if not (settings.mlflow_tracking_uri and mlflow_io.available()):
            raise RuntimeError("this worker has no MLflow (REBASIN_MLFLOW_TRACKING_URI and the rebasin[mlflow] extra)")
        exported = mlflow_io.log_job(settings.mlflow_tracking_uri, option["experiment"], option.get("register_as"),
                                     job_id, request, result, files)
    except Exception as error:
        message = f"{type(error).__name__}: {error}"[:1000]
        log.warning("job %s: MLflow export failed: %s", job_id, message)
        detail = f"MLflow export failed ({message}); retry it with POST /v1/jobs/{job_id}/exports"
        return {"mlflow": {"error": message, "experiment": option["experiment"]}, "warnings": warnings + [detail]}
    log.info("job %s: logged to MLflow as run %s", job_id, exported["run_id"])
    return {"mlflow": exported, "warnings": warnings or None}


def export_after_merge(job: Job, output: dict, out_dir: Path, settings: Settings) -> None:
    """With the ``mlflow`` option: log the fresh result and artifacts; the outcome goes into ``output['result']``."""
    option = job.request.get("mlflow")
    if not option:
        return
    files = {path.name: path for path in out_dir.iterdir() if path.name in EXPORTED_ARTIFACTS}
    output["result"] = output["result"] | export_fields(job.id, job.request, output["result"], option, files, settings)


def export_job(job_id: str, option: dict, settings: Settings) -> None:
    """Export a succeeded job again, from its stored artifacts; its result records the outcome."""
    db_url = settings.resolved_database_url()
    with session_scope(db_url) as session:
        job = session.scalar(select(Job).where(Job.id == job_id, Job.status == "succeeded"))
        if job is None:
            return
        request, result = dict(job.request), dict(job.result or {})
        keys = {a.name: a.object_key for a in job.artifacts if a.name in EXPORTED_ARTIFACTS}
    store = open_store(settings.resolved_artifact_uri(), settings.s3_endpoint_url, settings.s3_max_attempts)
    with tempfile.TemporaryDirectory(prefix=f"rebasin-export-{job_id}-") as workdir:
        files = {}
        for name, key in keys.items():
            files[name] = store.local_path(key) or Path(workdir, name)
            if store.local_path(key) is None:
                store.get_file(key, files[name])
        fields = export_fields(job_id, request, result, option, files, settings)
    with session_scope(db_url) as session:
        job = session.get(Job, job_id, with_for_update=True)
        job.result = dict(job.result or {}) | fields
        session.commit()


def enqueue_export(job_id: str, option: dict) -> None:
    celery_app.send_task("rebasin.export_job", args=[job_id, option], queue="default")
