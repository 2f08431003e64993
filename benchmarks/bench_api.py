"""Job-API load: N concurrent clients polling job status, and clients submitting jobs, against one API process.

    python -m benchmarks.bench_api [--clients 16] [--seconds 20] [--postgres URL --redis URL]

Starts ``rebasin serve --no-worker`` (the API process alone: jobs queue up
unrun; embedded SQLite, or PostgreSQL + Redis with --postgres/--redis) on a
free loopback port, creates a few jobs, then for --seconds: --clients
connections poll ``GET /v1/jobs/{id}`` as fast as they can while --submitters
tasks submit jobs (each with an Idempotency-Key). Prints throughput, p50/p99
latency and the error count per operation.

The polling load comes from ``wrk`` when it is installed (``apt-get install
wrk``): a Python client costs more CPU per request than the server does, and
on two cores it, not the server, would set the pace. Without wrk, Python polls.
Target on the 2-core CI machine: >= 500 polls/s, p99 < 100 ms, 0 errors.
"""

import argparse
import asyncio
import io
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

import matching

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(data_dir: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBASIN_")} | {
        "REBASIN_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO_ROOT),
        # The benchmark is the server's throughput, not one tenant's quotas.
        "REBASIN_TENANT_REQUESTS_PER_S": "0", "REBASIN_TENANT_MAX_ACTIVE_JOBS": "0"} | extra_env
    if "REBASIN_DATABASE_URL" in extra_env:
        subprocess.run([sys.executable, "-m", "cli", "db", "upgrade"], env=env, check=True, stdout=subprocess.DEVNULL)
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port), "--no-worker", "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("server did not start")


async def hammer(name: str, call, deadline: float, latencies: dict, errors: dict) -> None:
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            ok = await call()
        except httpx.HTTPError:
            ok = False
        latencies[name].append(time.perf_counter() - started)
        errors[name] += not ok


def run_wrk(url: str, connections: int, seconds: float) -> dict:
    """Poll with wrk; returns {count, per_s, p50_ms, p99_ms, errors}."""
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", url], capture_output=True, text=True, check=True
    ).stdout

    def milliseconds(label: str) -> float:
        value = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        return float(value.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[value.group(2)]

    count = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    return {"count": count, "per_s": count / seconds, "p50_ms": milliseconds("50%"), "p99_ms": milliseconds("99%"), "errors": errors}


def summarise(latencies: list[float], errors: int, seconds: float) -> dict:
    ordered = sorted(latencies) or [0.0]
    return {
        "count": len(latencies), "per_s": len(latencies) / seconds, "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3, "errors": errors,
    }


async def run_load(url: str, clients: int, submitters: int, seconds: float, use_wrk: bool) -> dict:
    limits = httpx.Limits(max_connections=clients + submitters)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        ids = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            state = matching.build_model("mlp", sizes=[32, 64, 10]).state_dict()
            response = await client.post("/v1/checkpoints", files={"file": ("m.safetensors", io.BytesIO(save(state)))})
            ids.append(response.json()["id"])
        body = {"checkpoints": ids, "architecture": {"name": "mlp"}, "options": {"max_iter": 5}}
        job_ids = [(await client.post("/v1/jobs", json=body)).json()["id"] for _ in range(8)]

        async def poll():
            job_id = job_ids[int(time.perf_counter() * 1e6) % len(job_ids)]
            return (await client.get(f"/v1/jobs/{job_id}")).status_code == 200

        async def submit():
            response = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
            return response.status_code == 202

        latencies = {"poll": [], "submit": []}
        errors = {"poll": 0, "submit": 0}
        deadline = time.perf_counter() + seconds
        pollers = [] if use_wrk else [hammer("poll", poll, deadline, latencies, errors) for _ in range(clients)]
        wrk = asyncio.to_thread(run_wrk, f"{url}/v1/jobs/{job_ids[0]}", clients, seconds) if use_wrk else asyncio.sleep(0)
        polled, *_ = await asyncio.gather(
            wrk, *pollers, *[hammer("submit", submit, deadline, latencies, errors) for _ in range(submitters)]
        )
        results = {"submit": summarise(latencies["submit"], errors["submit"], seconds)}
        results["poll"] = polled if use_wrk else summarise(latencies["poll"], errors["poll"], seconds)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--submitters", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--postgres", help="PostgreSQL URL of an empty database (default: embedded SQLite)")
    parser.add_argument("--redis", help="Redis URL (with --postgres)")
    args = parser.parse_args()
    extra = {}
    if args.postgres:
        extra = {"REBASIN_DATABASE_URL": args.postgres, "REBASIN_BROKER_URL": args.redis or "redis://127.0.0.1:6379/14"}
    use_wrk = shutil.which("wrk") is not None
    with tempfile.TemporaryDirectory(prefix="rebasin-bench-") as data_dir:
        server, url = start_server(Path(data_dir), extra)
        try:
            results = asyncio.run(run_load(url, args.clients, args.submitters, args.seconds, use_wrk))
        finally:
            server.terminate()
            server.wait()
    backend = "postgres+redis" if args.postgres else "embedded (sqlite)"
    print(f"\n{backend}: {args.clients} polling connections ({'wrk' if use_wrk else 'python'}), "
          f"{args.submitters} submitting clients, {args.seconds:.0f} s, one API process")
    print(f"{'operation':<10} {'requests':>9} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name in ("poll", "submit"):
        r = results[name]
        if r["count"]:
            print(f"{name:<10} {r['count']:>9} {r['per_s']:>8.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>7}")


if __name__ == "__main__":
    main()
