"""MLflow against a real tracking server (``mlflow server``, SQLite backend, local artifact root) started here:
a job with the ``mlflow`` option logs a run (params, barrier metrics, curves by step, artifacts) and registers
the merged checkpoint; ``models:/name/1`` imports and merges; with the server stopped the merge succeeds with a
warning, and a later ``POST /v1/jobs/{id}/exports`` logs it. Without MLflow the option is a 422."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors

from tests.conftest import die_with_test_run, free_port, process_env
from tests.data_helpers import write_digits
from tests.service_helpers import make_mlp, run_job, upload, wait_for

try:
    import mlflow  # noqa: F401  (the dev extras install it)
except ImportError:
    if os.environ.get("CI", "").lower() == "true":
        raise  # CI must run these: a skip there would pass without them
    pytest.skip("mlflow is not installed (pip install -e '.[dev]')", allow_module_level=True)


class MlflowServer:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> "MlflowServer":
        command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "mlflow.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=process_env({}),
                                        start_new_session=True, preexec_fn=die_with_test_run)
        deadline = time.monotonic() + 300  # its first start creates the database: a minute on a loaded machine
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "mlflow.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail("mlflow server did not come up:\n" + (self.root / "mlflow.log").read_text()[-3000:])

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow").start()
    yield server
    server.stop()


def test_jobs_log_runs_register_models_import_them_and_survive_mlflow_outages(make_embedded_service, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    service = make_embedded_service(REBASIN_MLFLOW_TRACKING_URI=mlflow_server.url, REBASIN_JOB_SWEEP_INTERVAL_S="1")
    tracking = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    with service.client() as client:
        a, b = (upload(client, make_mlp(seed).state_dict(), f"m{seed}") for seed in (1, 2))
        data = client.post("/v1/datasets", files={"file": ("d.safetensors", write_digits(tmp_path / "d.safetensors").read_bytes())})
        body = {"checkpoints": [a["id"], b["id"]], "architecture": {"name": "mlp"}, "eval_dataset": data.json()["id"],
                "options": {"lambdas": 5}, "mlflow": {"experiment": "rebasin-tests", "register_as": "merged-mlp"}}

        job = run_job(client, body)
        assert job["status"] == "succeeded", (job, service.logs())
        exported = job["result"]["mlflow"]
        assert exported["model_version"] == "1" and exported["registered_model"] == "merged-mlp", exported
        assert not job["result"].get("warnings")
        run = tracking.get_run(exported["run_id"])
        barrier = job["result"]["barrier"]
        assert run.data.metrics["barrier.aligned.loss"] == pytest.approx(barrier["aligned"]["loss"])
        assert run.data.metrics["barrier.naive.accuracy"] == pytest.approx(barrier["naive"]["accuracy"])
        assert run.data.params["method"] == "weight_matching" and run.data.params["architecture"] == "mlp"
        assert run.data.tags["rebasin.job_id"] == job["id"]
        curve = tracking.get_metric_history(exported["run_id"], "curve.aligned.loss")
        assert [m.step for m in curve] == list(range(5))
        assert [m.value for m in curve] == pytest.approx(job["result"]["curves"]["aligned"]["loss"])
        assert {f.path for f in tracking.list_artifacts(exported["run_id"])} >= {"report.json", "barrier.png", "permutation.json", "model"}
        assert tracking.get_model_version("merged-mlp", "1").run_id == exported["run_id"]

        # The registered version comes back as a checkpoint (the same bytes as the job's merged.safetensors) and merges.
        response = client.post("/v1/checkpoints/imports", json={"source": "models:/merged-mlp/1"})
        assert response.status_code == 202, response.text
        row = wait_import(client, response.json()["id"])
        assert row["status"] == "succeeded", (row, service.logs())
        merged_sha = next(x["sha256"] for x in job["artifacts"] if x["name"] == "merged.safetensors")
        assert client.get(f"/v1/checkpoints/{row['checkpoint_id']}").json()["sha256"] == merged_sha
        again = run_job(client, {"checkpoints": [a["id"], row["checkpoint_id"]], "architecture": {"name": "mlp"}})
        assert again["status"] == "succeeded", again
        missing = wait_import(client, client.post("/v1/checkpoints/imports", json={"source": "models:/merged-mlp/7"}).json()["id"])
        assert missing["status"] == "failed" and missing["error"]["status"] == 422, missing

        # MLflow away: the merge succeeds, the result says why nothing was logged; the export is retried later.
        mlflow_server.stop()
        offline = run_job(client, body | {"mlflow": {"experiment": "rebasin-tests"}}, timeout_s=300)
        assert offline["status"] == "succeeded", (offline, service.logs())
        assert "error" in offline["result"]["mlflow"] and "exports" in offline["result"]["warnings"][0], offline["result"]
        mlflow_server.start()
        response = client.post(f"/v1/jobs/{offline['id']}/exports")
        assert response.status_code == 202, response.text
        exported = wait_for(client, offline["id"], until=lambda j: "run_id" in j["result"]["mlflow"], timeout_s=180)["result"]
        assert not exported.get("warnings")
        assert tracking.get_run(exported["mlflow"]["run_id"]).data.metrics["barrier.aligned.loss"] == pytest.approx(
            offline["result"]["barrier"]["aligned"]["loss"])

        refused = client.post(f"/v1/jobs/{again['id']}/exports")  # no mlflow option, no body
        assert refused.status_code == 422, refused.text


def wait_import(client, import_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = client.get(f"/v1/checkpoints/imports/{import_id}").json()
        if row["status"] in ("succeeded", "failed"):
            return row
        time.sleep(0.3)
    pytest.fail(f"import {import_id}: {row}")


@pytest.mark.parametrize("configured", [False, True], ids=["no tracking uri", "not installed"])
def test_the_mlflow_option_is_refused_without_mlflow(local_storage_backend, monkeypatch, configured):
    from api.main import create_app

    if configured:
        monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed: importing it fails
    settings = local_storage_backend.settings(mlflow_tracking_uri="http://127.0.0.1:1" if configured else None)
    with TestClient(create_app(settings)) as client:
        ids = [client.post("/v1/checkpoints", files={"file": (f"{s}.safetensors", save_safetensors(make_mlp(s).state_dict()))}).json()["id"]
               for s in (1, 2)]
        body = {"checkpoints": ids, "architecture": {"name": "mlp"}, "mlflow": {"experiment": "x"}}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422 and response.json()["type"].endswith("/mlflow-unavailable"), response.text
        assert ("not installed" if configured else "REBASIN_MLFLOW_TRACKING_URI") in response.json()["detail"]
        assert client.post("/v1/jobs", json=body | {"mlflow": None}).status_code == 202
        refused = client.post("/v1/checkpoints/imports", json={"source": "models:/m/1"})
        assert refused.status_code == 422, refused.text
