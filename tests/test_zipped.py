"""matching.zipped: cuts by execution order, the zipped model's heads, its trunk run once, and the options' checks."""

import pytest
import torch
from safetensors.torch import save_file

import matching
from matching.architectures import build_model
from matching.zipped import count_flops, joint_predictions, plan_cut, trace_calls, trunk_keys, zipped_state

SIZES = [64, 32, 32, 32, 10]


def two(name, **options):
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model(name, **options).eval())
    return models


def test_nothing_merged_heads_compute_a_and_b(tmp_path):
    a, b = two("mlp", sizes=SIZES)
    state = zipped_state(a.state_dict(), b.state_dict(), a.state_dict(), [])
    path = tmp_path / "zipped.safetensors"
    save_file(state, str(path), metadata={"format": "rebasin-zipped", "merge_until": "",
                                          "architecture": '{"name": "mlp", "options": {}}'})
    x = torch.rand(16, 64)
    for zipped in (matching.load_zipped(state, "mlp"), matching.load_zipped(path)):
        assert zipped.cut.module is None and not zipped.cut.trunk_modules
        with torch.no_grad():
            head_a, head_b = zipped(x)
            assert torch.allclose(head_a, a(x), atol=1e-5) and torch.allclose(head_b, b(x), atol=1e-5)
            assert torch.allclose(matching.load_zipped(state, "mlp", average=True)(x), (a(x) + b(x)) / 2, atol=1e-5)


@pytest.mark.parametrize("name, options, cut, shape", [
    ("mlp", {"sizes": SIZES}, "layers.1", (64,)),
    # Inside a residual block: its ReLU module is called before and after the cut, and `out += identity`
    # changes the cut's output in place.
    ("resnet18", {"num_classes": 10}, "layer1.0.bn2", (3, 32, 32)),
])
def test_trunk_is_shared_and_runs_once(name, options, cut, shape):
    a, b = two(name, **options)
    example = torch.rand(1, *shape)
    keys = trunk_keys(a, plan_cut(trace_calls(a, example), cut))
    assert keys and len(keys) < len(a.state_dict())
    zipped = matching.load_zipped(zipped_state(a.state_dict(), b.state_dict(), a.state_dict(), keys), name)
    assert zipped.heads[0].state_dict()[keys[0]].data_ptr() == zipped.heads[1].state_dict()[keys[0]].data_ptr()
    b_on_trunk = build_model(name, **options).eval()
    b_on_trunk.load_state_dict({**b.state_dict(), **{k: a.state_dict()[k] for k in keys}})
    x = torch.rand(2, *shape)
    with torch.no_grad():
        head_a, head_b = zipped(x)
        assert torch.allclose(head_a, a(x), atol=1e-5)
        assert torch.allclose(head_b, b_on_trunk(x), atol=1e-5)  # head 1 replays the trunk: the same function
    single = count_flops(a, example)
    assert single < count_flops(zipped, example) < 2 * single


def test_joint_prediction_takes_each_class_from_its_own_head():
    head_a = torch.tensor([[0.0, 5.0, 9.0, 9.0], [1.0, 0.0, 9.0, 9.0]])
    head_b = torch.tensor([[9.0, 9.0, 1.0, 2.0], [9.0, 9.0, 3.0, 0.0]])
    assert joint_predictions([head_a, head_b], [[0, 1], [2, 3]]).tolist() == [1, 2]
    # Heads are compared by their probabilities: a constant added to one head's logits (which its softmax, and so
    # its training, cannot see) changes nothing; raw logits would give every example to head B.
    assert joint_predictions([head_a, head_b + 100], [[0, 1], [2, 3]]).tolist() == [1, 2]


@pytest.mark.parametrize("options, message", [
    ({"merge_until": "layers.9"}, "neither a module"),
    ({"label_sets": [[0, 1], [1, 2]]}, "disjoint"),
    ({"label_sets": [[0, 1]]}, "two lists"),
    ({"label_sets": [[0], [10]]}, "10 outputs"),
    ({"merge_until": ""}, "merge_until"),
])
def test_options_are_checked(options, message):
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in two("mlp", sizes=SIZES)]
    with pytest.raises(matching.MatchingError, match=message):
        matching.check_inputs(shapes, method="weight_matching", architecture={"name": "mlp"}, options=options,
                              has_eval_dataset=True)
    with pytest.raises(matching.MatchingError, match="exactly two"):
        matching.check_inputs(shapes * 2, method="weight_matching", architecture={"name": "mlp"},
                              options={"merge_until": "layers.1"})
