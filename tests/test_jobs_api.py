"""The job API as pipelines use it, over real HTTP against uvicorn, PostgreSQL, Redis and separate workers:
tenants, idempotency, cancellation, crash-safe workers, callbacks, progress events, pagination, metrics."""

import hashlib
import hmac
import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from storage.models import IdempotencyRecord, Job
from tests.conftest import Service, process_env, rebasin_command
from tests.service_helpers import TERMINAL, make_mlp, submit, upload, wait_for

SLOW_SIZES = [64, 512, 512, 10]


def small_job(client, seed: int = 0) -> dict:
    a, b = make_mlp(seed), make_mlp(seed + 1000)
    ids = [upload(client, a.state_dict(), "a")["id"], upload(client, b.state_dict(), "b")["id"]]
    return {"method": "weight_matching", "checkpoints": ids, "architecture": {"name": "mlp"}}


def slow_job(client, lambdas: int = 41) -> dict:
    """A job that runs for a while: a long barrier evaluation after the matching."""
    generator = torch.Generator().manual_seed(0)
    data = {"inputs": torch.randn(2048, SLOW_SIZES[0], generator=generator), "targets": torch.randint(0, 10, (2048,), generator=generator)}
    dataset = upload(client, data, "eval", kind="datasets")
    a, b = make_mlp(1, SLOW_SIZES), make_mlp(2, SLOW_SIZES)
    ids = [upload(client, a.state_dict(), "a")["id"], upload(client, b.state_dict(), "b")["id"]]
    return {"checkpoints": ids, "architecture": {"name": "mlp"}, "eval_dataset": dataset["id"], "options": {"lambdas": lambdas}}


def job_row(database_url: str, job_id: str) -> Job:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return session.scalar(select(Job).where(Job.id == job_id))
    finally:
        engine.dispose()


def stored_artifacts(service, job_id: str) -> set[str]:
    folder = Path(service.env["REBASIN_ARTIFACT_URI"].removeprefix("file://")) / "jobs" / job_id
    return {p.name for p in folder.glob("*")} if folder.exists() else set()


def holder_pid(database_url: str, job_id: str) -> int:
    return int(job_row(database_url, job_id).claimed_by.rpartition(":")[2])


def test_tenants_see_only_their_own_resources(make_production_service):
    service = make_production_service(REBASIN_API_KEYS="alice:alice-key,bob:bob-key")
    with service.client(headers={"Authorization": "Bearer alice-key"}) as alice, service.client(
        headers={"Authorization": "Bearer bob-key"}
    ) as bob, service.client() as anonymous:
        for client in (anonymous, service.client(headers={"Authorization": "Bearer nope"})):
            response = client.get("/v1/jobs")
            assert response.status_code == 401 and response.json()["status"] == 401

        body = small_job(alice)
        dataset = upload(alice, {"inputs": torch.randn(8, 64), "targets": torch.zeros(8, dtype=torch.int64)}, "d", kind="datasets")
        job = wait_for(alice, submit(alice, body)["id"])
        assert job["status"] == "succeeded"
        checkpoint_id = body["checkpoints"][0]

        hidden = [
            ("GET", f"/v1/checkpoints/{checkpoint_id}"),
            ("GET", f"/v1/checkpoints/{checkpoint_id}/content"),
            ("DELETE", f"/v1/checkpoints/{checkpoint_id}"),
            ("GET", f"/v1/datasets/{dataset['id']}"),
            ("GET", f"/v1/datasets/{dataset['id']}/content"),
            ("DELETE", f"/v1/datasets/{dataset['id']}"),
            ("GET", f"/v1/jobs/{job['id']}"),
            ("GET", f"/v1/jobs/{job['id']}/events"),
            ("POST", f"/v1/jobs/{job['id']}/cancel"),
            ("GET", f"/v1/jobs/{job['id']}/artifacts/merged.safetensors"),
        ]
        for method, path in hidden:
            response = bob.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
        for path in ("/v1/checkpoints", "/v1/datasets", "/v1/jobs"):
            assert bob.get(path).json()["items"] == []
            assert len(alice.get(path).json()["items"]) >= 1
        response = bob.post("/v1/jobs", json=body)
        assert response.status_code == 422 and "No checkpoint" in response.json()["detail"]

        # Nothing of Alice's was touched by Bob's attempts.
        assert alice.get(f"/v1/checkpoints/{checkpoint_id}").status_code == 200
        assert alice.get(f"/v1/jobs/{job['id']}/artifacts/merged.safetensors").status_code == 200


def test_worker_killed_mid_job_finishes_exactly_once(make_production_service, postgres_url):
    # Two workers; the one running the job is killed as a whole (no parent left to hand the job back),
    # so the survivor must notice the missing heartbeats.
    service = make_production_service(workers=2, REBASIN_JOB_HEARTBEAT_TIMEOUT_S="3")
    with service.client() as client:
        job = submit(client, slow_job(client))
        running = wait_for(client, job["id"], until=lambda j: j["status"] != "queued")
        assert running["status"] == "running"
        os.killpg(os.getpgid(holder_pid(postgres_url, job["id"])), signal.SIGKILL)

        finished = wait_for(client, job["id"], timeout_s=300)
        assert finished["status"] == "succeeded", service.logs()
        assert finished["attempts"] == 2
        names = [a["name"] for a in finished["artifacts"]]
        assert len(names) == len(set(names)) and "merged.safetensors" in names
        assert stored_artifacts(service, job["id"]) == set(names)
        time.sleep(3)
        assert client.get(f"/v1/jobs/{job['id']}").json() == finished


def test_job_that_kills_its_worker_every_time_fails_after_max_attempts(make_production_service, postgres_url):
    service = make_production_service(REBASIN_JOB_MAX_ATTEMPTS="2")
    killed = set()
    with service.client() as client:
        job = submit(client, slow_job(client))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            row = job_row(postgres_url, job["id"])
            if row.status in TERMINAL:
                break
            if row.status == "running" and row.attempts not in killed:
                # The pool process dies as from the OOM killer; its Celery parent stays up.
                os.kill(holder_pid(postgres_url, job["id"]), signal.SIGKILL)
                killed.add(row.attempts)
            time.sleep(0.2)
        final = client.get(f"/v1/jobs/{job['id']}").json()
    assert killed == {1, 2}
    assert final["status"] == "failed", service.logs()
    assert final["attempts"] == 2
    assert final["error"]["type"].endswith("/worker-lost")
    assert "2 times" in final["error"]["detail"]


def test_cancel_queued_and_running_jobs(make_production_service):
    service = make_production_service()
    with service.client() as client:
        body = slow_job(client, lambdas=201)
        running = submit(client, body)
        wait_for(client, running["id"], until=lambda j: j["status"] == "running")
        queued = submit(client, body)  # the only worker is busy

        response = client.post(f"/v1/jobs/{queued['id']}/cancel")
        assert response.status_code == 202 and response.json()["status"] == "cancelled"

        response = client.post(f"/v1/jobs/{running['id']}/cancel")
        assert response.status_code == 202
        started = time.monotonic()
        ended = wait_for(client, running["id"], timeout_s=10)
        assert ended["status"] == "cancelled", ended
        assert time.monotonic() - started < 10
        assert ended["artifacts"] == [] and stored_artifacts(service, running["id"]) == set()

        assert client.post(f"/v1/jobs/{running['id']}/cancel").status_code == 409
        # The worker goes on to the next job, and the cancelled one never runs.
        follow_up = wait_for(client, submit(client, small_job(client))["id"], timeout_s=120)
        assert follow_up["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{queued['id']}").json()["attempts"] == 0


def test_idempotency_key_creates_one_job(make_production_service, postgres_url):
    service = make_production_service()
    with service.client() as client:
        weights = save_safetensors(make_mlp(9).state_dict())
        uploads = [
            client.post("/v1/checkpoints", files={"file": ("m.safetensors", weights)}, headers={"Idempotency-Key": "up-1"})
            for _ in range(2)
        ]
        assert [u.status_code for u in uploads] == [201, 201] and uploads[0].json() == uploads[1].json()
        assert len(client.get("/v1/checkpoints").json()["items"]) == 1
        changed = client.post("/v1/checkpoints", files={"file": ("m.safetensors", weights + b" ")}, headers={"Idempotency-Key": "up-1"})
        assert changed.status_code == 422 and changed.json()["type"].endswith("/idempotency-key-reused")

        body = small_job(client)
        first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "run-42"})
        retry = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "run-42"})
        assert first.status_code == retry.status_code == 202
        assert retry.json()["id"] == first.json()["id"] and retry.headers["location"] == first.headers["location"]
        assert retry.headers.get("idempotent-replayed") == "true"
        assert [job["id"] for job in client.get("/v1/jobs").json()["items"]] == [first.json()["id"]]

        other = client.post("/v1/jobs", json=body | {"options": {"seed": 7}}, headers={"Idempotency-Key": "run-42"})
        assert other.status_code == 422 and other.json()["type"].endswith("/idempotency-key-reused")

        engine = create_engine(postgres_url)
        with Session(engine) as session:  # as if the first request with this key were still being handled
            record = session.get(IdempotencyRecord, ("default", "jobs", "run-42"))
            record.status_code = record.response = None
            session.commit()
        engine.dispose()
        busy = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "run-42"})
        assert busy.status_code == 409 and busy.headers["retry-after"]
        assert len(client.get("/v1/jobs").json()["items"]) == 1


class CallbackReceiver:
    """A local HTTP endpoint that records callbacks; it fails the first ``failures`` of them."""

    def __init__(self, failures: int = 0):
        self.received: list[tuple[dict, bytes]] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                status = 500 if len(receiver.received) <= receiver.failures else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_callback_is_signed_and_retried(make_production_service):
    secret = "callback-secret"
    service = make_production_service(REBASIN_CALLBACK_SECRET=secret, REBASIN_CALLBACK_ALLOW_PRIVATE="true")
    receiver = CallbackReceiver(failures=1)
    try:
        with service.client() as client:
            job = submit(client, small_job(client) | {"callback_url": receiver.url})
            finished = wait_for(client, job["id"])
            deadline = time.monotonic() + 60
            while len(receiver.received) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        receiver.close()
    assert len(receiver.received) == 2, service.logs()
    headers, body = receiver.received[-1]
    signature = dict(part.split("=", 1) for part in headers["X-Rebasin-Signature"].split(","))
    expected = hmac.new(secret.encode(), f"{signature['t']}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signature["v1"], expected)
    assert abs(time.time() - int(signature["t"])) < 120
    payload = json.loads(body)
    assert payload["id"] == job["id"] and payload["status"] == finished["status"] == "succeeded"


def test_callbacks_to_private_addresses_are_refused(make_embedded_service):
    receiver = CallbackReceiver()
    try:
        with make_embedded_service(REBASIN_CALLBACK_SECRET="s").client() as client:
            body = small_job(client)
            for url in (receiver.url, "http://169.254.169.254/latest/meta-data", "http://10.1.2.3/hook", "ftp://example.com/x"):
                response = client.post("/v1/jobs", json=body | {"callback_url": url})
                assert response.status_code == 422, (url, response.text)
            assert "loopback" in client.post("/v1/jobs", json=body | {"callback_url": receiver.url}).json()["detail"]
            assert client.get("/v1/jobs").json()["items"] == []
        with make_embedded_service().client() as client:  # no secret configured: callbacks are off
            response = client.post("/v1/jobs", json=small_job(client) | {"callback_url": "https://example.com/hook"})
            assert response.status_code == 422 and response.json()["type"].endswith("/callbacks-off")
    finally:
        receiver.close()
    assert receiver.received == []


def test_progress_events_pagination_and_metrics(embedded_service):
    with embedded_service.client() as client:
        job = submit(client, slow_job(client, lambdas=11))
        events = []
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=120) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            event = {}
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event["event"] = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    event["data"] = json.loads(line.removeprefix("data: "))
                elif line == "" and event:
                    events.append(event)
                    event = {}
        assert events[-1]["event"] == "end" and events[-1]["data"]["status"] == "succeeded"
        assert all(e["event"] == "progress" for e in events[:-1]) and len(events) >= 2
        assert {e["data"]["progress"]["stage"] for e in events} >= {"done"}
        assert events[-1]["data"] == client.get(f"/v1/jobs/{job['id']}").json()

        more = [submit(client, small_job(client, seed))["id"] for seed in (1, 2, 3, 4)]
        for job_id in more:
            wait_for(client, job_id)
        seen, token = [], None
        for _ in range(3):
            page = client.get("/v1/jobs", params={"page_size": 2} | ({"page_token": token} if token else {})).json()
            seen += [j["id"] for j in page["items"]]
            token = page["next_page_token"]
        assert token is None and seen == list(reversed([job["id"], *more]))
        assert len(client.get("/v1/jobs", params={"status": "succeeded"}).json()["items"]) == 5
        assert client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"] == []
        assert client.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
        assert client.get("/v1/jobs", params={"page_token": "garbage"}).status_code == 400

        metrics = client.get("/metrics").text
        assert 'rebasin_jobs{status="succeeded"} 5.0' in metrics
        assert 'rebasin_job_duration_seconds_count 5.0' in metrics
        assert 'rebasin_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="202"} 5.0' in metrics
        ready = client.get("/readyz")
        assert ready.status_code == 200 and set(ready.json()["checks"].values()) == {"ok"}
        assert client.get("/healthz").headers["x-request-id"]


def test_readyz_reports_an_unreachable_broker(make_embedded_service):
    with make_embedded_service(REBASIN_BROKER_URL="redis://127.0.0.1:1/0").client() as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        checks = response.json()["checks"]
        assert checks["database"] == "ok" and checks["broker"].startswith("error")
        assert client.get("/healthz").status_code == 200


def test_command_line_client_submits_waits_and_downloads(make_embedded_service, tmp_path):
    service = make_embedded_service(REBASIN_API_KEYS="team:team-key")
    paths = []
    for seed in (5, 6):
        path = tmp_path / f"model-{seed}.safetensors"
        from safetensors.torch import save_file

        save_file(make_mlp(seed).state_dict(), path)
        paths.append(str(path))
    env = process_env({"REBASIN_SERVER": service.url, "REBASIN_API_KEY": "team-key"})
    out = tmp_path / "out"
    result = subprocess.run(
        rebasin_command("submit", *paths, "--arch", "mlp", "--seed", "3", "--out", str(out), "--json"),
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.splitlines()[0]
    assert {p.name for p in out.iterdir()} >= {"merged.safetensors", "aligned.safetensors", "permutation.json", "report.json"}
    assert json.loads(result.stdout[result.stdout.index("{"): result.stdout.rindex("}") + 1])["result"]["matching"]["iterations"] >= 1

    waited = subprocess.run(rebasin_command("wait", job_id), env=env, capture_output=True, text=True, timeout=120)
    assert waited.returncode == 0, waited.stderr
    again = tmp_path / "again"
    subprocess.run(rebasin_command("download", job_id, "--out", str(again)), env=env, check=True, timeout=120)
    assert (again / "merged.safetensors").read_bytes() == (out / "merged.safetensors").read_bytes()

    wrong_key = subprocess.run(rebasin_command("wait", job_id), env=env | {"REBASIN_API_KEY": "nope"}, capture_output=True, text=True, timeout=60)
    assert wrong_key.returncode == 2 and "Unauthorized" in wrong_key.stderr
    assert httpx.get(f"{service.url}/v1/jobs").status_code == 401


def test_embedded_server_killed_mid_job_resumes_it_on_restart(tmp_path):
    env = {"REBASIN_DATA_DIR": str(tmp_path / "data")}
    first = Service(env=env, log_dir=tmp_path)
    first.start_server()
    try:
        with first.client() as client:
            job = submit(client, slow_job(client))
            wait_for(client, job["id"], until=lambda j: j["status"] == "running")
        worker_pids = subprocess.run(["pgrep", "-P", str(first.processes[0].pid)], capture_output=True, text=True).stdout.split()
        assert worker_pids, "the embedded worker runs as a child of the server"
        # Server, worker and its pool die at once, the job half done: as when the machine goes down.
        for pid in worker_pids:
            os.killpg(int(pid), signal.SIGKILL)
        first.stop(signal.SIGKILL)
    finally:
        first.stop()

    second = Service(env=env, log_dir=tmp_path)
    second.start_server()
    try:
        with second.client() as client:
            finished = wait_for(client, job["id"], timeout_s=300)
    finally:
        second.stop()
    assert finished["status"] == "succeeded", second.logs()
    assert finished["attempts"] == 2


def test_killed_embedded_server_leaves_no_worker_behind(embedded_service):
    server = embedded_service.processes[0]
    worker_pids = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
    assert worker_pids
    server.kill()  # the server alone: its worker is orphaned
    server.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(map(alive, worker_pids)):
        time.sleep(0.5)
    assert not any(map(alive, worker_pids))


def alive(pid: str) -> bool:
    """Running, not merely a zombie waiting for a parent that is gone to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
