"""Fault scenarios against the production stack, one table: does every accepted job finish exactly once?

    python benchmarks/faults.py [--postgres URL] [--jobs 20] [--load-seconds 60] [--scenarios redis,postgres,...]

Starts its own stack on this machine: a database of its own on the PostgreSQL at --postgres (default
$REBASIN_TEST_POSTGRES_URL, else postgresql+psycopg://postgres@127.0.0.1:5432/postgres) reached through a
TCP proxy it can cut, a redis-server of its own, a moto S3 server behind a proxy that can answer 503
SlowDown, ``rebasin serve`` (API only) and two ``rebasin worker`` processes whose scratch disks are
16 MB tmpfs mounts (needs root for the mount namespaces). All settings are the defaults (heartbeat
timeout 30 s, sweep every 10 s, S3 10 attempts, quotas), so the recovery times are what an operator gets.

Scenarios, each with --jobs jobs (tiny MLP merges) in flight:
  redis     Redis killed mid-run and restarted empty (every queued message lost)
  postgres  PostgreSQL unreachable for 15 s; the API is probed meanwhile (503 + Retry-After, never 500)
  s3        S3 answers 503 SlowDown to everything for 10 s
  disk      worker 0's scratch disk is full for 15 s
  rolling   the API, then each worker, restarted in turn while jobs run (a rolling deploy)
  load      8 clients (one tenant each) submit and poll as fast as they may for --load-seconds

Columns: accepted (202), succeeded exactly once (succeeded, its artifacts recorded once and present in
S3, one "succeeded" in the worker logs), failed with a clear problem, lost (accepted but unknown to the
database), duplicated (run to success twice, or artifacts not matching the store), stuck (not ended 180 s
after the fault), recovery (seconds from the end of the fault until every accepted job had ended).
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import boto3
import httpx

from tests.conftest import S3_CREDENTIALS, free_port
from tests.fault_tools import (
    ARTIFACTS,
    TENANT_KEYS,
    Stack,
    build_stack,
    fill_disk,
    free_disk,
    have_tmpfs_namespaces,
    job_body,
    s3_credentials,
    submit,
)
from tests.service_helpers import TERMINAL

STUCK_AFTER_S = 180


@dataclass
class Row:
    scenario: str
    accepted: int
    succeeded_once: int
    failed: int
    lost: int
    duplicated: int
    stuck: int
    recovery_s: float | None
    notes: str = ""


def succeeded_in_logs(stack: Stack) -> Counter:
    """How often the workers' logs say each job succeeded (a job run to success twice shows twice)."""
    counts = Counter()
    for path in Path(stack.service.log_dir).glob("worker-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                message = json.loads(line).get("message", "")
            except ValueError:
                continue
            if message.startswith("job ") and message.endswith(": succeeded"):
                counts[message.split()[1].rstrip(":")] += 1
    return counts


def wait_ended(stack: Stack, ids: list[str], since: float) -> float | None:
    """Seconds from ``since`` until every job has ended (read from the database), None if some never do."""
    wanted = set(ids)
    while time.monotonic() - since < STUCK_AFTER_S:
        try:
            statuses = {job.id: job.status for job in stack.jobs() if job.id in wanted}
        except Exception:  # noqa: BLE001 - the database may still be away
            statuses = {}
        if len(statuses) == len(wanted) and all(s in TERMINAL for s in statuses.values()):
            return time.monotonic() - since
        time.sleep(0.5)
    return None


def tally(stack: Stack, name: str, ids: list[str], recovery_s: float | None, notes: str = "") -> Row:
    jobs = {job.id: job for job in stack.jobs()}
    logged = succeeded_in_logs(stack)
    s3 = boto3.client("s3", endpoint_url=stack.moto, **s3_credentials())
    once = failed = lost = duplicated = stuck = unlogged = 0
    failures = Counter()
    for job_id in ids:
        job = jobs.get(job_id)
        if job is None:
            lost += 1
            continue
        if job.status not in TERMINAL:
            stuck += 1
            continue
        if job.status == "succeeded":
            stored = s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"rebasin/jobs/{job_id}/").get("Contents", [])
            names = sorted(a.name for a in job.artifacts)
            consistent = names == sorted(ARTIFACTS) and sorted(o["Key"].rsplit("/", 1)[1] for o in stored) == names
            if consistent and logged[job_id] <= 1:
                once += 1
                unlogged += logged[job_id] == 0
            else:
                duplicated += 1
        else:
            failed += 1
            failures[(job.error or {}).get("type", job.status).rsplit("/", 1)[-1]] += 1
    if unlogged:
        notes = "; ".join(filter(None, [notes, f"{unlogged} succeeded without a worker log line"]))
    if failures:
        notes = "; ".join(filter(None, [notes, "failed: " + ", ".join(f"{n}x {k}" for k, n in failures.items())]))
    return Row(name, len(ids), once, failed, lost, duplicated, stuck, recovery_s, notes)


def probe_api(stack: Stack, job_id: str, stop: threading.Event) -> Counter:
    """GET a job and POST a new one over and over; counts the answers' status codes."""
    codes = Counter()
    with stack.client("a") as client:
        while not stop.is_set():
            for call in (lambda: client.get(f"/v1/jobs/{job_id}"), lambda: client.get("/readyz"), lambda: client.get("/healthz")):
                try:
                    response = call()
                    key = response.url.path.rsplit("/", 1)[-1] if response.url.path in ("/readyz", "/healthz") else "api"
                    codes[f"{key} {response.status_code}"] += 1
                except httpx.HTTPError:
                    codes["no answer"] += 1
            time.sleep(0.2)
    return codes


def scenario_redis(stack: Stack, n: int) -> Row:
    ids = submit(stack, n)
    time.sleep(2)  # some jobs done, some running, the rest queued
    stack.redis.kill()
    time.sleep(2)
    stack.redis.start()
    end = time.monotonic()
    return tally(stack, "redis restarted empty", ids, wait_ended(stack, ids, end))


def scenario_postgres(stack: Stack, n: int, outage_s: float = 15) -> Row:
    ids = submit(stack, n)
    time.sleep(2)
    stop = threading.Event()
    result = {}
    prober = threading.Thread(target=lambda: result.setdefault("codes", probe_api(stack, ids[0], stop)))
    stack.postgres.cut()
    prober.start()
    time.sleep(outage_s)
    stack.postgres.restore()
    end = time.monotonic()
    stop.set()
    prober.join()
    codes = result["codes"]
    notes = "during the outage: " + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()))
    return tally(stack, f"postgres away {outage_s:g} s", ids, wait_ended(stack, ids, end), notes)


def scenario_s3(stack: Stack, n: int, outage_s: float = 10) -> Row:
    ids = submit(stack, n)
    time.sleep(1)
    refused = stack.s3.refused
    stack.s3.failing.set()
    time.sleep(outage_s)
    stack.s3.failing.clear()
    end = time.monotonic()
    return tally(stack, f"s3 SlowDown {outage_s:g} s", ids, wait_ended(stack, ids, end), f"{stack.s3.refused - refused} requests refused")


def scenario_disk(stack: Stack, n: int, full_s: float = 15) -> Row:
    filler = fill_disk(stack.workers[0], stack.scratch[0])
    ids = submit(stack, n)
    time.sleep(full_s)
    free_disk(filler)
    end = time.monotonic()
    return tally(stack, f"worker 0 disk full {full_s:g} s", ids, wait_ended(stack, ids, end))


def scenario_rolling(stack: Stack, n: int) -> Row:
    ids = submit(stack, n)
    time.sleep(1)
    stack.restart_api()
    for index in range(len(stack.workers)):
        stack.restart_worker(index)
    end = time.monotonic()
    return tally(stack, "rolling restart", ids, wait_ended(stack, ids, end), "API, worker 0, worker 1 in turn")


def scenario_load(stack: Stack, seconds: float, clients: int = 8) -> Row:
    tenants = list(TENANT_KEYS)[:clients]
    accepted: list[str] = []
    codes = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client_loop(tenant: str) -> None:
        with stack.client(tenant) as client:
            while time.monotonic() < deadline:
                response = client.post("/v1/jobs", json=job_body(stack, tenant))
                with lock:
                    codes[response.status_code] += 1
                if response.status_code != 202:
                    time.sleep(float(response.headers.get("retry-after", "1")) if response.status_code in (429, 503) else 0.1)
                    continue
                job_id = response.json()["id"]
                with lock:
                    accepted.append(job_id)
                while time.monotonic() < deadline:
                    poll = client.get(f"/v1/jobs/{job_id}")
                    with lock:
                        codes[poll.status_code] += 1
                    if poll.status_code == 429:
                        time.sleep(float(poll.headers.get("retry-after", "1")))
                    elif poll.status_code == 200 and poll.json()["status"] in TERMINAL:
                        break

    threads = [threading.Thread(target=client_loop, args=(tenant,)) for tenant in tenants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end = time.monotonic()
    total = sum(codes.values())
    notes = f"{total} requests ({total / seconds:.0f}/s): " + ", ".join(f"{code}: {n}" for code, n in sorted(codes.items()))
    return tally(stack, f"{clients} clients {seconds:g} s", accepted, wait_ended(stack, accepted, end), notes)


SCENARIOS = {
    "redis": lambda stack, args: scenario_redis(stack, args.jobs),
    "postgres": lambda stack, args: scenario_postgres(stack, args.jobs),
    "s3": lambda stack, args: scenario_s3(stack, args.jobs),
    "disk": lambda stack, args: scenario_disk(stack, args.jobs),
    "rolling": lambda stack, args: scenario_rolling(stack, args.jobs),
    "load": lambda stack, args: scenario_load(stack, args.load_seconds),
}


def print_table(rows: list[Row]) -> None:
    print("| scenario | accepted | succeeded once | failed (clear problem) | lost | duplicated | stuck | recovery s | notes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        recovery = f"{r.recovery_s:.1f}" if r.recovery_s is not None else "never"
        print(f"| {r.scenario} | {r.accepted} | {r.succeeded_once} | {r.failed} | {r.lost} | {r.duplicated} | {r.stuck} | {recovery} | {r.notes} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default=os.environ.get("REBASIN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--load-seconds", type=float, default=60)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this directory (default: removed)")
    args = parser.parse_args()
    if not have_tmpfs_namespaces():
        sys.exit("faults.py: needs root and unshare (the workers' scratch disks are tmpfs mounts in their own namespaces)")
    from moto.server import ThreadedMotoServer

    os.environ.update(S3_CREDENTIALS)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="rebasin-faults-") as scratch:
        root = args.logs or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        stack = build_stack(root, args.postgres, endpoint, {})
        try:
            warm = submit(stack, 2)
            wait_ended(stack, warm, time.monotonic())
            for name in args.scenarios.split(","):
                started = time.monotonic()
                rows.append(SCENARIOS[name](stack, args))
                print(f"{name}: done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        finally:
            stack.close()
            moto.stop()
    print_table(rows)
    bad = [r.scenario for r in rows if r.lost or r.duplicated or r.stuck]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
