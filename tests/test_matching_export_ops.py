"""Ops that the torch.export capture rewrites for the rules (matching/infer_export.py), each in a tiny model that
torch.fx cannot trace (it branches on a shape in Python), so that the export path is the one tested. Every spec is
verified by matching.infer_spec itself (a random permutation keeps the outputs)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import matching


class _ShapeBranch(nn.Module):
    def pad_odd(self, x):
        if x.shape[-1] % 2:  # Python on a shape: torch.fx cannot trace this, torch.export can
            x = F.pad(x, (0, 1))
        return x


class InPlaceResidual(_ShapeBranch):
    """HF ResNet's ``hidden_state += residual`` and an in-place ReLU: aten.add_ / aten.relu_ in the graph."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(self.pad_odd(x))
        r = self.conv(h)
        r += h
        r = torch.relu_(r)
        r = F.interpolate(self.up(r), scale_factor=2, mode="bilinear")  # aten.upsample_bilinear2d
        return self.head(r.mean((2, 3)))


class InPlaceActivations(_ShapeBranch):
    """timm's ``act_layer(inplace=True)`` (EfficientViT's Hardswish): aten.hardswish_ and its kin in the graph."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.acts = nn.ModuleList([nn.Hardswish(inplace=True), nn.Hardsigmoid(inplace=True), nn.SiLU(inplace=True),
                                   nn.Mish(inplace=True), nn.LeakyReLU(0.2, inplace=True), nn.Hardtanh(-2, 2, inplace=True)])
        self.convs = nn.ModuleList([nn.Conv2d(8, 8, 1) for _ in self.acts])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(self.pad_odd(x))
        for act, conv in zip(self.acts, self.convs):
            h = conv(act(h))
        return self.head(h.mean((2, 3)))


class BatchMergedHeads(nn.Module):
    """Scores by bmm over heads merged into the batch axis, masked with masked_fill and clamped with max
    (XGLM, DeBERTa-v2), a position bias added in place (MPNet)."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(heads, 1, 1))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        if x.shape[1] > 64:  # Python on a shape
            x = x[:, -64:]
        x = self.embed(x)
        b, t, c = x.shape
        split = lambda y: y.view(b, t, self.heads, -1).transpose(1, 2)
        q, k, v = (split(f(x)).reshape(b * self.heads, t, -1) for f in (self.q, self.k, self.v))
        scores = torch.bmm(q, k.transpose(1, 2)).view(b, self.heads, t, t)
        scores += self.bias
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).tril().logical_not(), -1e4)
        scores = torch.max(scores, torch.full((), -1e9, dtype=scores.dtype))
        probs = scores.softmax(-1).view(b * self.heads, t, t)
        out = torch.bmm(probs, v).view(b, self.heads, t, -1).transpose(1, 2).reshape(b, t, c)
        return self.head(x + self.o(out))


class WindowPadded(nn.Module):
    """Twins' and TinyViT's window padding, channels last: ``F.pad`` of the spatial axes (aten.pad in the graph),
    a per-token layer, then ``x[:, :H, :W]`` with bounds read from the (dynamic) input shape."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.fc1 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.embed(x)
        _, height, width, _ = h.shape
        pad_r, pad_b = (4 - width % 4) % 4, (4 - height % 4) % 4
        y = self.fc1(F.pad(h, (0, 0, 0, pad_r, 0, pad_b)))
        if pad_r > 0 or pad_b > 0:  # Python on a shape
            y = y[:, :height, :width].contiguous()
        return self.head((h + y).mean((1, 2)))


def test_window_padding_and_its_crop_keep_the_channels():
    # Before, aten.pad and a slice bounded by a graph value fixed the channels (TinyViT 0.71, EfficientViT-M0 0.47).
    torch.manual_seed(0)
    spec = matching.infer_spec(WindowPadded().eval(), torch.randn(2, 6, 6, 3))
    assert spec.axes_to_perm["fc1.weight"][0] is not None
    assert spec.axes_to_perm["embed.weight"][0] is not None


def test_in_place_residual_and_upsampling_are_followed():
    torch.manual_seed(0)
    spec = matching.infer_spec(InPlaceResidual().eval(), torch.randn(2, 3, 7, 7))
    for key in ("stem.weight", "conv.weight", "up.weight"):
        assert spec.axes_to_perm[key][0] is not None, key
    assert spec.axes_to_perm["stem.weight"][0] == spec.axes_to_perm["conv.weight"][0]  # one residual stream


def test_heads_merged_into_the_batch_axis_move_whole():
    torch.manual_seed(0)
    spec = matching.infer_spec(BatchMergedHeads().eval(), torch.randn(2, 5, 6))
    for key in ("q.weight", "k.weight", "v.weight", "o.weight", "embed.weight"):
        assert spec.axes_to_perm[key][0] is not None, key
    q = spec.perms[spec.axes_to_perm["q.weight"][0]]
    assert q.get("groups") == 4  # heads move whole (with the per-head bias), dimensions within a head too
    assert spec.axes_to_perm["bias"][0] is not None


def test_in_place_activations_are_followed():
    torch.manual_seed(0)
    model = InPlaceActivations().eval()
    spec = matching.infer_spec(model, torch.randn(2, 3, 7, 7))
    for key in ["stem.weight"] + [f"convs.{i}.weight" for i in range(len(model.convs))]:
        assert spec.axes_to_perm[key][0] is not None, key  # before: each in-place activation fixed its channels


class CroppedUpsampledAttention(_ShapeBranch):
    """CPUBone's attention branch: a ``nn.ConstantPad2d`` (aten.pad in the graph), single-head attention on the
    channels last (q, k, v chunked from one conv), an upsampling cropped to the input's size with bounds read
    from its shape (``o[..., :H, :W]``: aten.slice with a symbolic stop)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pad = nn.ConstantPad2d((0, 1, 0, 1), 0.0)
        self.qkv = nn.Conv2d(8, 12, 2, stride=2)
        self.o = nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(self.pad_odd(x))
        height, width = h.shape[-2:]
        b = h.shape[0]
        qkv = self.qkv(self.pad(h))
        n, c, hh, ww = qkv.shape
        q, k, v = qkv.reshape(n, 1, c, hh * ww).permute(0, 1, 3, 2).chunk(3, dim=3)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0).permute(0, 1, 3, 2).reshape(b, 4, hh, ww)
        out = F.interpolate(self.o(out), scale_factor=2)[..., :height, :width]
        return self.head((h + out).mean((2, 3)))


def test_cropped_padded_single_head_attention_is_followed():
    torch.manual_seed(0)
    spec = matching.infer_spec(CroppedUpsampledAttention().eval(), torch.randn(2, 3, 7, 7))
    for key in ("stem.weight", "qkv.weight", "o.weight"):
        assert spec.axes_to_perm[key][0] is not None, key
    assert spec.axes_to_perm["stem.weight"][0] == spec.axes_to_perm["o.weight"][0]  # the stream, through the crop
    q, k, v = spec.perms[spec.axes_to_perm["qkv.weight"][0]]["segments"]
    assert q[0] == k[0] != v[0] and spec.axes_to_perm["o.weight"][1] == v[0]
