"""The Python client (``rebasin``, distribution ``rebasin-client``) against a real server: it honours the
Retry-After of the real quota 429, its ``wait`` survives an API restart, and it installs alone (httpx only,
no torch, FastAPI or Celery) in a fresh virtual environment where ``rebasin-client submit / wait / download``
run a job end to end."""

import csv
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save_file

from rebasin import Client, QuotaExceeded
from tests.conftest import REPO_ROOT, process_env
from tests.service_helpers import make_mlp

# What the client may bring into an environment: itself, httpx and httpx's own dependencies.
CLIENT_DEPENDENCIES = ["httpx", "httpcore", "h11", "anyio", "idna", "certifi", "typing_extensions", "sniffio"]


def write_models(where: Path) -> list[Path]:
    paths = []
    for seed in (1, 2):
        paths.append(where / f"m{seed}.safetensors")
        save_file(make_mlp(seed).state_dict(), paths[-1])
    return paths


def test_retries_honour_the_retry_after_of_the_real_quota(make_embedded_service, tmp_path, caplog):
    # Two requests at once, then one every 2 s: the third answers 429 with Retry-After: 2.
    service = make_embedded_service(REBASIN_TENANT_REQUESTS_PER_S="0.5", REBASIN_TENANT_REQUEST_BURST="2")
    refusals = []
    with Client(service.url, retries=5) as client:
        client.http.event_hooks["response"].append(
            lambda response: refusals.append(response.headers["retry-after"]) if response.status_code == 429 else None)
        caplog.set_level(logging.INFO, logger="rebasin.client")
        a, b = (client.upload_checkpoint(path) for path in write_models(tmp_path))
        job = client.submit({"checkpoints": [a["id"], b["id"]], "architecture": {"name": "mlp"}})
        assert job["status"] in ("queued", "running", "succeeded")
    waits = [float(r.getMessage().rsplit("in ", 1)[1].split(" s")[0]) for r in caplog.records if "HTTP 429" in r.getMessage()]
    assert refusals and len(waits) == len(refusals), (refusals, waits)
    assert waits == [float(value) for value in refusals]  # each retry waited what the server asked
    with Client(service.url, retries=0) as impatient, pytest.raises(QuotaExceeded) as refused:
        for _ in range(5):
            impatient.get_job(job["id"])
    assert refused.value.retry_after_s >= 1 and refused.value.kind == "quota-request-rate"


def test_wait_survives_an_api_restart(make_production_service, tmp_path):
    service = make_production_service(workers=0)  # the job stays queued until a worker is started below
    server = service.processes[-1]
    port = service.url.rsplit(":", 1)[1]
    outcome = {}
    with Client(service.url) as client:
        a, b = (client.upload_checkpoint(path) for path in write_models(tmp_path))
        job = client.submit({"checkpoints": [a["id"], b["id"]], "architecture": {"name": "mlp"}})
        waiting = threading.Thread(target=lambda: outcome.update(job=client.wait(job["id"], timeout_s=300)))
        waiting.start()
        time.sleep(2)
        server.terminate()
        server.wait(timeout=60)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{service.url}/healthz", timeout=5)
        time.sleep(3)
        assert waiting.is_alive()  # the server is away, the wait goes on
        service.spawn("server", "serve", "--port", port)
        service.spawn("worker", "worker", "--device", "cpu")
        waiting.join(timeout=300)
    assert outcome["job"]["status"] == "succeeded", (outcome, service.logs())


def repack_wheel(name: str, where: Path) -> Path:
    """A wheel of an installed pure-Python distribution, rebuilt from its RECORD: the fresh environment
    below installs offline, from these files only."""
    dist = metadata.distribution(name)
    assert "Root-Is-Purelib: true" in dist.read_text("WHEEL"), f"{name} is not pure Python"
    normalized = dist.metadata["Name"].replace("-", "_")
    wheel = where / f"{normalized}-{dist.version}-py3-none-any.whl"
    root = Path(dist.locate_file(""))
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        record = []
        for row in csv.reader(dist.read_text("RECORD").splitlines()):
            path = row[0]
            if path.startswith("..") or "__pycache__" in path or path.endswith(("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")):
                continue
            archive.write(root / path, path)
            record.append(path)
        info = next(p for p in record if p.endswith("/METADATA")).rsplit("/", 1)[0]
        archive.writestr(f"{info}/RECORD", "\n".join(f"{p},," for p in record + [f"{info}/RECORD"]) + "\n")
    return wheel


def test_the_client_installs_alone_and_runs_a_job_end_to_end(embedded_service, tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    for name in CLIENT_DEPENDENCIES:
        try:
            repack_wheel(name, wheelhouse)
        except metadata.PackageNotFoundError:
            pass  # not a dependency of this httpx version
    # Built from a copy: a build leaves build/ and *.egg-info beside the sources.
    shutil.copytree(REPO_ROOT / "client", tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(wheelhouse),
                    str(tmp_path / "client")], check=True, cwd=tmp_path, timeout=300, capture_output=True)
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)  # no system site packages
    env = {k: v for k, v in process_env({}).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([venv / "bin" / "pip", "install", "--no-index", "--find-links", str(wheelhouse), "--quiet",
                              "--disable-pip-version-check", "rebasin-client"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    listed = subprocess.run([venv / "bin" / "python", "-c", "import importlib.metadata as m, json; "
                             "print(json.dumps(sorted(d.metadata['Name'].lower().replace('_', '-') for d in m.distributions())))"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    installed = set(json.loads(listed.stdout))
    assert not installed & {"torch", "fastapi", "celery", "starlette", "sqlalchemy", "numpy"}, installed
    assert installed <= {"rebasin-client", "pip", "setuptools"} | {n.replace("_", "-") for n in CLIENT_DEPENDENCIES}, installed

    def client(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([venv / "bin" / "rebasin-client", "--server", embedded_service.url, *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    a, b = write_models(tmp_path)
    submitted = client("submit", str(a), str(b), "--arch", "mlp", "--option", "seed=0")
    assert submitted.returncode == 0, submitted.stderr + embedded_service.logs()
    job_id = submitted.stdout.split()[0]
    waited = client("wait", job_id, "--json")
    assert waited.returncode == 0 and json.loads(waited.stdout)["status"] == "succeeded", waited.stderr
    downloaded = client("download", job_id, "--out", str(tmp_path / "out"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert (tmp_path / "out" / "merged.safetensors").stat().st_size > 0
    missing = client("wait", "job_does_not_exist")
    assert missing.returncode == 2 and "Not found" in missing.stderr


def test_the_pipelines_doc_plain_python_example_runs(embedded_service, tmp_path):
    doc = (REPO_ROOT / "docs" / "pipelines.md").read_text()
    example = doc.split("## Plain Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "step.py").write_text(example)
    a, b = write_models(tmp_path)
    a.rename(tmp_path / "model_a.safetensors")
    b.rename(tmp_path / "model_b.safetensors")
    run = subprocess.run([sys.executable, "step.py"], cwd=tmp_path, env=process_env({"REBASIN_SERVER": embedded_service.url}),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr + embedded_service.logs()
    assert run.stdout.startswith("matching iterations:")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["merged.safetensors", "report.json"]
