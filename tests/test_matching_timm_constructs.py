"""Spec inference on constructs of timm's (and torchvision's) models that earlier rules left unpermuted: each on
a tiny module (verified: a random permutation keeps the outputs; a planted permutation is recovered exactly;
the construct's channels are really permuted), and on the library models the issue names."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import matching
from tests.test_matching_constructs import _check


def _share(model, spec, skip_outputs=()):
    """Share of Conv/Linear output channels that the spec permutes (the classifier, ``skip_outputs``, left out)."""
    hidden = permuted = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and name not in skip_outputs:
            n = module.weight.shape[0]
            hidden += n
            permuted += n if spec.axes_to_perm[f"{name}.weight"][0] is not None else 0
    return permuted / hidden


class GhostSE(nn.Module):
    """GhostNet's module (a 1x1 conv and a depthwise conv of it, concatenated and cut to 9 channels) with a
    squeeze-excite gate whose expand conv multiplies the concatenation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.primary = nn.Conv2d(6, 5, 1)
        self.cheap = nn.Conv2d(5, 5, 3, padding=1, groups=5)
        self.reduce = nn.Conv2d(10, 4, 1)
        self.expand = nn.Conv2d(4, 10, 1)
        self.out = nn.Conv2d(9, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x1 = F.relu(self.primary(x))
        h = torch.cat([x1, F.relu(self.cheap(x1))], dim=1)
        h = h * torch.sigmoid(self.expand(F.relu(self.reduce(h.mean((2, 3), keepdim=True)))))
        x = x + self.out(h[:, :9])
        return self.fc(x.mean((2, 3)))


def test_gate_on_a_concatenation_takes_its_segments():
    model = GhostSE()
    spec = _check(model, torch.randn(2, 3, 6, 6))
    assert _share(model, spec, ("fc",)) == 1.0
    assert spec.axes_to_perm["expand.weight"][0] == spec.axes_to_perm["reduce.weight"][1]  # the cat's segments
    assert "segments" in spec.perms[spec.axes_to_perm["expand.weight"][0]]


class ScaledStdConv(nn.Conv2d):
    """NFNet's weight-standardised convolution (timm's ScaledStdConv2d: a gain per output channel)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StandardisedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ScaledStdConv(3, 8, 3, padding=1)
        self.conv1 = ScaledStdConv(8, 12, 1)
        self.conv2 = ScaledStdConv(12, 12, 3, padding=1, groups=3)
        self.conv3 = ScaledStdConv(12, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.silu(self.stem(x)) * 1.7
        h = F.silu(self.conv2(F.silu(self.conv1(x)) * 1.7))
        x = x + 0.2 * self.conv3(h)
        return self.fc(x.mean((2, 3)))


def test_weight_standardised_convolution_moves_its_gain():
    model = StandardisedBlock()
    spec = _check(model, torch.randn(2, 3, 6, 6))
    assert _share(model, spec, ("fc",)) == 1.0
    for name in ("stem", "conv1", "conv2", "conv3"):
        assert spec.axes_to_perm[f"{name}.gain"][0] == spec.axes_to_perm[f"{name}.weight"][0] is not None


def test_weight_standardisation_reading_the_weight_otherwise_fixes_it():
    class Peeks(StandardisedBlock):
        def forward(self, x):
            # the reshaped weight is also read as a plain tensor: its layout matters, nothing may move
            return super().forward(x) + self.conv1.weight.reshape(1, 12, -1)[:, :, :3].sum()

    spec = matching.infer_spec(_randomise_free(Peeks()), torch.randn(2, 3, 6, 6))
    assert spec.axes_to_perm["conv1.weight"] == (None, None, None, None)
    assert spec.axes_to_perm["conv1.gain"][0] is None


def _randomise_free(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 4 and p.shape[1:] == (1, 1, 1) else 0.0))
    return model.eval()


class RmsNormBlock(nn.Module):
    """ConvNeXt with timm's RmsNorm2d written out: mean of squares over the channels, rsqrt, per-channel weight."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm_weight = nn.Parameter(torch.ones(8))
        self.fc1 = nn.Conv2d(8, 16, 1)
        self.fc2 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        h = self.dw(x)
        h = h * torch.rsqrt(h.pow(2).mean(dim=1, keepdim=True) + 1e-6) * self.norm_weight.reshape(1, -1, 1, 1)
        x = x + self.fc2(F.gelu(self.fc1(h)))
        return self.fc(x.amax((2, 3)) / x.sum(dim=1).mean())


def test_statistic_over_the_channels_leaves_them_free():
    model = RmsNormBlock()
    spec = _check(model, torch.randn(2, 3, 8, 8))
    assert _share(model, spec, ("fc",)) == 1.0
    assert spec.axes_to_perm["norm_weight"][0] == spec.axes_to_perm["stem.weight"][0] is not None


class SelectiveKernel(nn.Module):
    """SKNet: two branches stacked, attention over the branches (a softmax over the paths axis of the select
    conv's output viewed as [B, paths, C, 1, 1]), summed back."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.paths = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2)])
        self.reduce = nn.Conv2d(8, 4, 1)
        self.select = nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        paths = torch.stack([F.relu(p(x)) for p in self.paths], dim=1)
        attn = self.select(F.relu(self.reduce(paths.sum(1).mean((2, 3), keepdim=True))))
        attn = torch.softmax(attn.view(x.shape[0], 2, 8, 1, 1), dim=1)
        x = x + torch.sum(paths * attn, dim=1)
        return self.fc(x.mean((2, 3)))


class SplitAttention(nn.Module):
    """ResNeSt: a grouped conv whose two groups are the radix splits, summed; timm's RadixSoftmax over them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.out = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        b = x.shape[0]
        h = F.relu(self.conv(F.relu(self.conv1(x))))
        h = h.reshape(b, 2, 8, h.shape[2], h.shape[3])
        attn = self.fc2(F.relu(self.fc1(h.sum(dim=1).mean((2, 3), keepdim=True))))
        attn = F.softmax(attn.view(b, 1, 2, -1).transpose(1, 2), dim=1).reshape(b, -1).view(b, -1, 1, 1)
        h = (h * attn.reshape(b, 2, 8, 1, 1)).sum(dim=1)
        x = x + self.out(h)
        return self.fc(x.mean((2, 3)))


def test_attention_over_branches_shares_one_permutation_per_branch():
    model = SelectiveKernel()
    spec = _check(model, torch.randn(2, 3, 6, 6))
    assert _share(model, spec, ("fc",)) == 1.0
    tile = spec.perms[spec.axes_to_perm["select.weight"][0]]["segments"]
    assert tile == [[spec.axes_to_perm["paths.0.weight"][0], 8]] * 2
    assert spec.axes_to_perm["paths.0.weight"][0] == spec.axes_to_perm["paths.1.weight"][0]


def test_split_attention_radix_groups_share_one_permutation():
    model = SplitAttention()
    spec = _check(model, torch.randn(2, 3, 6, 6))
    assert spec.axes_to_perm["conv.weight"][0] is not None and spec.axes_to_perm["fc2.weight"][0] is not None
    assert spec.perms[spec.axes_to_perm["conv.weight"][0]]["segments"][0][0] == spec.axes_to_perm["out.weight"][1]
    assert spec.axes_to_perm["conv.weight"][1] is None  # the groups' inputs are located through the output's
    assert spec.axes_to_perm["conv1.weight"][0] is None
    assert _share(model, spec, ("fc",)) == (8 + 16 + 4 + 16 + 8) / (8 + 8 + 16 + 4 + 16 + 8)


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d over tokens: ``bn(x.flatten(0, 1)).reshape_as(x)``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.fc1, self.bn1 = nn.Linear(8, 16), nn.BatchNorm1d(16)
        self.fc2, self.bn2 = nn.Linear(16, 8), nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        h = self.fc1(x)
        h = F.hardswish(self.bn1(h.flatten(0, 1)).reshape_as(h))
        h = self.fc2(h)
        x = x + self.bn2(h.flatten(0, 1)).view_as(h)
        return self.head(x.mean(1))


def test_reshape_as_keeps_the_channel():
    model = LinearNorm()
    spec = _check(model, torch.randn(2, 5, 6))
    assert _share(model, spec, ("head",)) == 1.0


class ConvAttention(nn.Module):
    """Visformer's attention on a feature map: a 1x1 conv makes q, k, v; ``reshape(B, 3, heads, d, H * W)``
    splits the heads and merges the spatial axes in one go."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.qkv = nn.Conv2d(8, 24, 1, bias=False)
        self.proj = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        b, _, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, 2, 4, -1).permute(1, 0, 2, 4, 3).unbind(0)
        attn = (q @ k.transpose(-2, -1) * 0.5).softmax(dim=-1)
        x = x + self.proj((attn @ v).permute(0, 1, 3, 2).reshape(b, -1, h, w))
        return self.fc(x.mean((2, 3)))


def test_heads_split_while_spatial_axes_merge():
    model = ConvAttention()
    spec = _check(model, torch.randn(2, 3, 8, 8))
    assert _share(model, spec, ("fc",)) == 1.0
    qkv = spec.perms[spec.axes_to_perm["qkv.weight"][0]]["segments"]
    assert all(spec.perms[lab]["groups"] == 2 for lab, _ in qkv)


class CrossCovarianceAttention(nn.Module):
    """XCiT's attention: each head attends over its own dimensions (q and k normalised along the tokens, the
    scores q k^T contract the tokens) with a learnable temperature per head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.temperature = nn.Parameter(torch.ones(2, 1, 1))
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 4, 1).unbind(0)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        x = x + self.proj((attn.softmax(dim=-1) @ v).permute(0, 3, 1, 2).reshape(b, n, c))
        return self.fc(x)


def test_cross_covariance_scores_share_one_permutation_within_heads():
    # Both axes of these scores are dimensions within a head (q's rows, k's columns): the rows carry on to the
    # output projection, so q, k and v take one permutation. Before, the output projection read k's and v's.
    model = CrossCovarianceAttention()
    spec = _check(model, torch.randn(2, 5, 3))
    assert _share(model, spec, ("fc",)) == 1.0
    parts = spec.perms[spec.axes_to_perm["qkv.weight"][0]]["segments"]
    assert len({lab for lab, _ in parts}) == 1 and spec.axes_to_perm["proj.weight"][1] == parts[0][0]
    assert spec.axes_to_perm["temperature"][0] == spec.perms[parts[0][0]]["group_perm"]


class UnequalSplitAttention(nn.Module):
    """LeViT's attention: each head's q, k and v side by side in one projection, split with unequal sizes
    (``view(B, N, heads, -1).split([d, d, 2d], dim=3)``), and a bias per head added to the scores."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.qkv = nn.Linear(8, 2 * (2 + 2 + 4))
        self.bias = nn.Parameter(torch.randn(2, 5, 5))
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 2, -1).split([2, 2, 4], dim=3)
        attn = (q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) + self.bias).softmax(dim=-1)
        x = x + self.proj((attn @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(b, n, 8))
        return self.fc(x)


def test_unequal_split_within_heads_keeps_the_heads():
    # Before, an unequal split of each head's units fixed the q/k/v projection (LeViT 0.64).
    model = UnequalSplitAttention()
    spec = _check(model, torch.randn(2, 5, 3))
    assert _share(model, spec, ("fc",)) == 1.0
    q, k, v = (lab for lab, _ in spec.perms[spec.perms[spec.axes_to_perm["qkv.weight"][0]]["reindex"]]["segments"])
    assert q == k != v and spec.axes_to_perm["proj.weight"][1] == v
    assert spec.axes_to_perm["bias"][0] == spec.perms[v]["group_perm"] is not None


def _flat_segments(spec, label):
    """A label's segments, nested ones expanded: [(label, size), ...]."""
    parts = spec.perms.get(label, {}).get("segments")
    return [(label, None)] if parts is None else [p for lab, _ in parts for p in _flat_segments(spec, lab)]


class CascadedHeads(nn.Module):
    """EfficientViT-M0's cascaded group attention: each head is its own 1x1 conv over a chunk of the channels
    (plus the previous head's output), single-head attention written on channels (``q^T @ k``, ``v @ attn^T``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.qkvs = nn.ModuleList([nn.Conv2d(4, 2 + 2 + 4, 1) for _ in range(2)])
        self.proj = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        b, _, h, w = x.shape
        feats, outs = x.chunk(2, dim=1), []
        feat = feats[0]
        for i, qkv in enumerate(self.qkvs):
            feat = feat + feats[i] if i else feat
            q, k, v = (t.flatten(2) for t in qkv(feat).split([2, 2, 4], dim=1))
            attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).view(b, 4, h, w)
            outs.append(feat)
        x = x + self.proj(torch.cat(outs, dim=1))
        return self.fc(x.mean((2, 3)))


def test_single_head_attention_on_channels_ties_q_and_k():
    # Before, the matmul of two activations fixed both (EfficientViT-M0 0.47: its residual stream with them).
    model = CascadedHeads()
    spec = _check(model, torch.randn(2, 3, 3, 3))
    assert _share(model, spec, ("fc",)) == 1.0
    q, k, v = (lab for lab, _ in _flat_segments(spec, spec.axes_to_perm["qkvs.0.weight"][0]))
    assert q == k != v


class WindowHeads(nn.Module):
    """MaxViT's window attention, channels last: the window's tokens merged while the channel splits into heads
    (``view(B, h * w, heads, 3d)``), q, k, v chunked per head, then one head on plain channels (its first stage)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.qkv, self.qkv1 = nn.Linear(8, 24), nn.Linear(8, 24)
        self.proj, self.proj1 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).view(b, h * w, 2, 12).transpose(1, 2).chunk(3, dim=3)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h, w, c))
        q, k, v = self.qkv1(x).view(b, h * w, 24).chunk(3, dim=-1)
        x = x + self.proj1(F.scaled_dot_product_attention(q, k, v).view(b, h, w, c))
        return self.fc(x.mean((1, 2)))


def test_heads_split_while_window_tokens_merge_and_one_head():
    # Before, both fixed their q/k/v projection (MaxViT-rw 0.80).
    model = WindowHeads()
    spec = _check(model, torch.randn(2, 2, 3, 3))
    assert _share(model, spec, ("fc",)) == 1.0
    qkv = spec.perms[spec.axes_to_perm["qkv.weight"][0]]
    assert all(spec.perms[lab]["groups"] == 2 for lab, _ in spec.perms[qkv["reindex"]]["segments"])
    q, k, v = (lab for lab, _ in _flat_segments(spec, spec.axes_to_perm["qkv1.weight"][0]))
    assert q == k != v and spec.axes_to_perm["proj1.weight"][1] == v


class TalkingHeads(nn.Module):
    """EfficientFormerV2's attention: 1x1 convs across the heads of the scores (talking heads) before and after
    the softmax; the second one's output heads meet v's."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 1)
        self.q, self.k, self.v = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.talk1, self.talk2 = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        b, c, h, w = x.shape
        q = self.q(x).reshape(b, 2, -1, h * w).permute(0, 1, 3, 2)
        k = self.k(x).reshape(b, 2, -1, h * w)
        v = self.v(x).reshape(b, 2, -1, h * w).permute(0, 1, 3, 2)
        attn = self.talk2(self.talk1(q @ k).softmax(dim=-1))
        x = x + self.proj((attn @ v).transpose(2, 3).reshape(b, c, h, w))
        return self.fc(x.mean((2, 3)))


def test_talking_heads_take_the_head_permutations():
    # Before, the convs across the heads fixed v and its heads (EfficientFormerV2 0.67).
    model = TalkingHeads()
    spec = _check(model, torch.randn(2, 3, 3, 3))
    assert _share(model, spec, ("fc",)) == 1.0
    assert spec.axes_to_perm["talk1.weight"][1] == spec.perms[spec.axes_to_perm["q.weight"][0]]["group_perm"]
    assert spec.axes_to_perm["talk2.weight"][0] == spec.perms[spec.axes_to_perm["v.weight"][0]]["group_perm"]


class StackedAggregate(nn.Module):
    """CoaT's head: the stages' outputs stacked and mixed by a 1x1 Conv1d over the stack, the channels as its
    length."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.aggregate = nn.Conv1d(2, 1, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        x1 = h + F.relu(self.a(h))
        x2 = x1 + F.relu(self.b(x1))
        return self.fc(self.aggregate(torch.stack([x1, x2], dim=1)).squeeze(1))


def test_pointwise_conv_over_another_axis_keeps_the_channels():
    # Before, the conv read its length axis as fixed: CoaT's residual streams stayed in place (0.33).
    model = StackedAggregate()
    spec = _check(model, torch.randn(2, 3))
    assert _share(model, spec, ("fc", "aggregate")) == 1.0
    assert spec.axes_to_perm["aggregate.weight"] == (None, None, None)


class EcaGate(nn.Module):
    """ECA: a 1-D convolution along the channel axis makes each channel's gate depend on its neighbours."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        h = self.conv2(F.relu(self.conv1(x)))
        gate = torch.sigmoid(self.eca(h.mean((2, 3)).view(x.shape[0], 1, -1))).view(x.shape[0], -1, 1, 1)
        x = x + h * gate
        return self.fc(x.mean((2, 3)))


def test_channel_order_that_matters_stays_in_place():
    model = EcaGate()
    spec = _check(model, torch.randn(2, 3, 6, 6))
    assert spec.axes_to_perm["conv1.weight"][0] is not None
    assert spec.axes_to_perm["conv2.weight"][0] is None and spec.axes_to_perm["stem.weight"][0] is None


def test_ghostnet_permutes_its_hidden_channels():
    timm = pytest.importorskip("timm")
    model = timm.create_model("ghostnet_100", num_classes=11).eval()
    spec = matching.infer_spec(model, torch.randn(2, 3, 32, 32))
    assert _share(model, spec, ("classifier",)) >= 0.9


def test_torchvision_mnasnet_as_constructed():
    import torchvision

    model = torchvision.models.mnasnet0_5(num_classes=11).eval()  # its own class: no version-2 loading patch
    spec = matching.infer_spec(model, torch.randn(2, 3, 32, 32))
    assert _share(model, spec, ("classifier.1",)) == 1.0


class StarReluMlp(nn.Module):
    """MetaFormer's (CAFormer's) StarReLU, ``scale * relu(x) ** 2 + bias``: the power written with ``**``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.fc1 = nn.Linear(8, 16)
        self.scale, self.bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc2(self.scale * F.relu(self.fc1(x)) ** 2 + self.bias)
        return self.head(x)


def test_a_power_written_with_stars_keeps_the_channels():
    model = StarReluMlp()
    spec = _check(model, torch.randn(2, 5, 3))
    assert _share(model, spec, ("head",)) == 1.0


class GlobalQueryAttention(nn.Module):
    """GCViT's global attention: the query is the stage's stream itself (a feature map [B, h, w, C]), repeated
    for each window of its image (``repeat_interleave`` over the batch axis) and split into heads while the
    spatial axes merge (``reshape(B, h * w, heads, d)``); keys and values come from a projection."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.kv = nn.Linear(8, 16)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [B, 4, 4, 3]: two 2x2 windows per row of windows
        x = self.embed(x)
        b = x.shape[0]
        q_global = x[:, :2, :2]  # [B, 2, 2, 8] stands for the pooled global tokens
        windows = x.view(b, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 4, 8)
        k, v = self.kv(windows).reshape(b * 4, 4, 2, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        q = q_global.repeat_interleave(4, dim=0).reshape(b * 4, 4, 2, 4).permute(0, 2, 1, 3)
        out = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b * 4, 4, 8)
        out = self.proj(out).view(b, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(b, 4, 4, 8)
        return self.head((x + out).mean((1, 2)))


def test_a_query_from_the_stream_takes_the_heads_of_its_keys():
    model = GlobalQueryAttention()
    spec = _check(model, torch.randn(2, 4, 4, 3))
    assert _share(model, spec, ("head",)) == 1.0
    stream = spec.axes_to_perm["embed.weight"][0]
    assert spec.perms[stream]["groups"] == 2  # the stream's units move within the heads the query splits it into


class PackedHeadsOnAMap(nn.Module):
    """SAM2-Hiera's attention on a feature map: ``qkv(x).reshape(B, H * W, 3, heads, d)`` on [B, H, W, C] (the
    spatial axes merged while the channel splits), ``torch.unbind(qkv, 2)``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        b, h, w, _ = x.shape
        q, k, v = torch.unbind(self.qkv(x).reshape(b, h * w, 3, 2, -1), 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(out.transpose(1, 2).reshape(b, h, w, -1))
        return self.head(x.mean((1, 2)))


def test_heads_split_while_the_spatial_axes_before_merge():
    model = PackedHeadsOnAMap()
    spec = _check(model, torch.randn(2, 3, 3, 3))
    assert _share(model, spec, ("head",)) == 1.0
    parts = spec.perms[spec.axes_to_perm["qkv.weight"][0]]["segments"]
    assert len({lab for lab, _ in parts}) == 2 and all(spec.perms[lab]["groups"] == 2 for lab, _ in parts)


class RotaryAfterPrefixTokens(nn.Module):
    """EVA-02's attention: the rotary embedding (pairs interleaved, ``stack([-x[..., 1::2], x[..., ::2]], -1)``)
    is applied to the tokens after the class token, cut with ``q[:, :, :1, :]`` / ``q[:, :, 1:, :]`` and joined
    back with ``cat(..., dim=2).type_as(v)``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        angles = torch.arange(4).float()[:, None] * torch.tensor([1.0, 0.1]).repeat_interleave(2)[None]
        self.register_buffer("sin", angles.sin(), persistent=False)  # [tokens after the first, d]
        self.register_buffer("cos", angles.cos(), persistent=False)

    def rotate(self, t):
        pairs = torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)
        return t * self.cos + pairs * self.sin

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        q = torch.cat([q[:, :, :1, :], self.rotate(q[:, :, 1:, :])], dim=2).type_as(v)
        k = torch.cat([k[:, :, :1, :], self.rotate(k[:, :, 1:, :])], dim=2).type_as(v)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.head(x + self.proj(out))


def test_rotary_after_prefix_tokens_keeps_the_heads():
    model = RotaryAfterPrefixTokens()
    spec = _check(model, torch.randn(2, 5, 3))
    assert _share(model, spec, ("head",)) == 1.0
    q, k, v = spec.perms[spec.axes_to_perm["qkv.weight"][0]]["segments"]
    assert q[0] == k[0] and "expand" in spec.perms[q[0]]  # q/k dimensions pinned by the rotary, heads move
    assert spec.perms[v[0]]["groups"] == 2  # v's dimensions move within their heads


class TokenMixingMlp(nn.Module):
    """gMixer's token mixing: a gated MLP (GLU: ``a * silu(b)`` of the chunked hidden units) over the tokens of
    ``x.transpose(1, 2)``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.tokens = nn.Linear(5, 12)
        self.tokens_out = nn.Linear(6, 5)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        a, b = self.tokens(x.transpose(1, 2)).chunk(2, dim=-1)
        x = x + self.tokens_out(a * F.silu(b)).transpose(1, 2)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def test_a_linear_layer_over_the_tokens_keeps_the_channels():
    # the channels pass through the token MLP; its hidden units (the tokens layer's outputs) are a second label
    # on another axis of the same tensors, read by the layer over them
    model = TokenMixingMlp()
    spec = _check(model, torch.randn(2, 5, 3))
    assert spec.axes_to_perm["embed.weight"][0] is not None and spec.axes_to_perm["fc1.weight"][0] is not None
    hidden = spec.axes_to_perm["tokens.weight"]
    assert hidden[0] is not None and hidden[1] is None  # the tokens themselves stay in order
    assert spec.axes_to_perm["tokens_out.weight"] == (None, spec.perms[hidden[0]]["segments"][0][0])


class LstmTokenMixer(nn.Module):
    """Sequencer's token mixing: a bidirectional LSTM over each row of a [B, H, W, C] map, then a linear layer;
    and XCiT's position encoding, a map computed once and ``repeat``-ed over the batch (its size read from x)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.rnn = nn.LSTM(8, 4, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(8, 8)
        self.pos = nn.Conv2d(2, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        b, h, w, c = x.shape
        grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).to(x.dtype)[None]
        x = x + self.pos(grid).repeat(b, 1, 1, 1).permute(0, 2, 3, 1)
        rows, _ = self.rnn(x.reshape(-1, w, c))
        x = x + self.fc(rows.reshape(b, h, w, -1))
        return self.head(x.mean((1, 2)))


def test_an_lstm_reads_the_channels_and_keeps_its_hidden_units():
    model = LstmTokenMixer()
    spec = _check(model, torch.randn(2, 3, 4, 3))
    stream = spec.axes_to_perm["embed.weight"][0]
    assert stream is not None and spec.axes_to_perm["fc.weight"] == (stream, None)
    assert spec.axes_to_perm["rnn.weight_ih_l0"] == (None, stream) == spec.axes_to_perm["rnn.weight_ih_l0_reverse"]
    assert spec.axes_to_perm["pos.weight"][0] == stream  # repeated over the batch: the channel kept


class UnfoldedPatches(nn.Module):
    """MobileViT's block: the feature map unfolded into patches with the channel axis merged into the batch
    axis (``reshape(B * C * n_h, p_h, n_w, p_w)``), a transformer over the patches' tokens, folded back the
    same way and fused with the block's input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_1x1 = nn.Conv2d(6, 8, 1)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.conv_proj = nn.Conv2d(8, 6, 1)
        self.fusion = nn.Conv2d(12, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        shortcut = x = F.silu(self.stem(x))
        x = self.conv_1x1(x)
        b, c, h, w = x.shape
        p, n_h, n_w = 2, h // 2, w // 2
        x = x.reshape(b * c * n_h, p, n_w, p).transpose(1, 2)
        x = x.reshape(b, c, n_h * n_w, p * p).transpose(1, 3).reshape(b * p * p, n_h * n_w, -1)
        q, k, v = self.qkv(x).reshape(b * p * p, n_h * n_w, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * p * p, n_h * n_w, c))
        x = self.norm(x + self.fc2(F.silu(self.fc1(x))))
        x = x.contiguous().view(b, p * p, n_h * n_w, -1).transpose(1, 3).reshape(b * c * n_h, n_w, p, p)
        x = x.transpose(1, 2).reshape(b, c, h, w)
        x = self.fusion(torch.cat((shortcut, self.conv_proj(x)), dim=1))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("batch", [2, 1])
def test_channels_merged_into_the_batch_axis_are_followed(batch):
    # Between the unfold and the fold the channel is a factor of the batch axis: moved there by reshapes and
    # transposes only, it keeps its permutation (before, conv_1x1, the transformer's stream and fc2 stayed).
    model = UnfoldedPatches()
    spec = _check(model, torch.randn(batch, 3, 8, 8))
    assert _share(model, spec, ("fc",)) == 1.0
    assert spec.axes_to_perm["conv_1x1.weight"][0] == spec.axes_to_perm["qkv.weight"][1] == spec.axes_to_perm["proj.weight"][0]
    assert spec.axes_to_perm["conv_proj.weight"][1] == spec.axes_to_perm["conv_1x1.weight"][0]


class StateSpaceMixer(nn.Module):
    """EfficientViM's HSM-SSD block: states B, C and dt from the tokens, ``h = x @ (softmax(dt + A) * B)^T``
    (x's channels on the rows), a gated projection of h, ``y = h @ C`` (the states contracted), and a layer
    scale ``sigmoid(alpha).view(2, -1, 1, 1)[i]`` per branch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bcdt = nn.Conv1d(8, 3 * 5, 1)
        self.A = nn.Parameter(torch.randn(5))
        self.hz = nn.Conv1d(8, 2 * 6, 1)
        self.out = nn.Conv1d(6, 8, 1)
        self.ffn = nn.Conv2d(8, 8, 1)
        self.alpha = nn.Parameter(torch.randn(2, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        b_, _, height, width = x.shape
        alpha = torch.sigmoid(self.alpha).view(2, -1, 1, 1)
        t = x.flatten(2)
        b, c, dt = torch.split(self.bcdt(t), [5, 5, 5], dim=1)
        h = t @ ((dt + self.A.view(1, -1, 1)).softmax(-1) * b).transpose(-2, -1)
        h, z = torch.split(self.hz(h), [6, 6], dim=1)
        y = (self.out(h * F.silu(z)) @ c).reshape(b_, -1, height, width)
        x = x + alpha[0] * (y - x)
        x = x + alpha[1] * (self.ffn(x) - x)
        return self.fc(x.mean((2, 3)))


def test_channels_multiplied_by_a_spatial_matrix_keep_their_permutation():
    # x @ m with x's channels on the rows permutes the rows of the product; the layer scale read through
    # sigmoid and an index moves with the stream (before, both fixed the stream, out and ffn).
    model = StateSpaceMixer()
    spec = _check(model, torch.randn(2, 3, 6, 6))
    stream = spec.axes_to_perm["stem.weight"][0]
    assert stream is not None and spec.axes_to_perm["alpha"] == (None, stream)
    assert spec.axes_to_perm["hz.weight"][1] == stream and spec.axes_to_perm["out.weight"][0] == stream
    assert spec.axes_to_perm["hz.weight"][0] is not None
    assert spec.axes_to_perm["bcdt.weight"][0] is None  # the states: a second channel axis, kept in place


class TransposedConvUpsampling(nn.Module):
    """LowFormer's attention branch: downsampled by a strided depthwise conv, projected, upsampled back by a
    depthwise ``nn.ConvTranspose2d`` (and a plain one) before joining the residual stream."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 2, stride=2, groups=8)
        self.proj = nn.Conv2d(8, 6, 1)
        self.up = nn.ConvTranspose2d(6, 8, 2, stride=2)
        self.up_dw = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.up_dw(self.up(F.relu(self.proj(self.down(x)))))
        return self.fc(x.mean((2, 3)))


def test_transposed_convolutions_are_followed():
    model = TransposedConvUpsampling()
    spec = _check(model, torch.randn(2, 3, 6, 6))
    assert _share(model, spec, ("fc",)) == 1.0
    assert spec.axes_to_perm["up.weight"][:2] == (spec.axes_to_perm["proj.weight"][0], spec.axes_to_perm["stem.weight"][0])
    assert spec.axes_to_perm["up_dw.weight"][:2] == (spec.axes_to_perm["stem.weight"][0], None)


class MaskUnitAttention(nn.Module):
    """Hiera's mask unit attention: ``qkv(x).reshape(B, -1, windows, 3, heads, d)`` cuts the tokens into
    windows while it splits the heads; q max-pooled over a stride within each window (``view(...).amax``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        b, _, c = x.shape
        q, k, v = self.qkv(x).reshape(b, -1, 2, 3, 2, 4).permute(3, 0, 4, 2, 1, 5).unbind(0)
        q = q.view(b, 2, 2, 2, -1, 4).amax(dim=3)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 3).reshape(b, -1, c)
        return self.fc(self.proj(out) + x[:, ::2])


def test_heads_split_while_the_tokens_are_cut_into_windows():
    model = MaskUnitAttention()
    spec = _check(model, torch.randn(2, 8, 3))
    assert _share(model, spec, ("fc",)) == 1.0
    qkv = spec.perms[spec.axes_to_perm["qkv.weight"][0]]["segments"]
    assert all(spec.perms[lab]["groups"] == 2 for lab, _ in qkv)


class AdditiveAttention(nn.Module):
    """SwiftFormer's efficient additive attention: q and k L2-normalised over the channels, a learned query
    vector ``q @ w_g`` normalised over the tokens, ``proj(sum(attn * q) * k) + q``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.to_query, self.to_key = nn.Linear(8, 6), nn.Linear(8, 6)
        self.w_g = nn.Parameter(torch.randn(6, 1))
        self.proj, self.final = nn.Linear(6, 6), nn.Linear(6, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        query = F.normalize(self.to_query(x), dim=-1)
        key = F.normalize(self.to_key(x), dim=-1)
        attn = torch.sum(F.normalize(query @ self.w_g * 0.5, dim=1) * query, dim=1, keepdim=True)
        x = x + self.final(self.proj(attn * key) + query)
        return self.fc(x)


def test_normalised_channels_keep_their_permutation():
    model = AdditiveAttention()
    spec = _check(model, torch.randn(2, 5, 3))
    assert _share(model, spec, ("fc",)) == 1.0
    assert spec.axes_to_perm["w_g"][0] == spec.axes_to_perm["to_query.weight"][0] == spec.axes_to_perm["proj.weight"][0]


class GatedPositionalAttention(nn.Module):
    """ConViT's gated positional self-attention: positional scores from a Linear over fixed relative positions,
    one output per head, mixed with the content scores by a per-head gate ``sigmoid(g)``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.qk, self.v = nn.Linear(8, 16), nn.Linear(8, 8)
        self.pos_proj = nn.Linear(3, 2)
        self.gating_param = nn.Parameter(torch.randn(2))
        self.proj, self.fc = nn.Linear(8, 8), nn.Linear(8, 3)
        self.register_buffer("rel_indices", torch.randn(1, 5, 5, 3), persistent=False)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        q, k = self.qk(x).reshape(b, n, 2, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        pos_score = self.pos_proj(self.rel_indices.expand(b, -1, -1, -1)).permute(0, 3, 1, 2).softmax(dim=-1)
        gating = self.gating_param.view(1, -1, 1, 1)
        attn = (1.0 - torch.sigmoid(gating)) * (q @ k.transpose(-2, -1)).softmax(dim=-1) + torch.sigmoid(gating) * pos_score
        attn = attn / attn.sum(dim=-1).unsqueeze(-1)
        v = self.v(x).reshape(b, n, 2, 4).permute(0, 2, 1, 3)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return self.fc(x)


class GatedPositionalAttentionExported(GatedPositionalAttention):
    """The same with ConViT's check on a shape in Python: torch.fx cannot trace it, torch.export captures it and
    writes ``1 - sigmoid(g)`` as ``aten.rsub``."""

    def forward(self, x):
        if x.shape[1] != self.rel_indices.shape[1]:
            raise ValueError("relative positions for another number of tokens")
        return super().forward(x)


@pytest.mark.parametrize("cls", [GatedPositionalAttention, GatedPositionalAttentionExported])
def test_positional_scores_per_head_follow_the_heads(cls):
    model = cls()
    spec = _check(model, torch.randn(2, 5, 3))
    assert _share(model, spec, ("fc",)) == 1.0
    assert spec.axes_to_perm["pos_proj.weight"][0] == spec.axes_to_perm["gating_param"][0] is not None
