"""The OpenAPI document is the truth: a client generated from it (openapi-python-client) works, errors
included, and Schemathesis with every check finds nothing, with and without API keys. Both against a
real ``rebasin serve``."""

import importlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tests.conftest import process_env
from tests.data_helpers import write_digits
from tests.service_helpers import make_mlp

SCHEMATHESIS_CONFIG = Path(__file__).with_name("schemathesis.toml")
# Per operation and phase: enough to try every documented status and the stateful links, bounded so
# that both runs together take about a minute on two cores.
SCHEMATHESIS_EXAMPLES = 5


def generate_client(url: str, where: Path):
    """The client a user would generate from the running server's document, imported."""
    where.mkdir()
    (where / "openapi.json").write_bytes(httpx.get(f"{url}/openapi.json").content)
    subprocess.run([Path(sys.executable).with_name("openapi-python-client"), "generate", "--path", "openapi.json",
                    "--meta", "none", "--fail-on-warning"], cwd=where, check=True, capture_output=True, timeout=300)
    sys.path.insert(0, str(where))
    try:
        return importlib.import_module("rebasin_client")
    finally:
        sys.path.remove(str(where))


def test_generated_client_uploads_submits_polls_downloads_and_reads_problems(embedded_service, tmp_path):
    client_package = generate_client(embedded_service.url, tmp_path / "generated")
    from rebasin_client.api.checkpoints import upload_checkpoint
    from rebasin_client.api.datasets import upload_dataset
    from rebasin_client.api.jobs import cancel_job, create_job, download_artifact, get_job
    from rebasin_client.models import ArchitectureRef, JobCreate, JobCreateMethod, JobOut, JobOutStatus, Problem
    from rebasin_client.models import UploadCheckpointBody, UploadDatasetBody
    from rebasin_client.types import File

    client = client_package.Client(base_url=embedded_service.url, raise_on_unexpected_status=True)
    states = [make_mlp(seed).state_dict() for seed in (1, 2)]
    ids = []
    for i, state in enumerate(states):
        body = UploadCheckpointBody(file=File(payload=io.BytesIO(save_safetensors(state)), file_name=f"m{i}.safetensors"))
        ids.append(upload_checkpoint.sync(client=client, body=body).id)
    data = write_digits(tmp_path / "digits.safetensors")
    dataset = upload_dataset.sync(client=client, body=UploadDatasetBody(file=File(payload=open(data, "rb"), file_name="d.safetensors")))
    assert dataset.num_examples == 1347

    job = create_job.sync(client=client, body=JobCreate(checkpoints=ids, architecture=ArchitectureRef(name="mlp"),
                                                         method=JobCreateMethod.WEIGHT_MATCHING, eval_dataset=dataset.id))
    assert isinstance(job, JobOut), job
    deadline = time.monotonic() + 300
    while job.status in (JobOutStatus.QUEUED, JobOutStatus.RUNNING) and time.monotonic() < deadline:
        time.sleep(0.5)
        job = get_job.sync(job.id, client=client)
    assert job.status == JobOutStatus.SUCCEEDED, (job.to_dict(), embedded_service.logs())
    # result is typed: the report's parts are attributes, not a bag of JSON.
    assert job.result.matching.iterations >= 1
    assert isinstance(job.result.barrier.naive.loss, float) and isinstance(job.result.barrier.aligned.accuracy, float)
    assert len(job.result.curves.lambdas) == 25
    merged = download_artifact.sync_detailed(job.id, "merged.safetensors", client=client)
    assert merged.status_code == 200 and load_safetensors(merged.content).keys() == states[0].keys()

    # Errors are typed problems, whatever their status.
    invalid = create_job.sync(client=client, body=JobCreate(checkpoints=ids[:1], architecture=ArchitectureRef(name="mlp")))
    assert isinstance(invalid, Problem) and invalid.status == 422 and invalid.type_.endswith("/validation")
    assert invalid.errors[0].field == "checkpoints"
    missing = get_job.sync("job_does_not_exist", client=client)
    assert isinstance(missing, Problem) and missing.status == 404 and missing.type_.endswith("/not-found")
    conflict = cancel_job.sync(job.id, client=client)
    assert isinstance(conflict, Problem) and conflict.status == 409 and "succeeded" in conflict.detail


@pytest.mark.parametrize("keys", [False, True], ids=["open", "managed-key"])
def test_schemathesis_finds_nothing(make_embedded_service, tmp_path, keys):
    # with keys: an admin key stored (hashed) in the database, made by `rebasin keys create` before the server
    # starts, so the key-management operations are fuzzed too.
    # no request-rate limit: on a quiet machine schemathesis outpaces 50 requests a second and would test 429s
    # (documented on every tenant operation, and exercised in tests/test_faults.py) instead of the operations
    env = {"REBASIN_TENANT_REQUESTS_PER_S": "0"}
    auth = []
    if keys:
        env["REBASIN_DATA_DIR"] = str(tmp_path / "data")
        made = subprocess.run([sys.executable, "-m", "cli", "keys", "create", "--tenant", "team", "--scope", "admin", "--json"],
                              env=process_env(env), capture_output=True, text=True, timeout=300, check=True)
        auth = ["-H", f"Authorization: Bearer {json.loads(made.stdout)['secret']}"]
        # DELETE /v1/keys/{id} revokes: the key stays readable with status "revoked" (the audit trail
        # docs/deploy.md describes), which use_after_free reads as a fault. The open run keeps that check for every
        # resource that DELETE does remove.
        auth += ["--exclude-checks", "use_after_free"]
    service = make_embedded_service(**env)
    run = subprocess.run(
        [Path(sys.executable).with_name("schemathesis"), "--config-file", str(SCHEMATHESIS_CONFIG), "run", f"{service.url}/openapi.json",
         "--checks", "all", "--max-examples", str(SCHEMATHESIS_EXAMPLES), "--workers", "1", "--seed", "1",
         "--generation-database", "none", *auth],
        cwd=tmp_path, env=process_env({}), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    assert "passed" in run.stdout and " 0 passed" not in run.stdout
