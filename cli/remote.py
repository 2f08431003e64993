"""`rebasin submit`, `wait` and `download`: a client of a running server."""

import json
import sys
from pathlib import Path

from matching.cli import METHOD_NAMES, parse_key_values


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
