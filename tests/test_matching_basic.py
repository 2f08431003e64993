"""Minimal path: MLP spec, weight matching on pairs, merge_checkpoints, artifacts, input checks."""

import json

import pytest
import torch
from safetensors.torch import load_file

import matching
from matching.spec import apply_permutation, invert, perm_sizes, random_perms


def _mlp(seed, sizes=(12, 32, 24, 5)):
    torch.manual_seed(seed)
    return matching.build_model("mlp", sizes=list(sizes))


def _spec(model):
    return matching.infer_spec(model, torch.randn(3, model.layers[0].in_features))


def test_mlp_spec_layout_and_json_roundtrip():
    model = _mlp(0)
    spec = _spec(model)
    assert spec.axes_to_perm["layers.0.weight"] == ("P_layers.0", None)
    assert spec.axes_to_perm["layers.1.weight"] == ("P_layers.1", "P_layers.0")
    assert spec.axes_to_perm["layers.2.weight"] == (None, "P_layers.1")
    assert spec.axes_to_perm["layers.2.bias"] == (None,)
    assert matching.spec_from_json(json.loads(json.dumps(matching.spec_to_json(spec)))) == spec


def test_permuted_mlp_has_identical_outputs():
    model = _mlp(0)
    spec = _spec(model)
    state = model.state_dict()
    perms = random_perms(perm_sizes(spec, {k: v.shape for k, v in state.items()}), torch.Generator().manual_seed(1))
    assert any((p != torch.arange(len(p))).any() for p in perms.values())
    permuted = _mlp(5)
    permuted.load_state_dict(apply_permutation(spec, perms, state))
    x = torch.randn(50, 12)
    assert (model(x) - permuted(x)).abs().max() <= 1e-5
    assert (model.layers[0].weight - permuted.layers[0].weight).abs().max() > 1e-3  # it did move


def test_planted_permutation_recovered_exactly():
    model = _mlp(0)
    spec = _spec(model)
    state = model.state_dict()
    planted = random_perms(perm_sizes(spec, {k: v.shape for k, v in state.items()}), torch.Generator().manual_seed(2))
    state_b = apply_permutation(spec, planted, state)
    perms, info = matching.weight_matching(spec, state, state_b, seed=0)
    for name, p in planted.items():  # B[perm] = A means perm = inverse of the planted one
        assert torch.equal(perms[name], invert(p)), name
    aligned = apply_permutation(spec, perms, state_b)
    assert all(torch.equal(aligned[k], state[k]) for k in state)
    assert info["objective_final"] > info["objective_initial"]


def test_merge_checkpoints_pair_aligned_b_keeps_outputs(tmp_path):
    a, b = _mlp(0), _mlp(1)
    seen = []
    outcome = matching.merge_checkpoints([a.state_dict(), b.state_dict()], architecture={"name": "mlp", "options": {}},
                                         options={"seed": 3}, progress=lambda *args: seen.append(args))
    aligned = _mlp(9)
    aligned.load_state_dict(outcome.aligned[0])
    x = torch.randn(100, 12)
    assert (aligned(x) - b(x)).abs().max() <= 1e-4
    m = outcome.report["matching"]
    assert m["objective_final"] >= m["objective_initial"] and m["iterations"] >= 1 and m["seconds"] >= 0
    assert seen and all(len(s) == 4 for s in seen)
    files = matching.write_artifacts(outcome, tmp_path)
    assert sorted(p.name for p in files) == ["aligned.safetensors", "merged.safetensors", "permutation.json", "report.json"]
    perm_json = json.loads((tmp_path / "permutation.json").read_text())
    assert set(perm_json["permutations"]) == {"P_layers.0", "P_layers.1"}
    assert sorted(perm_json["permutations"]["P_layers.0"]) == list(range(32))
    merged = load_file(str(tmp_path / "merged.safetensors"))
    expected = 0.5 * (a.state_dict()["layers.2.bias"] + b.state_dict()["layers.2.bias"])  # unpermuted output bias
    assert torch.allclose(merged["layers.2.bias"], expected, atol=1e-6)


def test_merge_with_bare_spec_and_half_precision():
    a, b = _mlp(0), _mlp(1)
    spec = matching.spec_to_json(_spec(a))
    states = [{k: v.half() for k, v in m.state_dict().items()} for m in (a, b)]
    outcome = matching.merge_checkpoints(states, permutation_spec=spec)
    assert all(v.dtype == torch.float16 for v in outcome.merged.values())
    assert "barrier" not in outcome.report


def test_cancel_raises():
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(matching.Cancelled):
        matching.merge_checkpoints([a.state_dict(), b.state_dict()], architecture={"name": "mlp"},
                                   should_cancel=lambda: True)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(method="weight_matching", architecture={"name": "nope"}), "unknown architecture"),
    (dict(method="weight_matching", architecture={"name": "mlp", "options": {"depth": 3}}), "unknown option"),
    (dict(method="weight_matching", architecture={"name": "mlp"}, options={"sed": 1}), "unknown job option"),
    (dict(method="weight_matching", architecture={"name": "mlp"}, options={"max_iter": 0}), "out of range"),
    (dict(method="activation_matching", architecture={"name": "mlp"}), "needs a dataset"),
    (dict(method="ste_matching", architecture={"name": "mlp"}), "needs a dataset"),
    (dict(method="ste_matching", permutation_spec={"axes_to_perm": {}}, has_dataset=True), "bare permutation_spec"),
    (dict(method="magic", architecture={"name": "mlp"}), "unknown method"),
    (dict(method="weight_matching"), "exactly one"),
    (dict(method="weight_matching", architecture={"name": "mlp", "options": {"sizes": [12, 33, 24, 5]}}), "does not fit"),
    (dict(method="weight_matching", permutation_spec={"axes_to_perm": {"layers.0.weight": ["P", None]}}), "no entry"),
    (dict(method="weight_matching", architecture={"name": "resnet20"}), "does not look like"),
])
def test_check_inputs_rejects(kwargs, fragment):
    shapes = _shapes(_mlp(0))
    with pytest.raises(matching.MatchingError, match=fragment):
        matching.check_inputs([shapes, shapes], **kwargs)


def test_check_inputs_rejects_mismatched_checkpoints_and_single():
    s1, s2 = _shapes(_mlp(0)), _shapes(_mlp(0, sizes=(12, 33, 24, 5)))
    with pytest.raises(matching.MatchingError, match="differ in shape"):
        matching.check_inputs([s1, s2], method="weight_matching", architecture={"name": "mlp"})
    with pytest.raises(matching.MatchingError, match="at least two"):
        matching.check_inputs([s1], method="weight_matching", architecture={"name": "mlp"})
    matching.check_inputs([s1, s1, s1], method="weight_matching", architecture={"name": "mlp"})


def test_nan_weights_rejected():
    a, b = _mlp(0).state_dict(), _mlp(1).state_dict()
    b["layers.1.weight"][0, 0] = float("nan")
    with pytest.raises(matching.MatchingError, match="NaN"):
        matching.merge_checkpoints([a, b], architecture={"name": "mlp"})
