"""The ``rebasin`` command line, one module per command group: ``service`` (serve, worker, db),
``remote`` (submit, wait, download: a client of a running server), ``demo``; ``merge`` lives with the
algorithms in ``matching.cli``.

Exit status of every command: 0 success; 1 the job failed or was cancelled; 2 bad usage or input;
3 the server could not be reached. Errors are one line on stderr."""

import argparse
import sys

from cli import demo, remote, service
from cli.keys import add_keys_command
from cli.errors import EXIT_UNREACHABLE, EXIT_USAGE, CommandError
from core import __version__
from matching.cli import DefaultsHelpFormatter, add_merge_command, add_method_argument, add_spec_command

EXIT_STATUS_HELP = "exit status: 0 success, 1 the job failed or was cancelled, 2 bad usage or input, 3 server unreachable"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, and exit 2 (argparse prints the whole usage first)."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="server URL (default REBASIN_SERVER, else http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default REBASIN_API_KEY)")


def _data_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="embedded database, artifacts and queue (default REBASIN_DATA_DIR, else ./.rebasin)")


def _log_level_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rebasin",
        description="Merge neural-network checkpoints modulo permutation symmetries: run the service, or merge offline.",
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"rebasin {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func, description: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description or help, epilog=EXIT_STATUS_HELP,
                                  formatter_class=DefaultsHelpFormatter)
        sub.set_defaults(func=func)
        return sub

    serve = command("serve", "run the API (and, on the embedded default, a worker)", service.cmd_serve,
                    "Run the API, and on the embedded default (no REBASIN_BROKER_URL) a worker in its own process. "
                    "Writes nothing outside the data directory. Logs: text on a terminal, JSON lines otherwise "
                    "(REBASIN_LOG_FORMAT=text|json to choose).")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (without API keys: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    _data_dir_argument(serve)
    serve.add_argument("--no-worker", action="store_true", help="do not start the in-process worker")
    _log_level_argument(serve)

    worker = command("worker", "run a Celery worker", service.cmd_worker)
    worker.add_argument("--queues", help="comma-separated queues (default: default plus cpu or gpu by device)")
    worker.add_argument("--device", help="auto, cpu or cuda:N (default REBASIN_WORKER_DEVICE, else auto)")
    worker.add_argument("--concurrency", type=int, default=1, help="jobs run at once")
    _data_dir_argument(worker)
    _log_level_argument(worker)
    worker.add_argument("--exit-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)

    database = commands.add_parser("db", help="database administration", description="Database administration.")
    database_commands = database.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = database_commands.add_parser("upgrade", help="apply migrations", description="Apply the database migrations.",
                                           formatter_class=DefaultsHelpFormatter)
    _data_dir_argument(upgrade)
    upgrade.set_defaults(func=service.cmd_db_upgrade)

    add_keys_command(commands, DefaultsHelpFormatter, EXIT_STATUS_HELP, _data_dir_argument)

    submit = command("submit", "upload checkpoints to a server and start a merge job", remote.cmd_submit,
                     "Upload local checkpoint files (or use ids of uploaded ones) and start a merge job; prints its id. "
                     "With --wait or --out: wait for it, then print the barrier table (and download).")
    submit.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="local files or model folders (uploaded; a folder as one tar) or checkpoint ids")
    spec_or_arch = submit.add_mutually_exclusive_group(required=True)
    spec_or_arch.add_argument("--arch", metavar="NAME", help="registered architecture name")
    spec_or_arch.add_argument("--spec", metavar="SPEC.json", help="permutation spec JSON file")
    submit.add_argument("--arch-option", action="append", metavar="KEY=VALUE", help="architecture option (repeatable)")
    add_method_argument(submit)
    submit.add_argument("--data", help="dataset file or id (activation and STE matching)")
    submit.add_argument("--eval-data", help="dataset file or id for the barrier report")
    submit.add_argument("--seed", type=int, help="random seed (default 0)")
    submit.add_argument("--option", action="append", metavar="KEY=VALUE", help="job option, e.g. max_iter=50 (repeatable)")
    submit.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    submit.add_argument("--callback-url", help="URL the server POSTs the finished job to")
    submit.add_argument("--wait", action="store_true", help="wait for the job, showing progress")
    submit.add_argument("--out", metavar="DIR", help="wait, then download the artifacts here")
    submit.add_argument("--json", action="store_true", help="with --wait: print the finished job as JSON instead of the table")
    _client_arguments(submit)

    wait = command("wait", "wait for a job and print its barrier table", remote.cmd_wait,
                   "Wait for a job, showing its progress, then print the barrier table (as rebasin merge does). "
                   "Exit 0 if it succeeded, 1 if it failed or was cancelled.")
    wait.add_argument("job_id", metavar="JOB_ID")
    wait.add_argument("--json", action="store_true", help="print the finished job as JSON instead of the table")
    _client_arguments(wait)

    download = command("download", "download a job's artifacts", remote.cmd_download,
                       "Download a job's artifacts; model folders (aligned.tar, merged.tar) are unpacked into folders.")
    download.add_argument("job_id", metavar="JOB_ID")
    download.add_argument("--out", required=True, metavar="DIR", help="directory to write the artifacts into")
    _client_arguments(download)

    demo_command = command("demo", "write two small trained models and a dataset to merge", demo.cmd_demo,
                           "Train two small MLPs on scikit-learn's bundled digits (different seeds, a few seconds), "
                           "write them and the dataset into --out, and print the commands that merge them with a "
                           "barrier report.")
    demo_command.add_argument("--out", default="rebasin-demo", metavar="DIR", help="directory to write into")

    add_merge_command(commands).epilog = EXIT_STATUS_HELP
    add_spec_command(commands).epilog = EXIT_STATUS_HELP
    return parser


def run(argv: list[str] | None = None) -> int:
    """The command's exit status; errors are printed as one line."""
    import httpx
    from pydantic import ValidationError

    from api.client import RebasinError
    from matching import MatchingError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except CommandError as error:
        message, code = str(error), error.exit_code
    except RebasinError as error:
        status = error.problem.get("status") or 0
        message, code = str(error), EXIT_UNREACHABLE if status >= 500 else EXIT_USAGE
    except httpx.InvalidURL as error:
        message, code = f"invalid server URL: {error}", EXIT_USAGE
    except httpx.TransportError as error:
        message, code = f"cannot reach the server: {_one_line(error) or type(error).__name__}", EXIT_UNREACHABLE
    except (MatchingError, ValueError) as error:  # ValueError: settings from the environment (pydantic), JSON
        message, code = _one_line(error if not isinstance(error, ValidationError) else _settings_error(error)), EXIT_USAGE
    except OSError as error:
        message, code = f"{error.filename or ''}: {error.strerror or error}".lstrip(": "), EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    print(f"rebasin: {message}", file=sys.stderr)
    return code


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _settings_error(error) -> str:
    return "; ".join(f"REBASIN_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors())


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))
