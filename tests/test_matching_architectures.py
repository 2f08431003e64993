"""Every registered architecture (and norm): inferred spec is function-preserving, a planted permutation is
recovered exactly, aligning an independent model keeps its outputs, options are inferred from shapes."""

import pytest
import torch

import matching
from matching.architectures import example_input
from matching.spec import apply_permutation, invert, perm_sizes, random_perms

CASES = [
    ("mlp", {"sizes": [20, 48, 32, 5]}),
    ("vgg", {"config": "vgg11", "width": 0.125, "norm": "none"}),
    ("vgg", {"config": "vgg11", "width": 0.125, "norm": "batch"}),
    ("vgg", {"config": "vgg16", "width": 0.125, "norm": "layer", "num_classes": 7, "in_channels": 1}),
    ("resnet20", {"width": 1, "norm": "batch"}),
    ("resnet20", {"width": 2, "norm": "layer", "num_classes": 4, "in_channels": 1}),
    ("resnet18", {"num_classes": 10}),
    ("resnet50", {"num_classes": 10}),
]
IDS = [f"{n}-{'-'.join(str(v) for v in o.values())}" for n, o in CASES]


def _random_model(name, options, seed):
    """A model with every float tensor randomised (BN affine and running stats too, like a trained net)."""
    torch.manual_seed(seed)
    model = matching.build_model(name, **options)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            value.copy_(torch.rand_like(value) + 0.5)
        elif key.endswith(("running_mean", "bias")) or (value.is_floating_point() and value.dim() == 1):
            value.copy_(torch.randn_like(value) * 0.1 + (1.0 if key.endswith("weight") else 0.0))
    model.load_state_dict(state)
    return model.eval()


def _outputs(name, options, state, x):
    model = matching.build_model(name, **options)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_architecture(name, options):
    model = _random_model(name, options, 0)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    # options come back from the shapes alone
    inferred = matching.infer_options(name, shapes)
    assert {k: inferred[k] for k in options} == options
    x = example_input(name, model, batch=4)
    spec = matching.infer_spec(model, x)  # verifies itself in float64; raises if not function-preserving
    sizes = perm_sizes(spec, shapes)
    assert sizes and all(n > 1 for n in sizes.values())
    if any(k.endswith("running_mean") for k in state):  # BN statistics are permuted with their channels
        assert all(any(axes) for k, axes in spec.axes_to_perm.items() if k.endswith(("running_mean", "running_var")))
    # a random permutation in float32 keeps the outputs
    planted = random_perms(sizes, torch.Generator().manual_seed(1))
    permuted = apply_permutation(spec, planted, state)
    reference = _outputs(name, options, state, x)
    assert (_outputs(name, options, permuted, x) - reference).abs().max().item() <= 1e-4 * max(1.0, reference.abs().max().item())
    # weight matching recovers the planted permutation exactly
    perms, info = matching.weight_matching(spec, state, permuted, seed=0)
    for perm, p in planted.items():
        assert torch.equal(perms[perm], invert(p)), perm
    # aligning an independent model leaves its outputs unchanged
    other = _random_model(name, options, 1).state_dict()
    perms, info = matching.weight_matching(spec, state, other, seed=0, max_iter=3)
    assert info["objective_final"] > info["objective_initial"]
    aligned = apply_permutation(spec, perms, other)
    before, after = _outputs(name, options, other, x), _outputs(name, options, aligned, x)
    assert (after - before).abs().max().item() <= 1e-4 * max(1.0, before.abs().max().item())


def test_list_architectures_shape():
    archs = {a["name"]: a for a in matching.list_architectures()}
    assert {"mlp", "vgg", "resnet20", "resnet18", "resnet50"} <= set(archs)
    for arch in archs.values():
        assert arch["description"]
        for opt in arch["options"].values():
            assert set(opt) == {"type", "default", "description"}


def test_torchvision_key_layout():
    keys = set(matching.build_model("resnet50").state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.num_batches_tracked", "layer4.2.bn3.bias", "fc.weight", "fc.bias"):
        assert key in keys
    assert len(keys) == 320  # torchvision resnet50: 161 parameters + 159 buffers
    assert len(matching.build_model("resnet18").state_dict()) == 122


def test_conflicting_groups_left_unpermuted_and_depthwise_tied():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.grouped = torch.nn.Conv2d(8, 8, 1, groups=2)
            self.norm = torch.nn.GroupNorm(4, 8)  # 4 groups of 2 channels after 2 groups of 4: not both, unpermuted
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            x = torch.relu(self.depthwise(self.stem(x)))
            x = self.norm(self.grouped(x))
            return self.head(x.mean(dim=(2, 3)))

    spec = matching.infer_spec(Net(), torch.randn(2, 3, 6, 6))
    assert spec.axes_to_perm["grouped.weight"] == (None, None, None, None)
    assert spec.axes_to_perm["norm.weight"] == (None,)
    # the depthwise conv passes its input's permutation through; the grouped conv's input moves with its output
    assert spec.axes_to_perm["depthwise.weight"][0] == spec.axes_to_perm["stem.weight"][0] is None
    assert spec.axes_to_perm["head.weight"] == (None, None)


def test_spec_validation_messages():
    model = matching.build_model("mlp", sizes=[4, 6, 2])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad_axes = {"axes_to_perm": {"layers.0.weight": ["P"], "layers.0.bias": ["P"], "layers.1.weight": [None, "P"], "layers.1.bias": [None]}}
    with pytest.raises(matching.MatchingError, match="has 1 axes"):
        perm_sizes(matching.spec_from_json(bad_axes), shapes)
    bad_size = {"axes_to_perm": {"layers.0.weight": ["P", "P"], "layers.0.bias": ["P"], "layers.1.weight": [None, "P"], "layers.1.bias": [None]}}
    with pytest.raises(matching.MatchingError, match="different sizes"):
        perm_sizes(matching.spec_from_json(bad_size), shapes)
    with pytest.raises(matching.MatchingError, match="axes_to_perm"):
        matching.spec_from_json({"layers.0.weight": ["P"]})
