"""Partial merges over HTTP on the embedded server: two MLPs trained from different seeds on digits' classes 0-4 and
5-9, merged up to the middle of the network by zip and by weight matching (zipped.safetensors, loaded through the
library), and the sweep of activation matching."""

import functools

import torch
from safetensors.torch import load as load_safetensors

import matching
from cli import demo
from tests.data_helpers import digits
from tests.service_helpers import artifact, run_job, upload

SIZES = [64, 128, 128, 128, 10]  # cut points after layers.0, layers.1 (the middle), layers.2
LABEL_SETS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@functools.lru_cache
def half_models() -> tuple[dict, dict]:
    """A trained on classes 0-4, B on 5-9, from different seeds."""
    x, y, _, _ = digits()
    states = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a loaded machine
    try:
        for seed, classes in ((1, LABEL_SETS[0]), (2, LABEL_SETS[1])):
            keep = torch.isin(y, torch.tensor(classes))
            states.append(demo.train("mlp", {"sizes": SIZES}, x[keep], y[keep], seed, epochs=30, weight_decay=5e-4))
    finally:
        torch.set_num_threads(threads)
    return tuple(states)


def test_partial_merge_and_sweep_over_http(embedded_service):
    a, b = half_models()
    x, y, eval_x, eval_y = digits()
    with embedded_service.client() as client:
        ids = [upload(client, state, name)["id"] for state, name in ((a, "a"), (b, "b"))]
        data = upload(client, {"inputs": x, "targets": y, "eval_inputs": eval_x, "eval_targets": eval_y}, "digits",
                      kind="datasets")["id"]
        job = {"checkpoints": ids, "architecture": {"name": "mlp"}, "dataset": data, "eval_dataset": data}
        middle = {"merge_until": "layers.1", "label_sets": LABEL_SETS, "lambdas": 3}
        zip_job = run_job(client, job | {"method": "zip", "options": middle})
        permuted_job = run_job(client, job | {"method": "weight_matching", "options": middle})
        sweep_job = run_job(client, job | {"method": "activation_matching",
                                           "options": middle | {"merge_until": "sweep"}})
        bad = client.post("/v1/jobs", json=job | {"options": {"merge_until": "layers.7"}})
        zipped_bytes = artifact(client, zip_job, "zipped.safetensors")
    for done in (zip_job, permuted_job, sweep_job):
        assert done["status"] == "succeeded", done["error"]
    assert bad.status_code == 422 and "layers.7" in bad.json()["detail"]

    zipped, permuted = zip_job["result"]["joint_accuracy"], permuted_job["result"]["joint_accuracy"]
    full_merges = [permuted["full_merge"], sweep_job["result"]["joint_accuracy"]["full_merge"]]  # weight, activation
    print("joint accuracy, cut after layers.1: zip", zipped["zipped"], "weight matching", permuted["zipped"],
          "ensemble", zipped["ensemble"], "full permutation merges", full_merges, "full zip", zipped["full_merge"])
    assert zipped["zipped"] >= permuted["zipped"]  # zip, at the same cut as weight matching
    assert zipped["zipped"] >= zipped["ensemble"] - 0.10
    # measured 0.893 against 0.693 (weight matching), ensemble 0.911: the 0.20 is met with no margin
    assert zipped["zipped"] >= max(full_merges) + 0.15
    assert permuted["zipped"] >= permuted["full_merge"]  # a permutation merge, too, keeps more when cut
    partial = zip_job["result"]["partial"]
    assert partial["cut"] == "layers.1"
    assert partial["shared"] == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    assert partial["flops"]["merged"] < partial["flops"]["zipped"] < partial["flops"]["two_models"]

    # The artifact is the model the report measured: its joint accuracy, through the library.
    assert {a["name"] for a in zip_job["artifacts"]} >= {"zipped.safetensors", "merged.safetensors", "report.json"}
    model = matching.load_zipped(load_safetensors(zipped_bytes), "mlp")
    with torch.no_grad():
        head_a, head_b = model(eval_x)
    union = torch.cat([head_a[:, :5].softmax(1), head_b[:, 5:].softmax(1)], 1)  # each head's own probabilities
    assert abs((union.argmax(1) == eval_y).float().mean().item() - zipped["zipped"]) < 1e-6

    cuts = sweep_job["result"]["partial"]["cuts"]
    print("sweep (activation matching):", [(c["module"], round(c["joint_accuracy"], 3), c["flops"]) for c in cuts])
    assert [c["module"] for c in cuts] == ["layers.0", "layers.1", "layers.2"]
    # Less merged (an earlier cut): higher joint accuracy, more FLOPs.
    accuracies = [c["joint_accuracy"] for c in cuts]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] > accuracies[-1] + 0.05
    assert accuracies[1] >= sweep_job["result"]["joint_accuracy"]["full_merge"] + 0.08
    assert [c["flops"] for c in cuts] == sorted((c["flops"] for c in cuts), reverse=True)
    assert "zipped.safetensors" not in {a["name"] for a in sweep_job["artifacts"]}
