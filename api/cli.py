"""The ``rebasin`` command line: serve, worker, db upgrade, merge, and a client for a running server."""

import argparse
import gc
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from api.config import Settings, get_settings
from api.logs import configure_logging
from matching.cli import METHOD_NAMES, parse_key_values


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
        worker = subprocess.Popen([sys.executable, "-m", "api.cli", *worker_command], env=os.environ.copy(), start_new_session=True)
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
    from worker.app import configure_celery

    app = configure_celery(settings)
    if args.exit_with_parent:
        _exit_with_parent(args.exit_with_parent)
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


def _show_progress(bar):
    def update(job: dict) -> None:
        progress = job.get("progress") or {}
        bar.total = progress.get("total") or None
        bar.n = progress.get("completed", 0)
        bar.set_description(f"{job['status']}: {progress.get('stage', '')}")
        bar.refresh()

    return update


def _wait(client, job_id: str) -> dict:
    from tqdm import tqdm

    with tqdm(desc="queued", unit="step", disable=None) as bar:
        job = client.wait(job_id, on_update=_show_progress(bar))
    if job["status"] != "succeeded":
        print(f"rebasin: job {job_id} {job['status']}: {(job.get('error') or {}).get('detail', '')}", file=sys.stderr)
    else:
        print(json.dumps(job["result"], indent=2))
    return job


def cmd_submit(args) -> None:
    from api.client import Client

    with Client(args.server, args.api_key) as client:
        def resolve(value: str | None, upload) -> str | None:
            # Local files are uploaded; anything else is taken as the id of an upload on the server.
            return upload(value)["id"] if value and Path(value).is_file() else value

        body = {
            "method": METHOD_NAMES[args.method],
            "checkpoints": [resolve(c, client.upload_checkpoint) for c in args.checkpoints],
            "options": parse_key_values(args.option, "--option") | ({"seed": args.seed} if args.seed is not None else {}),
            "device": args.device,
        }
        if args.spec:
            body["permutation_spec"] = json.loads(Path(args.spec).read_text())
        else:
            body["architecture"] = {"name": args.arch, "options": parse_key_values(args.arch_option, "--arch-option")}
        for field, value in (("dataset", args.data), ("eval_dataset", args.eval_data)):
            if value:
                body[field] = resolve(value, client.upload_dataset)
        if args.callback_url:
            body["callback_url"] = args.callback_url
        job = client.submit(body)
        print(job["id"])
        if args.wait or args.out:
            job = _wait(client, job["id"])
            if job["status"] == "succeeded" and args.out:
                for path in client.download(job["id"], args.out):
                    print(path)
            sys.exit(0 if job["status"] == "succeeded" else 1)


def cmd_wait(args) -> None:
    from api.client import Client

    with Client(args.server, args.api_key) as client:
        sys.exit(0 if _wait(client, args.job_id)["status"] == "succeeded" else 1)


def cmd_download(args) -> None:
    from api.client import Client

    with Client(args.server, args.api_key) as client:
        for path in client.download(args.job_id, args.out):
            print(path)


def _client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="server URL (default REBASIN_SERVER or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default REBASIN_API_KEY)")


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
    worker.add_argument("--exit-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)

    database = commands.add_parser("db", help="database administration")
    database_commands = database.add_subparsers(dest="db_command", required=True)
    upgrade = database_commands.add_parser("upgrade", help="apply migrations")
    upgrade.add_argument("--data-dir")
    upgrade.set_defaults(func=cmd_db_upgrade)

    submit = commands.add_parser("submit", help="upload checkpoints to a server and start a merge job")
    submit.add_argument("checkpoints", nargs="+", help="local files (uploaded) or checkpoint ids")
    spec_or_arch = submit.add_mutually_exclusive_group(required=True)
    spec_or_arch.add_argument("--arch", help="registered architecture name")
    spec_or_arch.add_argument("--spec", help="permutation spec JSON file")
    submit.add_argument("--arch-option", action="append", metavar="K=V")
    submit.add_argument("--method", choices=sorted(METHOD_NAMES), default="weight")
    submit.add_argument("--data", help="dataset file or id (activation and STE matching)")
    submit.add_argument("--eval-data", help="dataset file or id for the barrier report")
    submit.add_argument("--seed", type=int)
    submit.add_argument("--option", action="append", metavar="K=V", help="job option, e.g. max_iter=50")
    submit.add_argument("--device", default="auto")
    submit.add_argument("--callback-url")
    submit.add_argument("--wait", action="store_true", help="wait for the job, showing progress")
    submit.add_argument("--out", help="wait, then download the artifacts here")
    _client_arguments(submit)
    submit.set_defaults(func=cmd_submit)

    wait = commands.add_parser("wait", help="wait for a job, showing progress; exit 0 if it succeeded")
    wait.add_argument("job_id")
    _client_arguments(wait)
    wait.set_defaults(func=cmd_wait)

    download = commands.add_parser("download", help="download a job's artifacts")
    download.add_argument("job_id")
    download.add_argument("--out", required=True)
    _client_arguments(download)
    download.set_defaults(func=cmd_download)

    from matching.cli import add_merge_command

    add_merge_command(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    from api.client import RebasinError
    from matching import MatchingError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (RebasinError, MatchingError) as error:
        sys.exit(f"rebasin: {error}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
