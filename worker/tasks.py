"""Celery tasks and the worker's background duties."""

import logging
import os
import threading
import time

from celery.signals import worker_process_init, worker_ready, worker_shutdown
from sqlalchemy import select

from core.config import get_settings
from storage.db import DATABASE_UNAVAILABLE, session_scope
from storage.models import Job
from worker import callbacks, devices
from worker.app import celery_app
from worker.imports import requeue_lost_imports, run_import
from worker.jobs import execute_job, job_payload, requeue_lost_jobs
from worker.mlflow_export import export_job

log = logging.getLogger("rebasin.worker")
_stop_sweeping = threading.Event()
_sweeper: list[threading.Thread] = []


@celery_app.task(name="rebasin.run_job")
def run_job(job_id: str) -> None:
    execute_job(job_id, get_settings())


@celery_app.task(name="rebasin.run_import")
def run_checkpoint_import(import_id: str) -> None:
    run_import(import_id, get_settings())


@celery_app.task(name="rebasin.export_job")
def export_job_to_mlflow(job_id: str, option: dict) -> None:
    export_job(job_id, option, get_settings())


@celery_app.task(
    name="rebasin.deliver_callback",
    autoretry_for=(Exception,),
    dont_autoretry_for=(callbacks.CallbackRefused,),
    retry_backoff=2,
    retry_backoff_max=600,
    max_retries=8,
    acks_late=False,
)
def deliver_callback(job_id: str) -> None:
    settings = get_settings()
    with session_scope(settings.resolved_database_url()) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        if job is None or not job.request.get("callback_url") or not settings.callback_secret:
            return
        url, payload = job.request["callback_url"], job_payload(job)
    callbacks.deliver(url, payload, settings.callback_secret, settings.callback_allow_private)
    log.info("job %s: callback delivered to %s", job_id, url)


def _register(settings, name: str) -> None:
    # `rebasin worker` resolved the device (auto -> cpu or cuda:0) into the settings before starting us.
    try:
        devices.register(settings.resolved_database_url(), name, settings.worker_device, settings.job_heartbeat_timeout_s)
    except Exception:
        log.exception("could not register this worker's device in the workers table")


def _sweep_stale_jobs(name: str) -> None:
    settings = get_settings()
    _register(settings, name)
    database_back_at = time.monotonic()
    while not _stop_sweeping.wait(settings.job_sweep_interval_s):
        _register(settings, name)
        # After an outage every holder's heartbeat is late; give them a heartbeat timeout to beat again
        # before their jobs count as lost (else a job would run twice).
        release_stale = time.monotonic() - database_back_at >= settings.job_heartbeat_timeout_s
        try:
            for job_id in requeue_lost_jobs(settings, release_stale=release_stale):
                log.warning("job %s: lost by its worker or the broker; queued again", job_id)
            for import_id in requeue_lost_imports(settings, release_stale=release_stale):
                log.warning("import %s: lost by its worker or the broker; queued again", import_id)
        except DATABASE_UNAVAILABLE as error:
            database_back_at = float("inf")
            log.warning("stale-job sweep: database unreachable (%s)", type(error.orig or error).__name__)
        except Exception as error:
            # A broker outage: the next sweep, once it is back, does the work.
            log.warning("stale-job sweep failed: %s: %s", type(error).__name__, error)
        else:
            database_back_at = min(database_back_at, time.monotonic())


@worker_ready.connect
def _start_sweeper(**_) -> None:
    # Covers a worker killed as a whole (no parent left to hand its job back to the broker), and
    # a broker that lost its messages. Every worker sweeps: the work is idempotent.
    _sweeper.append(threading.Thread(target=_sweep_stale_jobs, args=(devices.worker_name(),), name="stale-job-sweeper", daemon=True))
    _sweeper[0].start()


@worker_process_init.connect
def _announce_device(**_) -> None:
    # In the pool process that runs the jobs: CUDA may be initialised here, not in the parent.
    log.info("worker process %d runs jobs on %s", os.getpid(), devices.describe(get_settings().worker_device))


@worker_shutdown.connect
def _stop_sweeper(**_) -> None:
    _stop_sweeping.set()
    for thread in _sweeper:
        thread.join(timeout=30)  # so that it cannot register this worker again after we remove it
    try:
        devices.unregister(get_settings().resolved_database_url(), devices.worker_name())
    except Exception:
        log.exception("could not remove this worker from the workers table")
