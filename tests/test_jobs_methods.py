"""Every method of the paper through the HTTP API, on models trained on digits, and the 4xx answers to bad inputs."""

import json

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import matching
from tests.data_helpers import digits, trained
from tests.service_helpers import artifact, run_job, submit, upload, wait_for

MLP = {"sizes": [64, 128, 128, 10]}


@pytest.fixture(scope="module")
def models():
    return [trained("mlp", seed=seed, epochs=10, **MLP) for seed in (0, 1, 2)]


def digits_dataset(client) -> str:
    x, y, eval_x, eval_y = digits()
    return upload(client, {"inputs": x, "targets": y, "eval_inputs": eval_x, "eval_targets": eval_y}, "digits", kind="datasets")["id"]


def test_all_methods_merge_many_and_user_spec(embedded_service, models):
    with embedded_service.client() as client:
        architectures = {a["name"]: a for a in client.get("/v1/architectures").json()["items"]}
        assert {"mlp", "vgg", "resnet20", "resnet18", "resnet50"} <= architectures.keys()
        assert "width" in architectures["resnet20"]["options"]

        ids = [upload(client, state, f"m{i}")["id"] for i, state in enumerate(models)]
        data = digits_dataset(client)
        pair = {"checkpoints": ids[:2], "architecture": {"name": "mlp"}, "dataset": data, "eval_dataset": data}
        jobs = {
            method: submit(client, pair | {"method": method, "options": {"seed": 0, "lambdas": 5} | extra})
            for method, extra in (("weight_matching", {}), ("activation_matching", {}), ("ste_matching", {"steps": 20}))
        }
        merge_many = submit(client, pair | {"checkpoints": ids, "options": {"lambdas": 5}})
        for method, job in jobs.items():
            job = wait_for(client, job["id"], timeout_s=300)
            assert job["status"] == "succeeded", job
            barrier = job["result"]["barrier"]
            assert barrier["aligned"]["loss"] < barrier["naive"]["loss"], (method, barrier)
            assert len(job["result"]["curves"]["lambdas"]) == 5
            assert "barrier.png" in {a["name"] for a in job["artifacts"]}
            assert artifact(client, job, "barrier.png").startswith(b"\x89PNG")

        job = wait_for(client, merge_many["id"], timeout_s=300)
        assert job["status"] == "succeeded", job
        names = {a["name"] for a in job["artifacts"]}
        assert {"aligned_0.safetensors", "aligned_1.safetensors", "aligned_2.safetensors", "merged.safetensors"} <= names

        # A user-supplied spec: weight matching with no architecture and no evaluation.
        spec = json.loads(artifact(client, job, "permutation.json"))
        spec = {"axes_to_perm": spec["axes_to_perm"]}
        job = run_job(client, {"checkpoints": ids[:2], "permutation_spec": spec})
        assert job["status"] == "succeeded", job
        assert "barrier" not in job["result"]
        aligned = load_safetensors(artifact(client, job, "aligned.safetensors"))
    model_b, model_aligned = matching.build_model("mlp", **MLP), matching.build_model("mlp", **MLP)
    model_b.load_state_dict(models[1])
    model_aligned.load_state_dict(aligned)
    inputs = digits()[2]
    with torch.no_grad():
        assert (model_b(inputs) - model_aligned(inputs)).abs().max() <= 1e-4


def test_bad_inputs_are_4xx_with_a_reason(embedded_service, models):
    with embedded_service.client() as client:
        a, b = (upload(client, state, f"m{i}")["id"] for i, state in enumerate(models[:2]))
        wide = upload(client, trained("mlp", seed=5, epochs=1, sizes=[64, 96, 96, 10]), "wide")["id"]
        conv = [upload(client, matching.build_model("resnet20", width=1, norm="layer").state_dict(), "resnet")["id"] for _ in (0, 1)]
        wrong_data = upload(client, {"inputs": torch.rand(10, 32), "targets": torch.zeros(10, dtype=torch.int64)}, "d", kind="datasets")["id"]
        nan_state = dict(models[0]) | {"layers.0.weight": torch.full_like(models[0]["layers.0.weight"], float("nan"))}
        cases = [
            ({"checkpoints": [a, wide], "architecture": {"name": "mlp"}}, "differ in shape"),
            ({"checkpoints": conv, "architecture": {"name": "mlp"}}, "mlp"),
            ({"checkpoints": [a, a], "architecture": {"name": "mlp"}}, "same checkpoint twice"),
            ({"checkpoints": [a, b], "architecture": {"name": "resnet20"}}, "resnet20"),
            ({"checkpoints": [a, b], "architecture": {"name": "transformer"}}, "transformer"),
            ({"checkpoints": [a, b], "permutation_spec": {"axes_to_perm": {"nope": [None]}}}, "nope"),
            ({"checkpoints": [a, b], "architecture": {"name": "mlp"}, "method": "activation_matching"}, "dataset"),
            ({"checkpoints": [a, b], "architecture": {"name": "mlp"}, "method": "ste_matching"}, "dataset"),
            ({"checkpoints": [a, b], "architecture": {"name": "mlp"}, "options": {"temperature": 1}}, "temperature"),
            ({"checkpoints": [a, b], "architecture": {"name": "mlp"}, "options": {"repair": "repair"}}, "statistics on data"),
            ({"checkpoints": [a, b], "architecture": {"name": "mlp"}, "options": {"repair": "always"}}, "repair"),
            ({"checkpoints": [a, b], "architecture": {"name": "mlp"}, "permutation_spec": {"axes_to_perm": {}}}, "exactly one"),
        ]
        for body, reason in cases:
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert reason in response.text, (reason, response.text)

        response = client.post("/v1/checkpoints", files={"file": ("nan.safetensors", save_safetensors(nan_state))})
        assert response.status_code == 422 and "NaN" in response.json()["detail"]

        # A dataset the model cannot take is refused at submission, not after a wait in the queue.
        for method in ("activation_matching", "weight_matching"):
            body = {"checkpoints": [a, b], "architecture": {"name": "mlp"}, "method": method, "dataset": wrong_data}
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 422 and "per-example shape [32]" in response.json()["detail"], response.text
        assert all(j["status"] != "succeeded" for j in client.get("/v1/jobs").json()["items"])


def test_auto_keeps_the_candidate_with_the_lowest_held_out_barrier(embedded_service):
    """method "auto" over HTTP on a trained pair where activation matching wins (ResNet20 with GroupNorm, Adam, as
    benchmarks/reproduce.py trains it: weight matching's REPAIRed barrier stays high there): every candidate is
    reported, the kept one has the lowest barrier, and its barrier is the job's. With time_budget_s, STE runs too."""
    from benchmarks.reproduce import train

    data = digits(image=True)
    options = {"width": 1, "norm": "layer", "num_classes": 10, "in_channels": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is many times faster on a loaded machine
    try:
        states = [train("resnet20", options, data, seed, epochs=6) for seed in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    with embedded_service.client() as client:
        ids = [upload(client, state, f"ln{i}")["id"] for i, state in enumerate(states)]
        x, y, eval_x, eval_y = data
        dataset = upload(client, {"inputs": x, "targets": y, "eval_inputs": eval_x, "eval_targets": eval_y},
                         "digits-images", kind="datasets")["id"]
        body = {"method": "auto", "checkpoints": ids, "architecture": {"name": "resnet20"}, "dataset": dataset}
        response = client.post("/v1/jobs", json=body | {"dataset": None})
        assert response.status_code == 422 and "dataset" in response.text, response.text
        job = run_job(client, body | {"options": {"lambdas": 3}}, timeout_s=900)
        budgeted = submit(client, body | {"options": {"lambdas": 3, "time_budget_s": 600, "steps": 3}})
        assert job["status"] == "succeeded", job
        assert job["method"] == "auto"
        result = job["result"]
        auto = result["auto"]
        scores = {m: c["score"] for m, c in auto["candidates"].items()}
        print(f"\nauto: held-out REPAIRed barriers {scores}, kept {auto['chosen']}")
        assert set(scores) == {"weight_matching", "activation_matching"}
        assert "time_budget_s" in auto["skipped"]["ste_matching"]
        assert auto["chosen"] == "activation_matching" == min(scores, key=scores.get)
        assert scores["weight_matching"] > scores["activation_matching"] + 0.1
        assert result["barrier"]["aligned_repair"]["loss"] == pytest.approx(scores["activation_matching"])
        assert auto["candidates"]["activation_matching"]["barrier"] == result["barrier"]["aligned_repair"]
        assert auto["split"] == result["evaluation"]["split"] == "dataset:eval"
        assert json.loads(artifact(client, job, "report.json"))["auto"]["chosen"] == "activation_matching"

        budgeted = wait_for(client, budgeted["id"], timeout_s=900)
        assert budgeted["status"] == "succeeded", budgeted
        ran = budgeted["result"]["auto"]["candidates"]
        assert set(ran) == {"weight_matching", "activation_matching", "ste_matching"}
        assert budgeted["result"]["auto"]["chosen"] == min(ran, key=lambda m: ran[m]["score"])
