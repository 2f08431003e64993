"""The Celery application: one task, one job. Broker settings come from ``Settings``."""

from celery import Celery

from core.config import Settings

celery_app = Celery("rebasin", include=["worker.tasks"])

QUEUE_FOR_DEVICE = {"auto": "default", "cpu": "cpu", "cuda": "gpu"}


def configure_celery(settings: Settings) -> Celery:
    if settings.broker_url:
        broker_url = settings.broker_url
        # Unacknowledged jobs come back only after this long; it must exceed the longest job.
        transport_options = {"visibility_timeout": 24 * 3600}
    else:
        queue_dir = (settings.data_dir / "broker").resolve()
        (queue_dir / "queue").mkdir(parents=True, exist_ok=True)
        broker_url = "filesystem://"
        transport_options = {
            "data_folder_in": str(queue_dir / "queue"),
            "data_folder_out": str(queue_dir / "queue"),
            # Its exchange table: by default ./control, in whatever directory the process started in.
            "control_folder": str(queue_dir / "control"),
            "store_processed": False,
        }
    celery_app.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue="default",
        task_ignore_result=True,
        # Long jobs on GPUs: take one job at a time, acknowledge it only once it is done,
        # and hand it back when the process running it dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=settings.broker_url is not None,
        task_soft_time_limit=settings.job_time_limit_s,
        task_time_limit=settings.job_time_limit_s + 60,
        worker_max_memory_per_child=settings.worker_max_memory_per_child_mb * 1024 or None,
        # Logging is ours (core.logs, one format for every process), not Celery's.
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return celery_app


def queue_for(device: str) -> str:
    return QUEUE_FOR_DEVICE.get(device.split(":")[0], "default")


def enqueue_job(job_id: str, device: str) -> None:
    celery_app.send_task("rebasin.run_job", args=[job_id], queue=queue_for(device))


def enqueue_callback(job_id: str) -> None:
    celery_app.send_task("rebasin.deliver_callback", args=[job_id], queue="default")
