"""Spec inference, construct by construct, on small networks: a random permutation keeps the outputs (float64,
1e-8), a planted permutation is recovered exactly by weight matching (and by activation matching), and the
construct's channels are really permuted (not left alone)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import matching
from matching.activation_matching import activation_matching
from matching.spec import apply_permutation, invert, perm_sizes, random_perms, spec_from_json, spec_to_json


def _randomise(model, seed):
    torch.manual_seed(seed)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            value.copy_(torch.rand_like(value) + 0.5)
        elif value.is_floating_point():
            value.copy_(torch.randn_like(value) * (0.5 if value.dim() > 1 else 0.2) + (1.0 if key.endswith("weight") and value.dim() == 1 else 0.0))
    model.load_state_dict(state)
    return model.eval()


def _check(model, x, seed=0, activation=False):
    """Returns the spec after checking function preservation and exact recovery of a planted permutation."""
    model = _randomise(model, seed)
    spec = matching.infer_spec(model, x)
    spec = spec_from_json(spec_to_json(spec))  # the JSON form carries everything
    state = model.state_dict()
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in state.items()})
    planted = random_perms(sizes, torch.Generator().manual_seed(seed + 1), spec)
    permuted = apply_permutation(spec, planted, state)
    reference = model.double()
    x64 = x.double() if x.is_floating_point() else x  # token ids stay ids
    with torch.no_grad():
        expected = reference(x64)
        reference.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in permuted.items()})
        got = reference(x64)
    assert (got - expected).abs().max().item() <= 1e-8 * (1 + expected.abs().max().item())
    model.float()
    perms, _ = matching.weight_matching(spec, state, permuted, seed=0)
    for name, p in planted.items():
        assert torch.equal(perms[name], invert(p)), name
    if activation:
        perms, _ = activation_matching(spec, model, state, permuted, torch.randn(64, *x.shape[1:]))
        for name, p in planted.items():
            assert torch.equal(perms[name], invert(p)), name
    return spec


class GroupedBlock(nn.Module):
    """ResNeXt/RegNet bottleneck: 1x1 -> grouped 3x3 -> 1x1, BN, residual; a GroupNorm with groups too."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 24, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.GroupNorm(4, 24)
        self.conv3 = nn.Conv2d(24, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        x = F.relu(x + self.bn3(self.conv3(h)))
        return self.fc(x.mean((2, 3)))


def test_grouped_convolution_permutes_groups_and_within_groups():
    spec = _check(GroupedBlock(), torch.randn(2, 3, 8, 8), activation=True)
    out, inp = spec.axes_to_perm["conv2.weight"][:2]
    assert out and inp and out != inp
    assert spec.perms[out]["groups"] == spec.perms[inp]["groups"] == 4
    assert spec.perms[out]["group_perm"] == spec.perms[inp]["group_perm"]  # groups move together on both sides
    assert spec.axes_to_perm["bn2.weight"] == (out,)


class Gates(nn.Module):
    """Squeeze-and-excitation (EfficientNet/MobileNetV3/RegNetY), a gate indexed with None, and layer scale
    (ConvNeXt) read through get_attr, with stochastic depth and dropout that are identities in eval."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import StochasticDepth
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.se_reduce = nn.Conv2d(12, 4, 1)
        self.se_expand = nn.Conv2d(4, 12, 1)
        self.gate_fc = nn.Linear(12, 12)
        self.layer_scale = nn.Parameter(torch.ones(12, 1, 1))
        self.gamma = nn.Parameter(torch.ones(12))
        self.drop_path = StochasticDepth(0.2, "row")
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        h = F.silu(self.depthwise(x))
        s = self.se_expand(F.relu(self.se_reduce(h.mean((2, 3), keepdim=True))))
        h = h * torch.sigmoid(s)
        g = torch.sigmoid(self.gate_fc(h.mean((2, 3))))
        h = h * g[:, :, None, None]
        h = h * self.gamma.reshape(1, -1, 1, 1)
        x = x + self.drop_path(self.layer_scale * h)
        return self.head(self.dropout(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def test_gates_layer_scale_and_stochastic_depth():
    spec = _check(Gates(), torch.randn(2, 3, 6, 6), activation=True)
    stem = spec.axes_to_perm["stem.weight"][0]
    assert stem
    assert spec.axes_to_perm["se_expand.weight"][0] == stem and spec.axes_to_perm["gate_fc.weight"] == (stem, stem)
    assert spec.axes_to_perm["layer_scale"] == (stem, None, None) and spec.axes_to_perm["gamma"] == (stem,)
    assert spec.axes_to_perm["se_reduce.weight"][0]  # the squeeze units are hidden units too


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, channels-last permute, LayerNorm and Linear layers, permute back (ConvNeXt), and a
    LayerNorm2d written with F.layer_norm between permutes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dwconv = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.pwconv1 = nn.Linear(8, 32)
        self.pwconv2 = nn.Linear(32, 8)
        self.norm2d = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        x = x + h.permute(0, 3, 1, 2)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (8,), self.norm2d.weight, self.norm2d.bias).permute(0, 3, 1, 2)
        return self.head(x.transpose(1, 3).mean((1, 2)))


def test_channels_last_permute_layer_norm_linear():
    spec = _check(ConvNeXtBlock(), torch.randn(2, 3, 8, 8), activation=True)
    stem = spec.axes_to_perm["stem.weight"][0]
    assert stem and spec.axes_to_perm["pwconv1.weight"][1] == stem and spec.axes_to_perm["pwconv2.weight"][0] == stem
    assert spec.axes_to_perm["norm.weight"] == (stem,) and spec.axes_to_perm["norm2d.weight"] == (stem,)
    assert spec.axes_to_perm["pwconv1.weight"][0]


class Concat(nn.Module):
    """torch.cat along channels (DenseNet, Inception, SqueezeNet): one permutation per segment."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch_a = nn.Conv2d(8, 6, 1)
        self.branch_b = nn.Conv2d(8, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(18)
        self.conv = nn.Conv2d(18, 10, 1)
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([x, F.relu(self.branch_a(x)), F.relu(self.branch_b(x))], 1)
        return self.head(F.relu(self.conv(F.relu(self.bn(x)))).mean((2, 3)))


def test_concatenation_segments():
    spec = _check(Concat(), torch.randn(2, 3, 6, 6), activation=True)
    cat = spec.axes_to_perm["conv.weight"][1]
    assert [s for s, _ in spec.perms[cat]["segments"]] == [spec.axes_to_perm[k][0] for k in
                                                           ("stem.weight", "branch_a.weight", "branch_b.weight")]
    assert spec.axes_to_perm["bn.running_mean"] == (cat,)


class FlattenIntoLinear(nn.Module):
    """VGG's classifier: a C x H x W map flattened into a Linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 3)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def test_flatten_into_linear_moves_blocks_of_inputs():
    spec = _check(FlattenIntoLinear(), torch.randn(2, 3, 6, 6))
    flat = spec.axes_to_perm["fc1.weight"][1]
    assert spec.perms[flat] == {"expand": spec.axes_to_perm["conv.weight"][0], "per_unit": 9}


def test_unknown_op_fixes_channels_and_spec_still_verifies():
    class Roll(nn.Module):  # torch.roll along the channels: not understood, so those channels stay unpermuted
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 8, 1, groups=2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x = torch.roll(F.relu(self.a(x)), 1, dims=1)
            return self.head(F.relu(self.c(F.relu(self.b(x)))).mean((2, 3)))

    spec = _check(Roll(), torch.randn(2, 3, 4, 4))
    assert spec.axes_to_perm["a.weight"][0] is None  # its channels are rolled
    assert spec.axes_to_perm["b.weight"][0]  # the rest is still permuted
    assert spec.perms[spec.axes_to_perm["c.weight"][0]]["groups"] == 2


class ShuffleUnits(nn.Module):
    """ShuffleNetV2: a unit splits its input in two (``chunk``), passes one half through and transforms the
    other, concatenates them and shuffles the channels (view, transpose, view). Three units: the channels that
    pass through are cut again in every unit."""

    def __init__(self, width=12):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        half = width // 2
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                                                    nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
                                                    nn.BatchNorm2d(half), nn.Conv2d(half, half, 1), nn.ReLU())
                                      for _ in range(3))
        self.last = nn.Conv2d(width, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        for branch in self.branches:
            x1, x2 = x.chunk(2, dim=1)
            x = torch.cat((x1, branch(x2)), dim=1)
            n, c, h, w = x.size()
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(F.relu(self.last(x)).mean((2, 3)))


def test_channel_shuffle_moves_units_with_their_permutations():
    spec = _check(ShuffleUnits(), torch.randn(2, 3, 6, 6), activation=True)
    for key in ("stem.weight", "branches.0.5.weight", "branches.2.5.weight", "last.weight"):
        assert spec.axes_to_perm[key][0] is not None, key  # every layer's channels are permuted
    shuffled = {p for e in spec.perms.values() for p in [e.get("reindex")] if p}
    assert shuffled and spec.axes_to_perm["branches.1.0.weight"][1] in {p for p, e in spec.perms.items() if "reindex" in e}
    assert len(spec.parts(spec.axes_to_perm["stem.weight"][0])) > 1  # the stem's units are cut where the units split


class AuxiliaryHead(nn.Module):
    """GoogLeNet/Inception: an auxiliary classifier that runs only when the model is in training mode."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.aux_conv = nn.Conv2d(8, 6, 1)
        self.aux_fc = nn.Linear(6, 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        aux = self.aux_fc(F.relu(self.aux_conv(x)).mean((2, 3))) if self.training else None
        x = self.head(F.relu(self.body(x)).mean((2, 3)))
        return (x, aux) if self.training else x


def test_auxiliary_head_is_permuted_and_keeps_its_outputs():
    x = torch.randn(2, 3, 6, 6)
    model = AuxiliaryHead()
    spec = _check(model, x)
    stem = spec.axes_to_perm["stem.weight"][0]
    assert stem and spec.axes_to_perm["aux_conv.weight"][:2] == (spec.axes_to_perm["aux_conv.weight"][0], stem)
    assert spec.axes_to_perm["aux_conv.weight"][0] and spec.axes_to_perm["aux_fc.weight"][1]
    state = model.state_dict()
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in state.items()})
    permuted = AuxiliaryHead()
    permuted.load_state_dict(apply_permutation(spec, random_perms(sizes, torch.Generator().manual_seed(3), spec), state))
    for m in (model, permuted):  # the top module's flag on: the auxiliary output is computed, BN still in eval
        m.eval().training = True
    with torch.no_grad():
        assert torch.allclose(model(x)[1], permuted(x)[1], atol=1e-5)


def test_untraceable_model_names_the_construct():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(matching.MatchingError) as error:
        matching.infer_spec(DataDependent(), torch.randn(2, 4))
    message = str(error.value)
    assert "if x.sum() > 0" in message and "permutation_spec" in message and "write the spec by hand" in message


def test_block_structured_spec_json_validation():
    good = {"axes_to_perm": {"w": ["P", None], "v": [None, "Q"]},
            "perms": {"P": {"groups": 2, "group_perm": "S"}, "Q": {"segments": [["P", 4], [None, 2]]}}}
    spec = spec_from_json(good)
    assert perm_sizes(spec, {"w": (4, 3), "v": (5, 6)}) == {"P": 4, "S": 2}
    with pytest.raises(matching.MatchingError, match="segments of 6 units"):
        perm_sizes(spec, {"w": (4, 3), "v": (5, 7)})
    with pytest.raises(matching.MatchingError, match="equal groups"):
        perm_sizes(spec_from_json({**good, "axes_to_perm": {"w": ["P", None], "v": [None, None]}}), {"w": (5, 3), "v": (5, 6)})
    with pytest.raises(matching.MatchingError, match="perms"):
        spec_from_json({**good, "perms": {"P": {"groups": "two"}}})
    with pytest.raises(matching.MatchingError, match="itself"):
        spec_from_json({"axes_to_perm": {"w": ["P"]}, "perms": {"P": {"segments": [["P", 2]]}}})
    shuffled = spec_from_json({"axes_to_perm": {"w": ["R", None]}, "perms": {"R": {"reindex": "P", "index": [0, 2, 1, 3]}}})
    assert perm_sizes(shuffled, {"w": (4, 3)}) == {"P": 4}
    with pytest.raises(matching.MatchingError, match="reindexes 4 units"):
        perm_sizes(shuffled, {"w": (5, 3)})
    with pytest.raises(matching.MatchingError, match="perms"):  # an index that is not a permutation
        spec_from_json({"axes_to_perm": {"w": ["R"]}, "perms": {"R": {"reindex": "P", "index": [0, 0, 1]}}})


def test_ste_matching_keeps_block_structure():
    from matching.evaluate import Dataset
    from matching.ste_matching import ste_matching

    model = _randomise(GroupedBlock(), 0)
    spec = matching.infer_spec(model, torch.randn(2, 3, 8, 8))
    state_a, state_b = model.state_dict(), _randomise(GroupedBlock(), 1).state_dict()
    inputs = torch.randn(64, 3, 8, 8)
    train = Dataset(inputs=inputs, targets=torch.randint(0, 5, (64,)))
    perms, info = ste_matching(spec, model, state_a, state_b, train, steps=3, batch_size=32)
    aligned = apply_permutation(spec, perms, state_b)
    before, after = GroupedBlock().eval(), GroupedBlock().eval()
    before.load_state_dict(state_b)
    after.load_state_dict(aligned)
    with torch.no_grad():
        assert torch.allclose(before(inputs), after(inputs), atol=1e-4)


class ConstantPaddedChannels(nn.Module):
    """A constant column on each side of the channels (EfficientViT pads its values with ones)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(F.pad(F.relu(self.fc1(x)), (1, 1), mode="constant", value=1.0))


def test_constant_padded_channels_keep_their_permutation():
    torch.manual_seed(0)
    spec = matching.infer_spec(ConstantPaddedChannels().double().eval(), torch.randn(2, 5, 6, dtype=torch.float64))
    hidden = spec.axes_to_perm["fc1.weight"][0]
    assert hidden is not None  # before: the pad on the channel axis fixed them
    padded = spec.perms[spec.axes_to_perm["fc2.weight"][1]]
    assert padded == {"segments": [[None, 1], [hidden, 6], [None, 1]]}  # the added columns stay in place
