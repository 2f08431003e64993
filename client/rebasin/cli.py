"""``rebasin-client submit | wait | download`` (also ``python -m rebasin``): the pipeline commands of the
server's ``rebasin`` CLI, from the client alone (no torch). Exit status: 0 succeeded, 1 the job failed or was
cancelled, 2 bad usage or input, 3 the server could not be reached."""

import argparse
import json
import sys
import tarfile
from pathlib import Path

import httpx

from rebasin.client import Client, RebasinError

METHODS = {"weight": "weight_matching", "activation": "activation_matching", "ste": "ste_matching"}


def _key_values(pairs: list[str], flag: str) -> dict:
    values = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"rebasin-client: {flag} takes KEY=VALUE, not {pair!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def _finish(job: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        barrier = (job.get("result") or {}).get("barrier")
        print(f"job {job['id']} {job['status']}" + (f": barrier {json.dumps(barrier)}" if barrier else ""))
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        print(f"rebasin-client: job {job['id']} {job['status']}: {error.get('title', '')}: {error.get('detail', '')}", file=sys.stderr)
        return 1
    return 0


def cmd_submit(client: Client, args) -> int:
    def resolve(value: str | None, upload) -> str | None:
        # Local files are uploaded; anything else is the id of a checkpoint or dataset on the server.
        return upload(value)["id"] if value and Path(value).is_file() else value

    body = {"method": METHODS.get(args.method, args.method),
            "checkpoints": [resolve(c, client.upload_checkpoint) for c in args.checkpoints],
            "options": _key_values(args.option, "--option"), "device": args.device}
    if args.spec:
        body["permutation_spec"] = json.loads(Path(args.spec).read_text())
    else:
        body["architecture"] = {"name": args.arch, "options": _key_values(args.arch_option, "--arch-option")}
    for field, value in (("dataset", args.data), ("eval_dataset", args.eval_data)):
        if value:
            body[field] = resolve(value, client.upload_dataset)
    job = client.submit(body)
    print(job["id"], flush=True)
    if not (args.wait or args.out):
        return 0
    job = client.wait(job["id"])
    status = _finish(job, args.json)
    if args.out and status == 0:
        for path in _unpacked(client.download(job["id"], args.out)):
            print(path)
    return status


def cmd_wait(client: Client, args) -> int:
    return _finish(client.wait(args.job_id), args.json)


def cmd_download(client: Client, args) -> int:
    job = client.get_job(args.job_id)
    if job["status"] != "succeeded":
        print(f"rebasin-client: job {args.job_id} is {job['status']}: no artifacts", file=sys.stderr)
        return 1 if job["status"] in ("failed", "cancelled") else 2
    for path in _unpacked(client.download(args.job_id, args.out)):
        print(path)
    return 0


def _unpacked(paths: list) -> list:
    """Model folders (aligned.tar, merged.tar: one top folder named after the tar) as folders beside the other
    artifacts."""
    out = []
    for path in paths:
        if path.suffix != ".tar":
            out.append(path)
            continue
        folder = path.with_suffix("")
        with tarfile.open(path) as tar:
            if any(Path(member.name).parts[:1] != (folder.name,) for member in tar.getmembers()):
                raise ValueError(f"{path.name} is not a model folder's archive")
            tar.extractall(path.parent, filter="data")  # refuses absolute paths, '..' and links out of the folder
        path.unlink()
        out.append(folder)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rebasin-client", description=__doc__)
    parser.add_argument("--server", help="server URL (default: REBASIN_SERVER or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default: REBASIN_API_KEY)")
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", help="upload checkpoints (or name uploaded ones) and start a merge job")
    submit.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="files to upload, or checkpoint ids")
    submit.add_argument("--method", default="weight", help="weight, activation or ste (default: weight)")
    submit.add_argument("--arch", default="mlp", help="registered architecture (default: mlp)")
    submit.add_argument("--arch-option", action="append", metavar="KEY=VALUE")
    submit.add_argument("--spec", metavar="FILE", help="a permutation spec (JSON) instead of --arch")
    submit.add_argument("--data", help="dataset file or id (activation and STE matching)")
    submit.add_argument("--eval-data", help="dataset file or id for the barrier report")
    submit.add_argument("--option", action="append", metavar="KEY=VALUE", help="job option, e.g. seed=1")
    submit.add_argument("--device", default="auto")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end")
    submit.add_argument("--out", metavar="DIR", help="wait, then download the artifacts into DIR")
    submit.add_argument("--json", action="store_true", help="print the finished job as JSON")
    submit.set_defaults(func=cmd_submit)
    wait = commands.add_parser("wait", help="wait for a job to end")
    wait.add_argument("job_id")
    wait.add_argument("--json", action="store_true")
    wait.set_defaults(func=cmd_wait)
    download = commands.add_parser("download", help="download a succeeded job's artifacts")
    download.add_argument("job_id")
    download.add_argument("--out", required=True, metavar="DIR")
    download.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.server, args.api_key) as client:
            code = args.func(client, args)
    except RebasinError as error:
        print(f"rebasin-client: {error}", file=sys.stderr)
        code = 3 if error.status >= 500 else 2
    except httpx.TransportError as error:
        print(f"rebasin-client: cannot reach the server: {error}", file=sys.stderr)
        code = 3
    except (OSError, ValueError) as error:
        print(f"rebasin-client: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)
