"""The ``rebasin`` command line, one module per command group: ``service`` (serve, worker, db),
``remote`` (submit, wait, download: a client of a running server); ``merge`` lives with the
algorithms in ``matching.cli``."""

import argparse
import sys

from cli import remote, service
from matching.cli import METHOD_NAMES, add_merge_command


def _client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="server URL (default REBASIN_SERVER or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default REBASIN_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rebasin", description="Merge neural-network checkpoints modulo permutation symmetries: run the service, or merge offline.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API (and, on the embedded default, a worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", help="embedded database, artifacts and queue (default ./.rebasin)")
    serve.add_argument("--no-worker", action="store_true", help="do not start the in-process worker")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=service.cmd_serve)

    worker = commands.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", help="comma-separated queues (default: default plus cpu or gpu by device)")
    worker.add_argument("--device", help="auto, cpu or cuda:N (default REBASIN_WORKER_DEVICE or auto)")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--data-dir")
    worker.add_argument("--log-level", default="info")
    worker.add_argument("--exit-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    worker.set_defaults(func=service.cmd_worker)

    database = commands.add_parser("db", help="database administration")
    database_commands = database.add_subparsers(dest="db_command", required=True)
    upgrade = database_commands.add_parser("upgrade", help="apply migrations")
    upgrade.add_argument("--data-dir")
    upgrade.set_defaults(func=service.cmd_db_upgrade)

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
    submit.set_defaults(func=remote.cmd_submit)

    wait = commands.add_parser("wait", help="wait for a job, showing progress; exit 0 if it succeeded")
    wait.add_argument("job_id")
    _client_arguments(wait)
    wait.set_defaults(func=remote.cmd_wait)

    download = commands.add_parser("download", help="download a job's artifacts")
    download.add_argument("job_id")
    download.add_argument("--out", required=True)
    _client_arguments(download)
    download.set_defaults(func=remote.cmd_download)

    add_merge_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int | None:
    from api.client import RebasinError
    from matching import MatchingError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)  # `rebasin merge` returns its exit code (2: bad input)
    except (RebasinError, MatchingError) as error:
        sys.exit(f"rebasin: {error}")
    except KeyboardInterrupt:
        sys.exit(130)

