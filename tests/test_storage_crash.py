"""Crash safety over real HTTP: the API process (uvicorn via ``rebasin serve``) is SIGKILLed mid-upload.

Afterwards no checkpoint record and no visible object exist, the restarted server works (upload and
ranged download over real HTTP), and the staging leftovers are what the sweep removes.
"""

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select

from storage.artifacts import open_store, sweep_directory_entries
from storage.db import session_scope
from storage.models import Blob, Checkpoint
from tests.conftest import Service

MIB = 1024**2


def staged_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def test_sigkill_in_the_middle_of_a_large_upload(storage_backend, tmp_path):
    settings = storage_backend.settings()
    store = open_store(settings.resolved_artifact_uri(), settings.s3_endpoint_url)
    staging = store.staging_dir() or settings.data_dir.resolve() / "staging"
    service = Service(env=storage_backend.env, log_dir=tmp_path)
    service.start_server("--no-worker")

    boundary = "crash-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.safetensors"\r\n\r\n'.encode()
    killed = threading.Event()

    def body():
        yield head
        for sent in range(256):  # announces 256 MiB; the server dies long before the end
            if sent == 32:
                killed.wait(60)  # hold the connection open, mid-body, until the server is gone
            yield b"\x01" * MIB

    outcome = {}

    def send():
        try:
            outcome["response"] = httpx.post(
                f"{service.url}/v1/checkpoints",
                content=body(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                timeout=60,
            )
        except httpx.HTTPError as error:
            outcome["error"] = error

    sender = threading.Thread(target=send)
    sender.start()
    try:
        deadline = time.monotonic() + 60
        while staged_bytes(staging) < 16 * MIB:  # the server is writing the upload: kill it now
            assert time.monotonic() < deadline, f"upload never reached the server:\n{service.logs()}"
            time.sleep(0.05)
        server = service.processes[0]
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    finally:
        killed.set()
        sender.join(timeout=60)
    assert "response" not in outcome, outcome  # no answer: the process died mid-request

    with session_scope(settings.resolved_database_url()) as session:
        assert session.scalar(select(func.count()).select_from(Checkpoint)) == 0
        assert session.scalar(select(func.count()).select_from(Blob)) == 0
    assert list(store.list_keys("")) == []
    assert staged_bytes(staging) >= 16 * MIB  # what the crash left: invisible, and swept once stale
    assert sweep_directory_entries(staging, older_than_s=0) >= 1
    assert staged_bytes(staging) == 0

    service.start_server("--no-worker")
    try:
        content = save_safetensors({"w": torch.arange(1000, dtype=torch.float32)})
        with service.client() as client:
            response = client.post("/v1/checkpoints", files={"file": ("w.safetensors", content)})
            assert response.status_code == 201, response.text
            path = f"/v1/checkpoints/{response.json()['id']}/content"
            partial = client.get(path, headers={"Range": "bytes=8-15"}, follow_redirects=True)
            assert partial.status_code == 206 and partial.content == content[8:16]
    finally:
        service.stop()
    assert len(list(store.list_keys(""))) == 1
