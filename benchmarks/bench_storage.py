"""Upload/download throughput and API peak memory for large checkpoints, on both storage backends.

    python benchmarks/bench_storage.py [--sizes-mb 100,1000] [--backends local,s3]

Starts its own API process (uvicorn, like ``rebasin serve``) per backend: SQLite + a local directory,
and SQLite + S3 on a ``moto_server`` subprocess (over HTTP). For each size it uploads a valid
safetensors file through ``POST /v1/checkpoints`` (streamed multipart), downloads it again (from
S3 through the 307 presigned redirect), and records the API process's peak RSS growth over its
resident size before the upload (sampled from /proc every 20 ms, and the kernel's high-water mark
after resetting it). Everything is written under a temporary directory that is removed afterwards.
"""

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from storage import db  # noqa: E402
from storage.ingest import write_safetensors  # noqa: E402

MB = 1_000_000
TENSOR_BYTES = 16 * 1024**2
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def make_checkpoint(path: Path, size_bytes: int) -> None:
    """A valid safetensors file of about ``size_bytes``: 16 MiB float32 tensors, written one at a time."""
    block = torch.randn(TENSOR_BYTES // 4, generator=torch.Generator().manual_seed(0))
    count = max(1, round(size_bytes / TENSOR_BYTES))
    write_safetensors({f"layer{i}.weight": block for i in range(count)}, path)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


class PeakRss:
    """Peak resident size of a process while the block runs, in KiB."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self):
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # reset the kernel's high-water mark
            self.kernel_hwm = True
        except OSError:
            self.kernel_hwm = False
        self.peak = rss_kib(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self.kernel_hwm:
            self.peak = max(self.peak, rss_kib(self.pid, "VmHWM"))


class Api:
    def __init__(self, workdir: Path, env: dict[str, str]):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("REBASIN_")} | env
        self.env["PYTHONPATH"] = str(REPO_ROOT)
        db.upgrade(env["REBASIN_DATABASE_URL"])
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(workdir / "api.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--port", str(port), "--log-level", "warning"],
            env=self.env, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_http(f"{self.url}/healthz", self.process)

    def stop(self):
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)
        self.log.close()


def run_one(api: Api, client: httpx.Client, path: Path) -> dict:
    size = path.stat().st_size
    # Warm-up so that first-request imports and allocations are not counted as growth.
    warm = client.post("/v1/checkpoints", files={"file": ("warm.safetensors", b"")})
    assert warm.status_code == 422, warm.text
    baseline = rss_kib(api.process.pid)
    with PeakRss(api.process.pid) as peak, open(path, "rb") as handle:
        started = time.perf_counter()
        response = client.post("/v1/checkpoints", files={"file": (path.name, handle)})
        upload_s = time.perf_counter() - started
    assert response.status_code == 201, response.text
    checkpoint = response.json()
    assert checkpoint["size_bytes"] == size
    with PeakRss(api.process.pid) as download_peak:
        started = time.perf_counter()
        received = 0
        with client.stream("GET", f"/v1/checkpoints/{checkpoint['id']}/content", follow_redirects=True) as stream:
            assert stream.status_code == 200
            for chunk in stream.iter_raw(1024 * 1024):
                received += len(chunk)
        download_s = time.perf_counter() - started
    assert received == size
    assert client.delete(f"/v1/checkpoints/{checkpoint['id']}").status_code == 204
    return {
        "size_mb": size / MB,
        "upload_mb_s": size / MB / upload_s,
        "download_mb_s": size / MB / download_s,
        "rss_growth_mb": (max(peak.peak, download_peak.peak) - baseline) * 1024 / MB,
        "baseline_mb": baseline * 1024 / MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="100,1000")
    parser.add_argument("--backends", default="local,s3")
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one, removed afterwards)")
    args = parser.parse_args()
    sizes = [int(s) * MB for s in args.sizes_mb.split(",")]
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="rebasin-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows, moto = [], None
    try:
        files = []
        for size in sizes:
            path = scratch / f"checkpoint-{size // MB}MB.safetensors"
            make_checkpoint(path, size)
            files.append(path)
        for backend in args.backends.split(","):
            workdir = scratch / backend
            workdir.mkdir()
            env = {"REBASIN_DATA_DIR": str(workdir / "data"), "REBASIN_MAX_UPLOAD_BYTES": str(4 * 1024**3)}
            env["REBASIN_DATABASE_URL"] = f"sqlite:///{workdir / 'data' / 'rebasin.db'}"
            if backend == "s3":
                port = free_port()
                moto = subprocess.Popen(
                    ["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    env=os.environ | S3_CREDENTIALS,
                )  # fmt: skip
                endpoint = f"http://127.0.0.1:{port}"
                wait_http(endpoint, moto)
                bucket = f"bench-{secrets.token_hex(4)}"
                import boto3

                boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=bucket)
                env |= S3_CREDENTIALS | {"REBASIN_ARTIFACT_URI": f"s3://{bucket}/bench", "REBASIN_S3_ENDPOINT_URL": endpoint}
            else:
                env["REBASIN_ARTIFACT_URI"] = (workdir / "artifacts").as_uri()
            api = Api(workdir, env)
            try:
                with httpx.Client(base_url=api.url, timeout=600) as client:
                    for path in files:
                        rows.append({"backend": backend} | run_one(api, client, path))
                        print(f"  done: {backend} {path.name}", file=sys.stderr, flush=True)
            finally:
                api.stop()
                if moto is not None:
                    moto.terminate()
                    moto.wait(timeout=30)
                    moto = None
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if moto is not None:
            moto.kill()
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"{'backend':8} {'size MB':>8} {'upload MB/s':>12} {'download MB/s':>14} {'API peak RSS growth MB':>23} {'API RSS before MB':>18}")
    for row in rows:
        print(
            f"{row['backend']:8} {row['size_mb']:8.0f} {row['upload_mb_s']:12.0f} {row['download_mb_s']:14.0f} "
            f"{row['rss_growth_mb']:23.1f} {row['baseline_mb']:18.0f}"
        )


def _boto_credentials() -> dict:
    return {
        "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"],
    }


if __name__ == "__main__":
    main()
