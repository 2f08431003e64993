"""The worker's memory budget: where it comes from, a job over it failing before it loads anything, and the
estimated and measured peaks in a job's result. Over HTTP against ``rebasin serve`` (embedded default)."""

import time
from datetime import datetime

import torch

from core.config import Settings
from matching.memory import (
    cgroup_limits,
    estimate_peak,
    machine_memory,
    physical_memory_bytes,
)
from tests.service_helpers import SIZES, make_mlp, run_job, upload
from worker import memory
from worker.memory import worker_budget

BUDGET = 100_000_000  # below what a worker process holds with torch loaded: no job fits


def test_cgroup_limits_v2_and_v1(tmp_path):
    proc = tmp_path / "cgroup"
    mount = tmp_path / "fs"
    (mount / "kubepods" / "pod1").mkdir(parents=True)
    (mount / "kubepods" / "memory.max").write_text("max\n")  # an ancestor without a limit
    (mount / "kubepods" / "pod1" / "memory.max").write_text("2147483648\n")
    proc.write_text("0::/kubepods/pod1\n")
    assert cgroup_limits(proc, mount) == [2147483648]
    # v1: the memory controller's hierarchy; its "unlimited" is a number near 2^63.
    (mount / "memory" / "docker" / "c1").mkdir(parents=True)
    (mount / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (mount / "memory" / "docker" / "c1" / "memory.limit_in_bytes").write_text("536870912\n")
    proc.write_text("5:cpu,cpuacct:/docker/c1\n4:memory:/docker/c1\n0::/\n")
    assert sorted(cgroup_limits(proc, mount)) == [536870912]
    # No limit anywhere: the machine's memory.
    proc.write_text("0::/\n")
    (mount / "memory.max").write_text("max\n")
    assert cgroup_limits(proc, mount) == []
    assert 0 < machine_memory()[0] <= physical_memory_bytes()


def test_estimate_grows_with_inputs_datasets_and_method():
    layer = {"w": {"dtype": "F32", "shape": [1000, 1000]}, "b": {"dtype": "F32", "shape": [1000]}}
    half = {"w": {"dtype": "BF16", "shape": [1000, 1000]}, "b": {"dtype": "BF16", "shape": [1000]}}
    data = {"inputs": {"dtype": "F32", "shape": [500, 1000]}, "targets": {"dtype": "I64", "shape": [500]}}
    pair = estimate_peak([layer, layer], method="weight_matching")
    assert pair.terms["inputs"] == 2 * 4 * 1_001_000 and pair.terms["model_fp32"] == 4 * 1_001_000
    assert estimate_peak([layer] * 3, method="weight_matching").peak_bytes > pair.peak_bytes
    # Half-precision inputs are smaller as loaded, but the working copies are float32.
    halves = estimate_peak([half, half], method="weight_matching")
    assert halves.terms["model_fp32"] == pair.terms["model_fp32"] and halves.peak_bytes < pair.peak_bytes
    with_data = estimate_peak([layer, layer], method="weight_matching", datasets=[data])
    assert with_data.peak_bytes > pair.peak_bytes
    ste = estimate_peak([layer, layer], method="ste_matching", datasets=[data])
    assert ste.peak_bytes > with_data.peak_bytes
    assert estimate_peak([layer, layer], method="auto", datasets=[data]).peak_bytes == ste.peak_bytes
    assert estimate_peak([layer, layer], method="weight_matching", baseline_bytes=10**9).peak_bytes == pair.peak_bytes + 10**9
    # Token ids without a model to run (architecture hf): the logits, positions x vocabulary, per example.
    lm = {"wte": {"dtype": "BF16", "shape": [50257, 64]}, "head": {"dtype": "BF16", "shape": [50257, 64]}}
    tokens = {"inputs": {"dtype": "I64", "shape": [100, 128]}, "targets": {"dtype": "I64", "shape": [100, 128]}}
    assert estimate_peak([lm, lm], method="weight_matching", datasets=[tokens]).terms["activations"] == 100 * 128 * 50257 * 4


def test_every_method_has_an_estimate():
    from matching.merge import AUTO_CANDIDATES, METHODS
    from matching.memory import AUTO_CANDIDATES as AUTO_ESTIMATED

    layer = {"w": {"dtype": "F32", "shape": [100, 100]}}
    assert AUTO_ESTIMATED == AUTO_CANDIDATES
    for method in METHODS:
        assert estimate_peak([layer, layer], method=method).peak_bytes > 0


def test_a_streaming_pair_counts_half_a_float32_model_not_the_inputs():
    from matching.merge import streams

    big = {"w": {"dtype": "BF16", "shape": [50_000, 4096]}}  # 0.4 GB as stored, 0.8 GB in float32
    assert streams("weight_matching", 2, False, {}) and not streams("weight_matching", 2, True, {})
    assert not streams("weight_matching", 3, False, {}) and not streams("activation_matching", 2, False, {})
    assert not streams("weight_matching", 2, False, {"merge_until": "layers.1"})
    streamed = estimate_peak([big, big], method="weight_matching", streams=True)
    in_memory = estimate_peak([big, big], method="weight_matching")
    assert streamed.peak_bytes < in_memory.peak_bytes / 4
    assert streamed.peak_bytes >= 0.5 * streamed.terms["model_fp32"]


def test_worker_budget_is_the_setting_else_the_machine_shared_by_the_jobs_at_once(monkeypatch):
    assert worker_budget(Settings(_env_file=None, worker_memory_bytes=8 * 2**30)) == (8 * 2**30, "setting")
    monkeypatch.setattr(memory, "jobs_at_once", 4)  # rebasin worker --concurrency 4
    assert worker_budget(Settings(_env_file=None, worker_memory_bytes=8 * 2**30)) == (2 * 2**30, "setting")
    total, source = machine_memory()
    assert worker_budget(Settings(_env_file=None)) == (total // 4, source)


def mlp_job(client) -> dict:
    ids = [upload(client, make_mlp(seed).state_dict(), f"m{seed}")["id"] for seed in (1, 2)]
    return {"method": "weight_matching", "checkpoints": ids, "architecture": {"name": "mlp"}}


def seconds(job: dict, start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


def test_a_job_over_the_budget_fails_before_loading_anything(make_embedded_service):
    with make_embedded_service(REBASIN_WORKER_MEMORY_BYTES=str(BUDGET)).client() as client:
        job = run_job(client, mlp_job(client))
    assert job["status"] == "failed" and job["attempts"] == 1, job
    error = job["error"]
    assert error["type"] == "https://rebasin.dev/problems/memory-budget" and error["status"] == 507
    assert error["title"] == "The job needs more memory than the worker has"
    assert error["worker_budget_bytes"] == BUDGET < error["estimated_peak_bytes"]
    # It says how much it needs and how much the worker has, in the user's units.
    needs, has = error["estimated_peak_bytes"] / 2**30, BUDGET / 2**30
    assert f"needs an estimated {needs:.2f} GiB" in error["detail"] and f"allows a job {has:.2f} GiB" in error["detail"]
    assert "REBASIN_WORKER_MEMORY_BYTES" in error["detail"]
    # Failed at once: nothing was loaded (progress still at the first checkpoint), no artifacts.
    assert job["progress"]["stage"] == "loading" and job["progress"]["completed"] == 0
    assert job["artifacts"] == [] and job["result"] is None
    assert seconds(job, "started_at", "finished_at") < 5


def test_a_job_reports_its_estimated_and_measured_peak(make_embedded_service):
    with make_embedded_service().client() as client:
        body = mlp_job(client)
        generator = torch.Generator().manual_seed(0)
        data = {"inputs": torch.randn(512, SIZES[0], generator=generator),
                "targets": torch.randint(0, SIZES[-1], (512,), generator=generator)}
        body["eval_dataset"] = upload(client, data, "eval", kind="datasets")["id"]
        body["options"] = {"lambdas": 3}  # evaluation, REPAIR and the plot run; few points keep it quick
        started = time.monotonic()
        job = run_job(client, body)
    assert job["status"] == "succeeded", job
    memory = job["result"]["memory"]
    assert memory["budget_source"] in ("cgroup", "physical") and memory["worker_budget_bytes"] >= 2**28
    # The measured peak is the whole process's (torch included), over its anonymous memory at the start.
    assert 0 < memory["baseline_bytes"] <= memory["measured_peak_bytes"]
    assert memory["measured_peak_bytes"] <= memory["estimated_peak_bytes"] <= memory["worker_budget_bytes"]
    assert time.monotonic() - started < 120
