from api.config import get_settings
from worker.app import celery_app
from worker.jobs import execute_job


@celery_app.task(name="rebasin.run_job")
def run_job(job_id: str) -> None:
    execute_job(job_id, get_settings())
