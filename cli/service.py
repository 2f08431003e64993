"""`rebasin serve`, `rebasin worker` and `rebasin db`: running the service."""

import gc
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from core.config import Settings, get_settings
from core.logs import configure_logging


def _settings(args) -> Settings:
    if getattr(args, "data_dir", None):
        os.environ["REBASIN_DATA_DIR"] = str(args.data_dir)
    get_settings.cache_clear()
    settings = get_settings()
    try:
        settings.tenant_keys()
    except ValueError as error:
        sys.exit(f"rebasin: {error}")
    return settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_database(settings: Settings) -> None:
    """The embedded database upgrades itself; a real one must already be at the code's schema."""
    from storage import db

    url = settings.resolved_database_url()
    if settings.database_url is None:
        db.upgrade(url)
        return
    current, head = db.schema_status(url)
    if current != head:
        sys.exit(
            f"rebasin: the database schema is at revision {current or 'none'}, this version needs {head}: "
            "run `rebasin db upgrade` first."
        )


def cmd_serve(args) -> None:
    import uvicorn

    from api.main import create_app
    from worker.app import configure_celery, enqueue_job
    from worker.jobs import unfinished_jobs

    settings = _settings(args)
    configure_logging(args.log_level)
    if not settings.tenant_keys() and not _is_loopback(args.host):
        sys.exit(
            f"rebasin: refusing to serve on {args.host} without API keys; set REBASIN_API_KEYS "
            "(tenant:key pairs) or bind a loopback address."
        )
    prepare_database(settings)
    worker = None
    embedded_broker = settings.broker_url is None
    if embedded_broker and not args.no_worker:
        configure_celery(settings)
        # The filesystem queue forgets a message once taken: re-queue what a dead process left unfinished.
        for job_id, device in unfinished_jobs(settings.resolved_database_url()):
            enqueue_job(job_id, device)
        worker_command = ["worker", "--concurrency", "1", "--exit-with-parent", str(os.getpid())]
        # Its own session: a Ctrl-C in the terminal reaches only us, and we stop the worker in order
        # (a signal straight to its pool processes can leave the pool deadlocked).
        worker = subprocess.Popen([sys.executable, "-m", "cli", *worker_command], env=os.environ.copy(), start_new_session=True)
    app = create_app(settings)
    # torch and friends leave ~10^6 long-lived objects: keeping them out of the collector's
    # full passes removes pauses of a few hundred ms from the request latency tail.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    print(f"rebasin: serving on http://{args.host}:{args.port} (API docs at /docs)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)  # warm shutdown: a running job is finished first
            try:
                worker.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)


def _exit_with_parent(parent: int) -> None:
    """Shut down (warmly: the running job is finished first) once the process that started us is gone,
    so that a killed ``rebasin serve`` leaves no worker behind."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def cmd_worker(args) -> None:
    if args.device:
        os.environ["REBASIN_WORKER_DEVICE"] = args.device
    settings = _settings(args)
    configure_logging(args.log_level)
    from worker.devices import DeviceUnavailable, resolve_worker_device

    def usage_error(message: str) -> None:
        print(f"rebasin worker: {message}", file=sys.stderr)
        sys.exit(2)

    def one_job_per_gpu(device: str) -> None:
        if device.startswith("cuda") and args.concurrency != 1:
            usage_error(f"one job at a time per GPU: --concurrency must be 1 on {device} "
                        "(run one worker per GPU, each with its own --device cuda:N)")

    one_job_per_gpu(settings.worker_device)
    try:
        device = resolve_worker_device(settings.worker_device)
    except DeviceUnavailable as error:
        usage_error(f"{error}; start it with --device cpu, or on a machine with that GPU")
    one_job_per_gpu(device)  # auto found a GPU
    # The resolved device (auto -> cpu or cuda:0) is what the pool processes and the workers table see.
    os.environ["REBASIN_WORKER_DEVICE"] = device
    settings = _settings(args)
    from worker.app import configure_celery

    app = configure_celery(settings)
    if args.exit_with_parent:
        _exit_with_parent(args.exit_with_parent)
    logging.getLogger("rebasin.worker").info("worker starting on device %s", device)
    queues = args.queues or {"cpu": "default,cpu", "cuda": "default,gpu"}[device.split(":")[0]]
    app.worker_main(
        [
            "worker",
            f"--queues={queues}",
            f"--concurrency={args.concurrency}",
            f"--loglevel={args.log_level.upper()}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=rebasin-{os.getpid()}@%h",
        ]
    )


def cmd_db_upgrade(args) -> None:
    from storage import db

    settings = _settings(args)
    db.upgrade(settings.resolved_database_url())
    print("rebasin: database schema is up to date")
