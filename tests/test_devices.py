"""Device handling a user can trust: a GPU job that cannot run is refused (embedded server) or waits saying
why (production), a worker refuses a GPU it does not have, workers announce their device, and the job tells
which device ran it."""

import subprocess
import time

import pytest
import torch
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

import cli
from core.config import get_settings
from storage.models import Worker
from tests.conftest import process_env, rebasin_command
from tests.service_helpers import make_mlp, submit, upload, wait_for


def mlp_job(client, **body) -> dict:
    ids = [upload(client, make_mlp(seed).state_dict(), f"m{seed}")["id"] for seed in (0, 1)]
    return {"checkpoints": ids, "architecture": {"name": "mlp"}} | body


def test_worker_refuses_a_gpu_it_does_not_have_and_more_than_one_job_per_gpu(tmp_path, monkeypatch, capsys):
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"  # no machine running these tests has the first
    done = subprocess.run(rebasin_command("worker", "--data-dir", str(tmp_path), "--device", missing), env=process_env({}),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rebasin worker: "), done.stderr
    assert repr(missing) in lines[0] and "--device cpu" in lines[0], lines[0]

    # The same check in this process (what it sets in the environment is restored afterwards).
    monkeypatch.setenv("REBASIN_WORKER_DEVICE", "auto")
    monkeypatch.setenv("REBASIN_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["worker", "--device", "cuda:0", "--concurrency", "2"])
    monkeypatch.undo()
    get_settings.cache_clear()  # it read the patched environment
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("rebasin worker: one job at a time per GPU") and "--concurrency must be 1" in message
    assert len(message.splitlines()) == 1


def test_embedded_server_refuses_a_gpu_job_it_cannot_run_and_tells_the_device_used(embedded_service, test_device):
    with embedded_service.client() as client:
        body = mlp_job(client)
        for device in ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]):
            response = client.post("/v1/jobs", json=body | {"device": device})
            assert response.status_code == 422, response.text
            problem = response.json()
            assert problem["type"].endswith("/no-gpu") and device in problem["detail"] and "'cpu'" in problem["detail"]
        assert client.get("/v1/jobs").json()["items"] == []  # nothing half-created

        # A job that names its device is served by the embedded worker, and says where it ran.
        job = wait_for(client, submit(client, body | {"device": test_device})["id"], timeout_s=120)
        assert job["status"] == "succeeded", job
        assert job["device_used"].split(":")[0] == test_device.split(":")[0]


def workers_table(database_url: str) -> list[Worker]:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(Worker)))
    finally:
        engine.dispose()


def test_production_gpu_job_waits_visibly_while_no_gpu_worker_is_connected(make_production_service, postgres_url):
    service = make_production_service(REBASIN_JOB_HEARTBEAT_TIMEOUT_S="4")  # one `--device cpu` worker
    deadline = time.monotonic() + 60
    while not workers_table(postgres_url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [w.device for w in workers_table(postgres_url)] == ["cpu"], service.logs()
    with service.client() as client:
        body = mlp_job(client)
        waiting = submit(client, body | {"device": "cuda"})
        assert waiting["status"] == "queued"
        assert "waiting for a GPU worker: none is connected" in waiting["progress"]["message"]

        # The CPU worker runs CPU work meanwhile and leaves the GPU job alone.
        done = wait_for(client, submit(client, body | {"device": "cpu"})["id"], timeout_s=120)
        assert done["status"] == "succeeded" and done["device_used"] == "cpu"
        still = client.get(f"/v1/jobs/{waiting['id']}").json()
        assert still["status"] == "queued" and still["device_used"] is None
        assert still["progress"]["message"] == waiting["progress"]["message"]
        assert client.post(f"/v1/jobs/{waiting['id']}/cancel").status_code == 202
    assert "runs jobs on cpu" in service.logs()
    service.stop()
    assert workers_table(postgres_url) == []  # a worker that shut down is no longer counted
