"""The job runner in one process, on SQLite and a local store: how failures end a job, and lost-job sweeps.

The merge itself is replaced where a test is about what happens around it.
"""

from datetime import timedelta

import pytest
import torch
from safetensors.torch import save_file

import matching
from core.config import Settings
from storage.artifacts import open_store
from storage.db import session_scope, upgrade
from storage.models import Checkpoint, Job, utcnow
from worker import dispatch, jobs


@pytest.fixture
def settings(tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path, job_heartbeat_timeout_s=5)
    upgrade(settings.resolved_database_url())
    monkeypatch.setattr(dispatch, "enqueue_job", lambda job_id, device: enqueued.append(job_id))
    monkeypatch.setattr(jobs, "enqueue_callback", lambda job_id: None)
    enqueued.clear()
    return settings


enqueued: list[str] = []


def make_job(settings: Settings, tmp_path, tenant: str = "t", device: str = "auto", **values) -> str:
    store = open_store(settings.resolved_artifact_uri())
    ids = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"m{seed}.safetensors"
        save_file(matching.build_model("mlp", sizes=[8, 16, 4]).state_dict(), path)
        store.put_file(f"m{seed}", path)
        ids.append(f"ckpt_{seed}")
    with session_scope(settings.resolved_database_url()) as session:
        for seed, checkpoint_id in enumerate(ids):
            session.merge(Checkpoint(id=checkpoint_id, tenant="t", name="m", sha256="0" * 64, size_bytes=1, format="safetensors",
                                     num_tensors=4, num_parameters=1, tensors={}, object_key=f"m{seed}"))
        request = {"method": "weight_matching", "checkpoints": ids, "architecture": {"name": "mlp"}, "device": device}
        job = Job(tenant=tenant, method="weight_matching", request=request, **values)
        session.add(job)
        session.commit()
        return job.id


def final(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.resolved_database_url()) as session:
        return session.get(Job, job_id)


@pytest.mark.parametrize(
    "raised, kind, status",
    [
        (torch.OutOfMemoryError("CUDA out of memory"), "out-of-memory", 507),
        (matching.MatchingError("checkpoint does not fit"), "invalid-input", 422),
        (ZeroDivisionError("bug"), "internal", 500),
    ],
)
def test_a_failure_inside_matching_fails_only_that_job(settings, tmp_path, monkeypatch, raised, kind, status, test_device):
    job_id = make_job(settings, tmp_path, device=test_device)
    released_after = []

    def explode(*args, device, **kwargs):
        held = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # what the job held when it failed
        raise raised

    def release():
        released_after.append(final(settings, job_id).status)
        real_release()

    real_release = jobs.devices.release
    monkeypatch.setattr(matching, "merge_checkpoints", explode)
    monkeypatch.setattr(jobs.devices, "release", release)
    jobs.execute_job(job_id, settings)
    job = final(settings, job_id)
    assert job.status == "failed" and job.error["type"].endswith(kind) and job.error["status"] == status
    assert job.artifacts == [] and job.finished_at is not None
    assert job.device_used.split(":")[0] == test_device.split(":")[0]
    # The device is handed back once the job has ended, with nothing of the failed job cached on it.
    assert released_after == ["failed"]
    if test_device.startswith("cuda"):
        assert torch.cuda.memory_reserved() < 64 * 2**20

    monkeypatch.undo()
    monkeypatch.setattr(jobs, "enqueue_callback", lambda job_id: None)
    next_job = make_job(settings, tmp_path, device=test_device)
    jobs.execute_job(next_job, settings)
    assert final(settings, next_job).status == "succeeded"
    assert final(settings, next_job).device_used.split(":")[0] == test_device.split(":")[0]


def test_lost_jobs_are_queued_again_once(settings, tmp_path, monkeypatch):
    stale = make_job(settings, tmp_path, status="running", attempts=1, claimed_by="elsewhere:1",
                     heartbeat_at=utcnow() - timedelta(seconds=60), enqueued_at=utcnow(), created_at=utcnow() - timedelta(minutes=9))
    fresh = make_job(settings, tmp_path, status="running", attempts=1, claimed_by="elsewhere:2", heartbeat_at=utcnow(), enqueued_at=utcnow())
    never_sent = make_job(settings, tmp_path, created_at=utcnow() - timedelta(minutes=5))
    waiting = make_job(settings, tmp_path, enqueued_at=utcnow(), created_at=utcnow() - timedelta(minutes=1))
    just_submitted = make_job(settings, tmp_path)  # the API is sending its message right now
    broker = {"default": 1}  # waiting's message; the others' were lost
    monkeypatch.setattr(dispatch, "waiting_messages", lambda queue: broker.get(queue, 0))

    # The dead worker's job goes back to the queue; the broker gets one message per queued job it lacks.
    assert set(jobs.requeue_lost_jobs(settings)) == {stale, never_sent}
    assert final(settings, stale).status == "queued" and final(settings, fresh).status == "running"
    assert sorted(enqueued) == sorted([stale, never_sent])
    broker["default"] = 3
    assert jobs.requeue_lost_jobs(settings) == []  # nothing missing any more: not queued twice
    assert fresh not in enqueued and waiting not in enqueued and just_submitted not in enqueued

    # Messages only wake workers up: the job run is the database's pick, each job claimed once.
    claimed = [jobs.claim_next_job(settings, "default") for _ in range(5)]
    assert [job.id for job in claimed[:4]] == [stale, never_sent, waiting, just_submitted] and claimed[4] is None
    assert claimed[0].attempts == 2 and claimed[0].claimed_by == jobs.this_process()


def test_dispatch_takes_turns_between_tenants(settings, tmp_path):
    flood = [make_job(settings, tmp_path, tenant="a", created_at=utcnow() - timedelta(seconds=60 - i)) for i in range(4)]
    single = make_job(settings, tmp_path, tenant="b")
    gpu_job = make_job(settings, tmp_path, tenant="c", device="cuda:0")
    order = []
    while (job := jobs.claim_next_job(settings, "default")) is not None:
        order.append(job.id)
    # Tenant b's one job runs second, not after all of a's; a cuda job waits for a GPU worker's queue.
    assert order == [flood[0], single, *flood[1:]]
    assert [jobs.claim_next_job(settings, "gpu").id, jobs.claim_next_job(settings, "gpu")] == [gpu_job, None]
