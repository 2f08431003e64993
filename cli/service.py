"""`rebasin serve`, `rebasin worker` and `rebasin db`: running the service."""

import contextlib
import gc
import logging
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import uvicorn

from core.config import Settings, get_settings
from core.logs import configure_logging
from cli.errors import UsageError


def _settings(args) -> Settings:
    if getattr(args, "data_dir", None):
        os.environ["REBASIN_DATA_DIR"] = str(args.data_dir)
    get_settings.cache_clear()
    settings = get_settings()
    try:
        settings.tenant_keys()
    except ValueError as error:
        raise UsageError(str(error)) from None
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
        raise UsageError(
            f"the database schema is at revision {current or 'none'}, this version needs {head}: "
            "run `rebasin db upgrade` first."
        )


def _has_managed_keys(settings: Settings) -> bool:
    from sqlalchemy import select

    from storage.db import session_scope
    from storage.models import ApiKey

    with session_scope(settings.resolved_database_url()) as session:
        return session.scalar(select(ApiKey.id).limit(1)) is not None


WORKER_STOP_TIMEOUT_S = 1.0


def _listen(host: str, port: int) -> socket.socket:
    """Bind the port before anything else starts, so that a port in use is an error, not a half-started server."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(args) -> None:
    from api.main import create_app
    from worker.app import configure_celery, enqueue_job
    from worker.jobs import unfinished_jobs

    settings = _settings(args)
    configure_logging(args.log_level, settings.log_format)
    sock = _listen(args.host, args.port)
    prepare_database(settings)
    if not _is_loopback(args.host) and not (settings.tenant_keys() or settings.oidc_issuer or _has_managed_keys(settings)):
        raise UsageError(
            f"refusing to serve on {args.host} without API keys; set REBASIN_API_KEYS "
            "(tenant:key pairs), create one with `rebasin keys create`, set REBASIN_OIDC_ISSUER, or bind a loopback address."
        )
    worker = None
    embedded_broker = settings.broker_url is None
    if embedded_broker and not args.no_worker:
        configure_celery(settings)
        # The filesystem queue forgets a message once taken: re-queue what a dead process left unfinished.
        for job_id, device in unfinished_jobs(settings.resolved_database_url()):
            enqueue_job(job_id, device)
        worker_command = ["worker", "--concurrency", "1", "--log-level", args.log_level, "--exit-with-parent", str(os.getpid())]
        # Its own session: a Ctrl-C in the terminal reaches only us, and we stop the worker in order
        # (a signal straight to its pool processes can leave the pool deadlocked).
        worker = subprocess.Popen([sys.executable, "-m", "cli", *worker_command], env=os.environ.copy(), start_new_session=True)
    app = create_app(settings)
    # torch and friends leave ~10^6 long-lived objects: keeping them out of the collector's
    # full passes removes pauses of a few hundred ms from the request latency tail.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    # log_config=None: uvicorn's loggers keep ours (one format); an idle server stops at once, and
    # open connections (event streams) get 1 s to finish.
    server = _Server(uvicorn.Config(app, log_config=None, log_level=args.log_level, timeout_graceful_shutdown=1))
    print(f"rebasin: serving on http://{args.host}:{args.port} (API docs at /docs)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        if worker is not None:
            _stop_worker(worker)
    logging.shutdown()
    os._exit(0)  # the interpreter's teardown of torch's heap takes seconds: Ctrl-C should not


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal that stopped it; SIGTERM would then kill us before the worker is stopped.
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def _stop_worker(worker: subprocess.Popen) -> None:
    """Ask for a warm shutdown, which an idle worker finishes within about a second. A running job is
    not waited for: it stays ``running`` in the database, and the next ``rebasin serve`` queues it again
    (its holder is gone), as after a crash."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=WORKER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logging.getLogger("rebasin.worker").info("stopping the worker now; a running job resumes at the next start")
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


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
    configure_logging(args.log_level, settings.log_format)
    from celery.apps import worker as celery_worker_module
    from celery.signals import setup_logging

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

    setup_logging.connect(lambda **_: None, weak=False)  # a receiver: Celery leaves logging alone
    # Celery prints its shutdown notices straight to the terminal: make them log lines like the rest.
    celery_worker_module.safe_say = lambda message, *_: logging.getLogger("celery.apps.worker").info(message.strip())

    app = configure_celery(settings)
    from worker import memory

    memory.jobs_at_once = args.concurrency  # the pool processes fork after this: each job gets its share
    if args.exit_with_parent:
        _exit_with_parent(args.exit_with_parent)
    logging.getLogger("rebasin.worker").info("worker starting on device %s", device)
    queues = args.queues or {"cpu": "default,cpu", "cuda": "default,gpu"}[device.split(":")[0]]
    app.worker_main(
        [
            "--quiet",  # no banner
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
    logging.getLogger("rebasin.worker").info("worker stopped")
    logging.shutdown()
    # Skip the interpreter's teardown of torch's heap: seconds, for nothing.
    os._exit(0)


def cmd_db_upgrade(args) -> None:
    from storage import db

    settings = _settings(args)
    db.upgrade(settings.resolved_database_url())
    print("rebasin: database schema is up to date")
