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
        b_, c_, height, width = x.shape
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
        b, n, c = x.shape
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
