"""A small Python client for a running rebasin server, used by ``rebasin submit / wait / download``.

Retries are safe: uploads and job submissions carry an Idempotency-Key, so a
retried POST never creates a second checkpoint or job.

    client = Client("http://127.0.0.1:8000", api_key="...")
    a, b = client.upload_checkpoint("a.safetensors"), client.upload_checkpoint("b.safetensors")
    job = client.submit({"checkpoints": [a["id"], b["id"]], "architecture": {"name": "mlp"}})
    job = client.wait(job["id"])
    client.download(job["id"], "out/")
"""

import os
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
RETRY_STATUSES = (429, 502, 503, 504)


class RebasinError(Exception):
    """The server answered with a problem (RFC 9457); ``problem`` holds it."""

    def __init__(self, problem: dict):
        self.problem = problem
        super().__init__(f"{problem.get('title', 'error')} ({problem.get('status')}): {problem.get('detail', '')}")


class Client:
    def __init__(self, server: str | None = None, api_key: str | None = None, timeout_s: float = 60, retries: int = 5):
        server = server or os.environ.get("REBASIN_SERVER", "http://127.0.0.1:8000")
        api_key = api_key or os.environ.get("REBASIN_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = retries
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout_s, follow_redirects=True)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method: str, path: str, *, retry: bool, upload: Path | None = None, **kwargs) -> httpx.Response:
        """Send, retrying with backoff where repeating is harmless (reads, requests with an Idempotency-Key).
        An ``upload`` file is reopened for every attempt, since a sent body stream is spent."""
        for attempt in range(self.retries + 1):
            last_try = not retry or attempt == self.retries
            try:
                if upload is None:
                    response = self.http.request(method, path, **kwargs)
                else:
                    with open(upload, "rb") as handle:
                        response = self.http.request(method, path, files={"file": (upload.name, handle)}, **kwargs)
            except httpx.TransportError:
                if last_try:
                    raise
            else:
                if response.status_code not in RETRY_STATUSES or last_try:
                    if response.status_code >= 400:
                        try:
                            raise RebasinError(response.json())
                        except ValueError:
                            raise RebasinError({"status": response.status_code, "detail": response.text}) from None
                    return response
            time.sleep(min(0.5 * 2**attempt, 10))
        raise AssertionError("unreachable")

    def _upload(self, kind: str, path: str | Path, name: str | None) -> dict:
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        data = {"name": name} if name else {}
        return self._request("POST", f"/v1/{kind}", retry=True, upload=Path(path), data=data, headers=headers).json()

    def upload_checkpoint(self, path: str | Path, name: str | None = None) -> dict:
        """A checkpoint file, or a model folder (a directory with config.json), sent as one tar archive."""
        path = Path(path)
        if not path.is_dir():
            return self._upload("checkpoints", path, name)
        with tempfile.TemporaryDirectory() as scratch:
            archive = Path(scratch) / f"{path.resolve().name or 'model'}.tar"
            with tarfile.open(archive, "w") as tar:
                for file in sorted(path.iterdir()):
                    if file.is_file() and not file.is_symlink():  # the server takes regular files only
                        tar.add(file, arcname=file.name)
            return self._upload("checkpoints", archive, name or path.resolve().name)

    def upload_dataset(self, path: str | Path, name: str | None = None) -> dict:
        return self._upload("datasets", path, name)

    def submit(self, job: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return self._request("POST", "/v1/jobs", retry=True, json=job, headers=headers).json()

    def get_job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}", retry=True).json()

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel", retry=True).json()

    def wait(self, job_id: str, timeout_s: float | None = None, on_update: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job ends, backing off from 0.5 s to 5 s between polls."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = 0.5
        while True:
            job = self.get_job(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)

    def download(self, job_id: str, out_dir: str | Path) -> list[Path]:
        """Stream every artifact of a finished job into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for artifact in self.get_job(job_id)["artifacts"]:
            path = out_dir / Path(artifact["name"]).name
            partial = path.with_name(path.name + ".part")
            with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{artifact['name']}") as response:
                if response.status_code >= 400:
                    response.read()
                    raise RebasinError(response.json())
                with open(partial, "wb") as out:
                    for chunk in response.iter_bytes(1024 * 1024):
                        out.write(chunk)
            partial.replace(path)
            paths.append(path)
        return paths
