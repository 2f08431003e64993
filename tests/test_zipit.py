"""ZipIt! (matching.zipit): the fold is exact where it should be, a planted permutation is found, and on two MLPs
trained on disjoint halves of digits (classes 0-4 and 5-9) zip's full merge beats weight matching's."""

import json

import pytest
import torch
import torch.nn.functional as F

from cli import demo
from matching.architectures import build_model, example_input
from matching.errors import MatchingError
from matching.evaluate import interpolate
from matching.infer import infer_spec
from matching.spec import PermutationSpec, apply_permutation, perm_sizes, random_perms
from matching.weight_matching import weight_matching
from matching.zipit import check_zip_spec, fold_weights, permutation_merge, zipit_merge
from matching.zipped import joint_predictions
from tests.data_helpers import digits

MLP = {"sizes": [64, 48, 48, 10]}


def model_and_spec(name, **options):
    model = build_model(name, **options).eval()
    return model, infer_spec(model, example_input(name, model))


def outputs(model, state, x):
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(x)


def zipped_mlp(trunk_state, head_state, x):
    """Forward of a zipped MLP, written out: the trunk's layers (merged), then one head's."""
    state = {**trunk_state, **head_state}
    n = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    for i in range(n):
        x = F.linear(x, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])
        x = F.relu(x) if i < n - 1 else x
    return x


def test_identical_models_with_no_within_merges_give_the_model_back():
    torch.manual_seed(0)
    x = torch.randn(300, 64)
    model, spec = model_and_spec("mlp", **MLP)
    state = model.state_dict()
    result = zipit_merge(spec, model, state, state, x, alpha=0.0, beta=0.0)
    for perm, merge in result.merges.items():
        n = merge.shape[0]
        assert torch.allclose(merge, torch.cat([torch.eye(n), torch.eye(n)], 1) / 2)  # a_i zipped with b_i
        assert result.info["merges"][perm] == {"across": n, "within_a": 0, "within_b": 0}
    assert torch.allclose(outputs(model, result.merged, x), outputs(model, state, x), atol=1e-5)

    # a BatchNorm conv net too (statistics kept: reset_bn=False, else they are re-estimated on x)
    resnet, rspec = model_and_spec("resnet20", width=1, in_channels=1)
    images = torch.rand(64, 1, 8, 8)
    rstate = resnet.state_dict()
    for key in rstate:  # statistics that are not the initial 0/1, so that merging them is tested
        if key.endswith(("running_mean", "running_var")):
            rstate[key] = torch.rand_like(rstate[key]) + (0.5 if key.endswith("var") else 0.0)
    merged = zipit_merge(rspec, resnet, rstate, rstate, images, alpha=0.0, beta=0.0, reset_bn=False).merged
    assert torch.allclose(outputs(resnet, merged, images), outputs(resnet, rstate, images), atol=1e-4)


def test_planted_permutation_is_recovered_and_folds_like_interpolation():
    torch.manual_seed(1)
    x = torch.randn(400, 64)
    model, spec = model_and_spec("mlp", **MLP)
    state_a = model.state_dict()
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in state_a.items()})
    planted = random_perms(sizes, torch.Generator().manual_seed(2))
    state_b = apply_permutation(spec, planted, state_a)
    result = zipit_merge(spec, model, state_a, state_b, x, alpha=0.0, beta=0.0)
    for perm, p in planted.items():
        # B's unit j is A's unit p[j]: b_j is unmerged from merged unit p[j] (the cluster of a_{p[j]})
        unmerge_b = result.unmerges[perm][len(p):]
        assert torch.equal(unmerge_b.argmax(1), p), perm
    assert torch.allclose(outputs(model, result.merged, x), outputs(model, state_a, x), atol=1e-5)

    # a permutation is a merge/unmerge: folding weight matching's permutations is the interpolation with aligned B
    other = build_model("mlp", **MLP).state_dict()
    perms, _ = weight_matching(spec, state_a, other)
    pairs = {p: permutation_merge(v, 0.3) for p, v in perms.items()}
    merged, heads = fold_weights(spec, state_a, other, {p: m for p, (m, _) in pairs.items()},
                                 {p: u for p, (_, u) in pairs.items()}, merge_lambda=0.3)
    expected = interpolate(state_a, apply_permutation(spec, perms, other), 0.3)
    assert heads == [] and all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)


def test_partial_merge_heads_read_the_trunk_in_their_own_basis():
    torch.manual_seed(3)
    x = torch.randn(300, 64)
    model, spec = model_and_spec("mlp", **MLP)
    state_a, state_b = model.state_dict(), build_model("mlp", **MLP).state_dict()
    # nothing merged: the heads are A and B
    nothing = zipit_merge(spec, model, state_a, state_b, x, trunk=[])
    assert nothing.merged == {} and nothing.merges == {}
    for head, state in zip(nothing.heads, (state_a, state_b)):
        assert torch.allclose(zipped_mlp({}, head, x), outputs(model, state, x), atol=1e-5)
    # identical models cut after layers.0: both heads compute the model
    trunk = ["layers.0.weight", "layers.0.bias"]
    same = zipit_merge(spec, model, state_a, state_a, x, trunk=trunk, alpha=0.0, beta=0.0)
    assert set(same.merged) == set(trunk) and set(same.heads[0]) == set(state_a) - set(trunk)
    assert same.info["merged_permutations"] == ["P_layers.0"]
    for head in same.heads:
        assert torch.allclose(zipped_mlp(same.merged, head, x), outputs(model, state_a, x), atol=1e-5)


def test_refused_specs_and_cuts():
    resnet, rspec = model_and_spec("resnet20", width=1, in_channels=1)
    state = resnet.state_dict()
    images = torch.rand(16, 1, 8, 8)
    stage1 = [k for k in state if k.startswith(("conv1.", "bn1.", "layer1."))]
    result = zipit_merge(rspec, resnet, state, state, images, trunk=stage1)  # a stage boundary: allowed
    assert "P_conv1" in result.info["merged_permutations"]
    assert "layer2.0.downsample.0.weight" in result.heads[0]
    inside = [k for k in state if k.startswith(("conv1.", "bn1.", "layer1.0."))]
    with pytest.raises(MatchingError, match="cut splits 'P_conv1'.*stage boundary"):
        zipit_merge(rspec, resnet, state, state, images, trunk=inside)
    model, spec = model_and_spec("mlp", **MLP)
    grouped = PermutationSpec(spec.axes_to_perm, {"P_layers.0": {"groups": 4, "group_perm": None}})
    with pytest.raises(MatchingError, match="block-structured"):
        zipit_merge(grouped, model, model.state_dict(), model.state_dict(), torch.rand(8, 64))
    embedding = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 8), "fc": torch.nn.Linear(8, 3)})
    with pytest.raises(MatchingError, match="'emb.weight' belongs to Embedding"):  # its units are on axis 1
        check_zip_spec(PermutationSpec({"emb.weight": (None, "P"), "fc.weight": (None, "P"), "fc.bias": (None,)}),
                       embedding)
    with pytest.raises(MatchingError, match="alpha, beta"):
        zipit_merge(spec, model, model.state_dict(), model.state_dict(), torch.rand(8, 64), alpha=2.0)


@pytest.fixture(scope="module")
def task_pair():
    """Two MLPs from different seeds, A trained on digits 0-4 and B on 5-9 (10-way heads each)."""
    x, y, xe, ye = digits()
    states = []
    for seed, classes in ((0, range(5)), (1, range(5, 10))):
        keep = torch.isin(y, torch.tensor(list(classes)))
        states.append(demo.train("mlp", {"sizes": [64, 128, 128, 10]}, x[keep], y[keep], seed, epochs=20, lr=0.05))
    return states, x, xe, ye


def test_zip_beats_weight_matching_on_models_of_different_tasks(task_pair):
    (state_a, state_b), x, xe, ye = task_pair
    model, spec = model_and_spec("mlp", sizes=[64, 128, 128, 10])

    label_sets = [list(range(5)), list(range(5, 10))]

    def joint(logits_a, logits_b):  # each head's probabilities over its own classes (matching.zipped's rule)
        return (joint_predictions([logits_a, logits_b], label_sets) == ye).float().mean().item()

    def joint_accuracy(state):  # one model, its output split by label set
        return joint(*(outputs(model, state, xe),) * 2)

    ensemble = joint(outputs(model, state_a, xe), outputs(model, state_b, xe))
    perms, _ = weight_matching(spec, state_a, state_b)
    matched = joint_accuracy(interpolate(state_a, apply_permutation(spec, perms, state_b), 0.5))
    zipped = joint_accuracy(zipit_merge(spec, model, state_a, state_b, x).merged)
    print(f"joint accuracy: ensemble {ensemble:.3f}, zip {zipped:.3f}, weight matching {matched:.3f}")
    assert zipped >= matched + 0.1  # measured 0.856 against 0.556 (ensemble 0.893)
    assert zipped <= ensemble + 0.02

    # partial, cut after layers.0: shared trunk, each head its own classes
    def two_heads(trunk, heads):
        return joint(*(zipped_mlp(trunk, head, xe) for head in heads))

    trunk = ["layers.0.weight", "layers.0.bias"]
    aligned = apply_permutation(spec, perms, state_b)
    wm_trunk = interpolate({k: state_a[k] for k in trunk}, {k: aligned[k] for k in trunk}, 0.5)
    matched_cut = two_heads(wm_trunk, [{k: v for k, v in s.items() if k not in trunk} for s in (state_a, aligned)])
    result = zipit_merge(spec, model, state_a, state_b, x, trunk=trunk)
    zipped_cut = two_heads(result.merged, result.heads)
    print(f"cut after layers.0: zip {zipped_cut:.3f}, weight matching {matched_cut:.3f}")
    assert zipped_cut >= matched_cut + 0.05  # measured 0.880 against 0.687


def test_zip_through_merge_checkpoints(task_pair, tmp_path):
    from matching.merge import merge_checkpoints, write_artifacts
    from tests.data_helpers import write_digits

    (state_a, state_b), x, xe, ye = task_pair
    data = write_digits(tmp_path / "digits.safetensors")
    job = {"architecture": {"name": "mlp"}, "dataset": data}
    outcome = merge_checkpoints([state_a, state_b], method="zip", options={"lambdas": 3, "beta": 0.5}, **job)
    report = outcome.report
    assert report["method"] == "zip" and report["options"]["alpha"] == 0.0 and report["options"]["beta"] == 0.5
    assert report["repair"]["mode"] == "none" and report["matching"]["merges"]["P_layers.0"]["within_a"] > 0
    model, spec = model_and_spec("mlp", sizes=[64, 128, 128, 10])
    library = zipit_merge(spec, model, state_a, state_b, x, beta=0.5).merged
    assert all(torch.allclose(outcome.merged[k], library[k], atol=1e-6) for k in library)
    accuracy = (outputs(model, outcome.merged, xe).argmax(1) == ye).float().mean().item()
    assert report["merged"]["accuracy"] == pytest.approx(accuracy, abs=1e-6) and accuracy > 0.8
    write_artifacts(outcome, tmp_path / "out")
    groups = json.loads((tmp_path / "out" / "permutation.json").read_text())["zip"]["P_layers.1"]
    assert len(groups) == 128 and sorted(i for a, _ in groups for i in a) == list(range(128))

    # the local command: python -m matching merge --method zip
    from safetensors.torch import save_file

    from matching.__main__ import main
    for name, state in (("a", state_a), ("b", state_b)):
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--arch", "mlp",
                 "--data", str(data), "--method", "zip", "--beta", "0.5", "--lambdas", "3",
                 "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["merged"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)

    for options, others, message in (
            ({"alpha": 1.5}, {}, "out of range"),
            ({"repair": "repair"}, {}, "not available with zip"),
            ({}, {"dataset": None}, "zip needs a dataset"),
            ({}, {"states": [state_a, state_b, state_a]}, "zip merges two checkpoints")):
        with pytest.raises(MatchingError, match=message):
            merge_checkpoints(others.pop("states", [state_a, state_b]), method="zip", options=options, **{**job, **others})
