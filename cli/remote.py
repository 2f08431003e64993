"""`rebasin submit`, `wait` and `download`: a client of a running server."""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from cli.errors import JobFailed, Unreachable, UsageError
from matching.cli import METHOD_NAMES, StageBar, format_report, parse_key_values

DEFAULT_SERVER = "http://127.0.0.1:8000"


@contextmanager
def connect(args):
    """A client of the server named by --server or REBASIN_SERVER; a connection failure is exit 3."""
    import httpx

    from api.client import Client

    server = args.server or os.environ.get("REBASIN_SERVER") or DEFAULT_SERVER
    try:
        # Few retries: a pipeline learns of a dead server in seconds (exit 3) and can retry itself.
        with Client(server, args.api_key, retries=2) as client:
            yield client
    except httpx.TransportError as error:
        raise Unreachable(f"cannot reach {server}: {' '.join(str(error).split()) or type(error).__name__}") from None


def _wait(client, job_id: str, as_json: bool) -> dict:
    """Progress while the job runs; then its barrier table (or the job as JSON) on stdout, or the
    reason it failed (one line on stderr, exit 1)."""
    bar = StageBar()

    def show(job: dict) -> None:
        progress = job.get("progress") or {}
        bar.update(progress.get("stage") or job["status"], progress.get("completed", 0), progress.get("total", 0),
                   progress.get("message", ""))

    try:
        job = client.wait(job_id, on_update=show)
    finally:
        bar.close()
    if as_json:
        print(json.dumps(job, indent=2))
    elif job["status"] == "succeeded":
        print(format_report(job["result"]))
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        reason = ": ".join(filter(None, (error.get("title"), error.get("detail"))))
        raise JobFailed(f"job {job_id} {job['status']}" + (f": {reason}" if reason else ""))
    return job


def _read_spec(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"--spec {path}: cannot read JSON ({error})") from None


def cmd_submit(args) -> None:
    body_options = parse_key_values(args.option, "--option") | ({"seed": args.seed} if args.seed is not None else {})
    with connect(args) as client:
        def resolve(value: str | None, upload) -> str | None:
            # Local files are uploaded; anything else is taken as the id of an upload on the server.
            local = value and (Path(value).is_file() or (upload == client.upload_checkpoint and Path(value).is_dir()))
            return upload(value)["id"] if local else value

        body = {
            "method": METHOD_NAMES.get(args.method, args.method),
            "checkpoints": [resolve(c, client.upload_checkpoint) for c in args.checkpoints],
            "options": body_options,
            "device": args.device,
        }
        if args.spec:
            body["permutation_spec"] = _read_spec(args.spec)
        else:
            body["architecture"] = {"name": args.arch, "options": parse_key_values(args.arch_option, "--arch-option")}
        for field, value in (("dataset", args.data), ("eval_dataset", args.eval_data)):
            if value:
                body[field] = resolve(value, client.upload_dataset)
        if args.callback_url:
            body["callback_url"] = args.callback_url
        job = client.submit(body)
        print(job["id"], flush=True)
        if args.wait or args.out:
            job = _wait(client, job["id"], args.json)
            if args.out:
                for path in _download(client, job["id"], args.out):
                    print(path)


def cmd_wait(args) -> None:
    with connect(args) as client:
        _wait(client, args.job_id, args.json)


def cmd_download(args) -> None:
    with connect(args) as client:
        job = client.get_job(args.job_id)
        if job["status"] in ("failed", "cancelled"):
            raise JobFailed(f"job {args.job_id} {job['status']}: it has no artifacts")
        if job["status"] != "succeeded":
            raise UsageError(f"job {args.job_id} is {job['status']}: no artifacts yet (run rebasin wait first)")
        for path in _download(client, args.job_id, args.out):
            print(path)


def _download(client, job_id: str, out: str) -> list[Path]:
    """Every artifact into ``out``; the model folders (aligned.tar, merged.tar) unpacked into folders."""
    from storage.archives import ArchiveLimits, unpack_folder

    paths = []
    for path in client.download(job_id, out):
        if path.suffix == ".tar":
            folder = path.with_suffix("")
            scratch = path.with_name(f".{folder.name}.unpacking")
            shutil.rmtree(scratch, ignore_errors=True)
            try:
                # An uncompressed tar unpacks to no more than its own size.
                root = unpack_folder(path, scratch, "tar", ArchiveLimits(100_000, path.stat().st_size))
                shutil.rmtree(folder, ignore_errors=True)
                root.rename(folder)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            path.unlink()
            path = folder
        paths.append(path)
    return paths
