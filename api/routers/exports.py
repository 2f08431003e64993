"""Exports of a succeeded job's results to MLflow: ``POST /v1/jobs/{id}/exports`` (after the merge's own
export failed, or to log it elsewhere). The worker does the export and records it in the job's result."""

from fastapi import APIRouter, Body

from api.deps import SessionDep, SettingsDep, TenantDep
from api.openapi import problems
from api.problems import Problem, not_found
from core.config import Settings
from core.schemas import JobOut, MlflowExport
from storage import mlflow_io
from storage.models import Job
from worker.mlflow_export import enqueue_export

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def check_mlflow(settings: Settings) -> None:
    """The mlflow option needs the extra installed and a tracking server configured: else a 422 at once."""
    if not settings.mlflow_tracking_uri:
        raise Problem(422, "MLflow unavailable", "This server has no MLflow tracking server (REBASIN_MLFLOW_TRACKING_URI).",
                      kind="mlflow-unavailable")
    if not mlflow_io.available():
        raise Problem(422, "MLflow unavailable", "MLflow is not installed on this server (pip install 'rebasin[mlflow]').",
                      kind="mlflow-unavailable")


@router.post("/{job_id}/exports", status_code=202, response_model=JobOut, summary="Export a succeeded job to MLflow (again)",
             responses=problems(409, on_409="The job has not succeeded"))
def export_job(job_id: str, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
               body: MlflowExport | None = Body(None, description="default: the job's own mlflow option")):
    job = session.get(Job, job_id)
    if job is None or job.tenant != tenant:
        raise not_found("job", job_id)
    option = body.model_dump(exclude_none=True) if body is not None else job.request.get("mlflow")
    if option is None:
        raise Problem(422, "Invalid request", "The job has no mlflow option: send {\"experiment\": ...}.", kind="validation")
    check_mlflow(settings)
    if job.status != "succeeded":
        raise Problem(409, "Job not exportable", f"Job {job_id!r} is {job.status}; only succeeded jobs are exported.",
                      kind="not-exportable")
    enqueue_export(job.id, option)
    return job
