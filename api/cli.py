"""The ``rebasin`` command line: serve, worker, db upgrade, merge, and a client for a running server."""

import argparse
import ipaddress
import os
import signal
import subprocess
import sys

from api.config import Settings, get_settings


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
        worker = subprocess.Popen([sys.executable, "-m", "api.cli", "worker", "--concurrency", "1"], env=os.environ.copy())
    print(f"rebasin: serving on http://{args.host}:{args.port} (API docs at /docs)", flush=True)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()


def cmd_worker(args) -> None:
    if args.device:
        os.environ["REBASIN_WORKER_DEVICE"] = args.device
    settings = _settings(args)
    from worker.app import configure_celery

    app = configure_celery(settings)
    device = settings.worker_device.split(":")[0]
    queues = args.queues or {"cpu": "default,cpu", "cuda": "default,gpu"}.get(device, "default")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rebasin", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API (and, on the embedded default, a worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", help="embedded database, artifacts and queue (default ./.rebasin)")
    serve.add_argument("--no-worker", action="store_true", help="do not start the in-process worker")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", help="comma-separated queues (default: default plus cpu or gpu by device)")
    worker.add_argument("--device", help="auto, cpu or cuda:N (default REBASIN_WORKER_DEVICE or auto)")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--data-dir")
    worker.add_argument("--log-level", default="info")
    worker.set_defaults(func=cmd_worker)

    database = commands.add_parser("db", help="database administration")
    database_commands = database.add_subparsers(dest="db_command", required=True)
    upgrade = database_commands.add_parser("upgrade", help="apply migrations")
    upgrade.add_argument("--data-dir")
    upgrade.set_defaults(func=cmd_db_upgrade)

    from matching.cli import add_merge_command

    add_merge_command(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
