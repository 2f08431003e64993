"""A typed client of a running rebasin server, sync (``Client``) and async (``AsyncClient``); needs httpx only.

Retries are safe and patient: every create (upload, import, job, export) carries an Idempotency-Key, so a
retried POST never makes a second checkpoint or job; 429 and 503 are retried after the server's
``Retry-After``; ``wait`` rides out a server restart (connection refused, 502/503) until its own timeout.

    from rebasin import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        a, b = client.upload_checkpoint("a.safetensors"), client.upload_checkpoint("b.safetensors")
        job = client.submit({"checkpoints": [a["id"], b["id"]], "architecture": {"name": "mlp"}})
        job = client.wait(job["id"])
        client.download(job["id"], "out/")
"""

import asyncio
import email.utils
import json
import logging
import os
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import httpx

log = logging.getLogger("rebasin.client")

TERMINAL = ("succeeded", "failed", "cancelled")
RETRY_STATUSES = (429, 502, 503, 504)
MAX_RETRY_WAIT_S = 300.0  # a Retry-After beyond this is not waited out: the error is raised
DEFAULT_SERVER = "http://127.0.0.1:8000"


class Artifact(TypedDict):
    name: str
    size_bytes: int
    sha256: str


class Job(TypedDict, total=False):
    id: str
    status: str  # queued | running | succeeded | failed | cancelled
    method: str
    progress: dict[str, Any] | None
    result: dict[str, Any] | None  # barrier, curves, matching, mlflow, warnings
    artifacts: list[Artifact]
    error: dict[str, Any] | None  # a problem document
    attempts: int
    request: dict[str, Any]


class Checkpoint(TypedDict, total=False):
    id: str
    name: str
    sha256: str
    size_bytes: int
    format: str
    num_tensors: int
    num_parameters: int


class Import(TypedDict, total=False):
    id: str
    status: str  # queued | running | succeeded | failed
    source: str
    checkpoint_id: str | None
    error: dict[str, Any] | None
    attempts: int


# Errors: one class per kind of answer, built from the server's problem document (RFC 9457).


class RebasinError(Exception):
    """The server answered with a problem; ``problem`` holds it, ``status`` its HTTP status."""

    def __init__(self, problem: dict, retry_after_s: float | None = None):
        self.problem = problem
        self.status = int(problem.get("status") or 0)
        self.kind = str(problem.get("type", "")).rsplit("/", 1)[-1]
        self.retry_after_s = retry_after_s
        super().__init__(f"{problem.get('title', 'error')} ({problem.get('status')}): {problem.get('detail', '')}")


class InvalidRequest(RebasinError):
    """400, 413, 415, 422: the request (or file) is wrong; sending it again will not help."""


class Unauthorized(RebasinError):
    """401, 403."""


class NotFound(RebasinError):
    """404."""


class Conflict(RebasinError):
    """409, 410: the resource's state does not allow it."""


class QuotaExceeded(RebasinError):
    """429: over a quota or the request rate; ``retry_after_s`` says when to try again."""


class ServerError(RebasinError):
    """5xx."""


class JobFailed(RebasinError):
    """``wait(..., raise_on_failure=True)`` on a job that failed or was cancelled; ``job`` holds it."""

    def __init__(self, job: Job):
        self.job = job
        super().__init__(job.get("error") or {"title": f"job {job['status']}", "status": 0, "detail": job["id"]})


def error_for(response: httpx.Response) -> RebasinError:
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"status": response.status_code, "title": response.reason_phrase, "detail": response.text[:500]}
    problem.setdefault("status", response.status_code)
    status = response.status_code
    kind = (InvalidRequest if status in (400, 413, 415, 422) else Unauthorized if status in (401, 403)
            else NotFound if status == 404 else Conflict if status in (409, 410) else QuotaExceeded if status == 429
            else ServerError if status >= 500 else RebasinError)
    return kind(problem, retry_after(response))


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _backoff(attempt: int) -> float:
    return min(0.5 * 2**attempt, 10.0)


class _Base:
    def __init__(self, server: str | None, api_key: str | None, retries: int):
        self.server = (server or os.environ.get("REBASIN_SERVER") or DEFAULT_SERVER).rstrip("/")
        api_key = api_key or os.environ.get("REBASIN_API_KEY")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = retries

    def _delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """How long to wait before the next attempt; None: do not retry."""
        if attempt >= self.retries:
            return None
        wait = _backoff(attempt)
        if response is not None:
            after = retry_after(response)
            if after is not None:
                if after > MAX_RETRY_WAIT_S:
                    return None
                wait = max(after, 0.1)
        log.info("%s; retrying in %.1f s", f"HTTP {response.status_code}" if response is not None else "connection failed", wait)
        return wait

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise error_for(response)
        return response

    @staticmethod
    def _job_body(job: dict) -> dict:
        return {k: v for k, v in job.items() if v is not None}


class Client(_Base):
    """Blocking client. ``retries``: attempts after the first for retryable answers and connection errors."""

    def __init__(self, server: str | None = None, api_key: str | None = None, timeout_s: float = 60, retries: int = 5):
        super().__init__(server, api_key, retries)
        self.http = httpx.Client(base_url=self.server, headers=self.headers, timeout=timeout_s, follow_redirects=True)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, *, retry: bool = True, upload: Path | None = None,
                 progress: Callable[[int, int], None] | None = None, **kwargs) -> httpx.Response:
        """Send, retrying where repeating is harmless (reads, creates with an Idempotency-Key). An ``upload``
        file is reopened for every attempt, since a sent body is spent."""
        for attempt in range(self.retries + 1):
            response = None
            try:
                if upload is None:
                    response = self.http.request(method, path, **kwargs)
                else:
                    with _ProgressFile(upload, progress) as handle:
                        response = self.http.request(method, path, files={"file": (upload.name, handle)}, **kwargs)
            except httpx.TransportError:
                delay = self._delay(attempt, None) if retry else None
                if delay is None:
                    raise
            else:
                if response.status_code not in RETRY_STATUSES:
                    return self._checked(response)
                delay = self._delay(attempt, response) if retry else None
                if delay is None:
                    return self._checked(response)
            time.sleep(delay)
        raise AssertionError("unreachable")

    # Checkpoints and datasets

    def _upload(self, kind: str, path: str | Path, name: str | None, progress) -> dict:
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        data = {"name": name} if name else {}
        return self._request("POST", f"/v1/{kind}", upload=Path(path), progress=progress, data=data, headers=headers).json()

    def upload_checkpoint(self, path: str | Path, name: str | None = None,
                          progress: Callable[[int, int], None] | None = None) -> Checkpoint:
        """Upload a safetensors or torch.save file, or a model folder (a directory with config.json, sent as one
        tar archive); ``progress(sent, total)`` follows the bytes."""
        path = Path(path)
        if not path.is_dir():
            return self._upload("checkpoints", path, name, progress)
        with tempfile.TemporaryDirectory() as scratch:
            archive = Path(scratch) / f"{path.resolve().name or 'model'}.tar"
            with tarfile.open(archive, "w") as tar:
                for file in sorted(path.iterdir()):
                    if file.is_file() and not file.is_symlink():  # the server takes regular files only
                        tar.add(file, arcname=file.name)
            return self._upload("checkpoints", archive, name or path.resolve().name, progress)

    def upload_dataset(self, path: str | Path, name: str | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
        return self._upload("datasets", path, name, progress)

    def import_checkpoint(self, source: str, name: str | None = None, wait: bool = True, timeout_s: float | None = None) -> Import:
        """Import by reference (s3://, https://, models:/, runs:/); with ``wait``, until it has succeeded or failed."""
        body = {"source": source} | ({"name": name} if name else {})
        row = self._request("POST", "/v1/checkpoints/imports", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}).json()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = 0.5
        while wait and row["status"] not in ("succeeded", "failed"):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"import {row['id']} still {row['status']} after {timeout_s} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)
            row = self._poll(f"/v1/checkpoints/imports/{row['id']}", deadline)
        return row

    # Jobs

    def submit(self, job: dict, idempotency_key: str | None = None) -> Job:
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return self._request("POST", "/v1/jobs", json=self._job_body(job), headers=headers).json()

    def get_job(self, job_id: str) -> Job:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> Job:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def export(self, job_id: str, experiment: str | None = None, register_as: str | None = None) -> Job:
        """Export a succeeded job to MLflow (again); default: the job's own mlflow option."""
        body = {"experiment": experiment, "register_as": register_as} if experiment else None
        return self._request("POST", f"/v1/jobs/{job_id}/exports", json=body and self._job_body(body)).json()

    def _poll(self, path: str, deadline: float | None, outage_s: float = 300) -> dict:
        """GET that waits out a server restart or outage (up to ``outage_s``, and ``deadline``): the state lives
        in the server's database, so the answer after the outage is as good as one before."""
        delay, given_up_at = 0.5, time.monotonic() + outage_s
        while True:
            try:
                return self._request("GET", path).json()
            except (httpx.TransportError, ServerError, QuotaExceeded) as error:
                now = time.monotonic()
                if now + delay > given_up_at or (deadline is not None and now + delay > deadline):
                    raise
                log.warning("polling %s: %s; trying again in %.0f s", path, type(error).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def events(self, job_id: str) -> Iterator[Job]:
        """The job on every change, from the server's event stream (SSE), until it ends."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(60, read=60)) as response:
            if response.status_code >= 400:
                raise error_for(_read(response))
            for line in response.iter_lines():
                if line.startswith("data: "):
                    job = json.loads(line[6:])
                    yield job
                    if job["status"] in TERMINAL:
                        return

    def wait(self, job_id: str, timeout_s: float | None = None, on_update: Callable[[Job], None] | None = None,
             raise_on_failure: bool = False, outage_s: float = 300) -> Job:
        """Follow the job until it ends: through its event stream, falling back to polling (backing off from
        0.5 to 5 s) when the stream is unavailable or breaks. Once the job has been seen, a server that goes
        away (a restart) is waited for up to ``outage_s``; a server not there at the start is an error at once."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job: Job | None = None
        try:
            for job in self.events(job_id):
                if on_update:
                    on_update(job)
        except (httpx.TransportError, ServerError, QuotaExceeded) as error:
            log.info("event stream of %s unavailable (%s); polling", job_id, type(error).__name__)
        if job is None:
            job = self.get_job(job_id)
            if on_update:
                on_update(job)
        delay = 0.5
        while job["status"] not in TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)
            job = self._poll(f"/v1/jobs/{job_id}", deadline, outage_s)
            if on_update:
                on_update(job)
        if raise_on_failure and job["status"] != "succeeded":
            raise JobFailed(job)
        return job

    def download(self, job_id: str, out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
        """Stream the job's artifacts (all, or ``names``) into ``out_dir``; each appears whole or not at all."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for artifact in self.get_job(job_id)["artifacts"]:
            if names is not None and artifact["name"] not in names:
                continue
            path = out_dir / Path(artifact["name"]).name
            partial = path.with_name(path.name + ".part")
            for attempt in range(self.retries + 1):
                try:
                    with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{artifact['name']}") as response:
                        if response.status_code >= 400:
                            raise error_for(_read(response))
                        with open(partial, "wb") as out:
                            for chunk in response.iter_bytes(1024 * 1024):
                                out.write(chunk)
                    break
                except httpx.TransportError:
                    if attempt == self.retries:
                        raise
                    time.sleep(_backoff(attempt))
            partial.replace(path)
            paths.append(path)
        return paths


def _read(response: httpx.Response) -> httpx.Response:
    response.read()
    return response


class _ProgressFile:
    """A file opened for upload that reports how much of it was read."""

    def __init__(self, path: Path, progress: Callable[[int, int], None] | None):
        self.path, self.progress = path, progress
        self.total, self.sent = path.stat().st_size, 0

    def __enter__(self):
        self.handle = open(self.path, "rb")
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.sent += len(data)
        if self.progress and data:
            self.progress(self.sent, self.total)
        return data

    def __getattr__(self, name):
        return getattr(self.handle, name)


class AsyncClient(_Base):
    """The same client for asyncio code (an Airflow deferrable operator, a Prefect async flow)."""

    def __init__(self, server: str | None = None, api_key: str | None = None, timeout_s: float = 60, retries: int = 5):
        super().__init__(server, api_key, retries)
        self.http = httpx.AsyncClient(base_url=self.server, headers=self.headers, timeout=timeout_s, follow_redirects=True)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                delay = self._delay(attempt, None)
                if delay is None:
                    raise
            else:
                delay = self._delay(attempt, response) if response.status_code in RETRY_STATUSES else None
                if delay is None:
                    return self._checked(response)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def upload_checkpoint(self, path: str | Path, name: str | None = None) -> Checkpoint:
        path = Path(path)
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        # The file is read per attempt (a sent body is spent); checkpoints are read in one go here.
        return (await self._request("POST", "/v1/checkpoints", files={"file": (path.name, path.read_bytes())},
                                    data={"name": name} if name else {}, headers=headers)).json()

    async def import_checkpoint(self, source: str, name: str | None = None) -> Import:
        body = {"source": source} | ({"name": name} if name else {})
        row = (await self._request("POST", "/v1/checkpoints/imports", json=body,
                                   headers={"Idempotency-Key": uuid.uuid4().hex})).json()
        while row["status"] not in ("succeeded", "failed"):
            await asyncio.sleep(1)
            row = (await self._request("GET", f"/v1/checkpoints/imports/{row['id']}")).json()
        return row

    async def submit(self, job: dict, idempotency_key: str | None = None) -> Job:
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return (await self._request("POST", "/v1/jobs", json=self._job_body(job), headers=headers)).json()

    async def get_job(self, job_id: str) -> Job:
        return (await self._request("GET", f"/v1/jobs/{job_id}")).json()

    async def wait(self, job_id: str, timeout_s: float | None = None) -> Job:
        """Poll until the job ends, riding out server restarts until ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = 0.5
        while True:
            try:
                job = await self.get_job(job_id)
                if job["status"] in TERMINAL:
                    return job
            except (httpx.TransportError, ServerError, QuotaExceeded):
                pass
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not end within {timeout_s} s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 5.0)

    async def download(self, job_id: str, out_dir: str | Path) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for artifact in (await self.get_job(job_id))["artifacts"]:
            path = out_dir / Path(artifact["name"]).name
            async with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{artifact['name']}") as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_for(response)
                with open(path.with_name(path.name + ".part"), "wb") as out:
                    async for chunk in response.aiter_bytes(1024 * 1024):
                        out.write(chunk)
            path.with_name(path.name + ".part").replace(path)
            paths.append(path)
        return paths
