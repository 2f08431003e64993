"""Registered architectures: module definitions whose state_dict key layout the service expects.

Layouts (state_dict keys):
- ``mlp``: ``layers.{i}.weight`` ``[sizes[i+1], sizes[i]]`` and ``layers.{i}.bias``, ReLU between layers.
- ``vgg``: ``features.{j}`` (Conv2d 3x3, then the norm if any, ReLU, MaxPool2d after each stage),
  adaptive average pool to 1x1, ``classifier.{0,2,4}`` Linear layers (512w -> 512w -> 512w -> classes).
  ``norm=layer`` is GroupNorm(1, C): LayerNorm over (C, H, W) with a per-channel affine.
- ``resnet20``: CIFAR ResNet-20 (3 stages x 3 BasicBlocks, 16w/32w/64w channels): ``conv1``, ``bn1``,
  ``layer{1,2,3}.{0,1,2}.{conv1,bn1,conv2,bn2}``, ``layer{2,3}.0.downsample.{0,1}`` (1x1 conv + norm), ``fc``.
  ``norm=layer`` uses GroupNorm(1, C) under the same ``bn*`` names.
- ``resnet18``, ``resnet50``: torchvision layout (``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``fc``), so
  torchvision/timm state dicts load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from matching.errors import MatchingError


class MLP(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(1, channels)


VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, config="vgg11", width=1.0, norm="none", num_classes=10, in_channels=3):
        super().__init__()
        layers, channels = [], in_channels
        for item in VGG_CONFIGS[config]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))  # ceil_mode: small inputs stay >= 1x1
                continue
            out = max(1, round(item * width))
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=norm == "none"))
            if norm != "none":
                layers.append(_norm(norm, out))
            layers.append(nn.ReLU())
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = max(1, round(512 * width))
        self.classifier = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, norm="batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), _norm(norm, planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, norm="batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _norm(norm, planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), _norm(norm, planes * 4))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-layout ResNet (stem 7x7/2 + maxpool) or CIFAR ResNet-20 (stem 3x3, 3 stages)."""

    def __init__(self, block, blocks, widths, num_classes, in_channels=3, norm="batch", cifar=False):
        super().__init__()
        self.inplanes = widths[0]
        if cifar:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = _norm(norm, widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        for i, (n, planes) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(block(self.inplanes, planes, stride=2 if (i > 0 and j == 0) else 1, norm=norm))
                self.inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _mlp(sizes=(784, 512, 512, 512, 10)):
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise MatchingError("mlp option 'sizes' must list at least two positive layer sizes (input first, output last)")
    return MLP(sizes)


def _vgg(config="vgg11", width=1.0, norm="none", num_classes=10, in_channels=3):
    if config not in VGG_CONFIGS:
        raise MatchingError(f"vgg option 'config' must be one of {sorted(VGG_CONFIGS)}, not {config!r}")
    if norm not in ("none", "batch", "layer"):
        raise MatchingError(f"vgg option 'norm' must be none, batch or layer, not {norm!r}")
    return VGG(config, float(width), norm, int(num_classes), int(in_channels))


def _resnet20(width=1, norm="batch", num_classes=10, in_channels=3):
    if not (1 <= int(width) <= 32) or int(width) != width:
        raise MatchingError(f"resnet20 option 'width' must be an integer from 1 to 32, not {width!r}")
    if norm not in ("batch", "layer"):
        raise MatchingError(f"resnet20 option 'norm' must be batch or layer, not {norm!r}")
    w = int(width)
    return ResNet(BasicBlock, [3, 3, 3], [16 * w, 32 * w, 64 * w], int(num_classes), int(in_channels), norm, cifar=True)


def _resnet18(num_classes=1000):
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], int(num_classes))


def _resnet50(num_classes=1000):
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], int(num_classes))


def _opt(type_, default, description):
    return {"type": type_, "default": default, "description": description}


_CLASSES = _opt("int", 10, "number of output classes (inferred from the checkpoint)")
_IN = _opt("int", 3, "input channels (inferred from the checkpoint)")
ARCHITECTURES = {
    "mlp": (_mlp, "Multi-layer perceptron: Linear layers with ReLU between them; keys layers.{i}.weight/bias.",
            {"sizes": _opt("list[int]", [784, 512, 512, 512, 10], "layer sizes, input first, output last (inferred)")}),
    "vgg": (_vgg, "VGG-style CNN (3x3 convs, max-pooling, global average pool, 3 Linear layers); keys features.{j}, classifier.{0,2,4}.",
            {"config": _opt("str", "vgg11", "vgg11, vgg13 or vgg16 (inferred)"),
             "width": _opt("float", 1.0, "channel multiplier (inferred)"),
             "norm": _opt("str", "none", "none, batch or layer (inferred)"),
             "num_classes": _CLASSES, "in_channels": _IN}),
    "resnet20": (_resnet20, "CIFAR ResNet-20 with a width multiplier; norm=layer is GroupNorm(1, C) under the bn* names.",
                 {"width": _opt("int", 1, "channel multiplier 1..32 (16w/32w/64w channels; inferred)"),
                  "norm": _opt("str", "batch", "batch or layer (inferred)"),
                  "num_classes": _CLASSES, "in_channels": _IN}),
    "resnet18": (_resnet18, "ResNet-18, torchvision key layout (conv1, bn1, layer1.0.conv1, ..., fc).",
                 {"num_classes": _opt("int", 1000, "number of output classes (inferred)")}),
    "resnet50": (_resnet50, "ResNet-50, torchvision key layout (conv1, bn1, layer1.0.conv1, ..., fc).",
                 {"num_classes": _opt("int", 1000, "number of output classes (inferred)")}),
}


def list_architectures() -> list[dict]:
    return [{"name": name, "description": desc, "options": {k: dict(v) for k, v in opts.items()}}
            for name, (_, desc, opts) in ARCHITECTURES.items()]


def build_model(name: str, **options) -> nn.Module:
    if name not in ARCHITECTURES:
        raise MatchingError(f"unknown architecture {name!r}; registered: {sorted(ARCHITECTURES)}")
    factory, _, known = ARCHITECTURES[name]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise MatchingError(f"unknown option(s) {unknown} for architecture {name!r}; it takes {sorted(known)}")
    try:
        return factory(**options)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, MatchingError):
            raise
        raise MatchingError(f"bad options for architecture {name!r}: {exc}") from None


def example_input(name: str, model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A small input of the right shape, used to trace the model and verify its spec."""
    if name == "mlp":
        return torch.randn(batch, model.layers[0].in_features)
    in_channels = model.features[0].in_channels if name == "vgg" else model.conv1.in_channels
    side = 64 if name in ("resnet18", "resnet50") else 32
    return torch.randn(batch, in_channels, side, side)


def infer_options(name: str, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Options determined by a checkpoint's tensor shapes (user options override these)."""
    if name not in ARCHITECTURES:
        raise MatchingError(f"unknown architecture {name!r}; registered: {sorted(ARCHITECTURES)}")
    try:
        if name == "mlp":
            n = 0
            while f"layers.{n}.weight" in shapes:
                n += 1
            if n == 0:
                raise KeyError("layers.0.weight")
            sizes = [shapes["layers.0.weight"][1]] + [shapes[f"layers.{i}.weight"][0] for i in range(n)]
            return {"sizes": [int(s) for s in sizes]}
        if name == "vgg":
            convs = sorted((k for k, s in shapes.items() if k.startswith("features.") and k.endswith(".weight") and len(s) == 4),
                           key=lambda k: int(k.split(".")[1]))
            config = {8: "vgg11", 10: "vgg13", 13: "vgg16"}.get(len(convs))
            if config is None:
                raise MatchingError(f"vgg checkpoint has {len(convs)} conv layers; vgg11/13/16 have 8/10/13")
            first = shapes[convs[0]]
            after = f"features.{int(convs[0].split('.')[1]) + 1}"
            norm = "batch" if f"{after}.running_mean" in shapes else "layer" if f"{after}.weight" in shapes else "none"
            return {"config": config, "width": first[0] / 64, "norm": norm,
                    "num_classes": int(shapes["classifier.4.weight"][0]), "in_channels": int(first[1])}
        conv1, fc = shapes["conv1.weight"], shapes["fc.weight"]
        if name == "resnet20":
            return {"width": max(1, int(conv1[0]) // 16), "norm": "batch" if "bn1.running_mean" in shapes else "layer",
                    "num_classes": int(fc[0]), "in_channels": int(conv1[1])}
        return {"num_classes": int(fc[0])}
    except (KeyError, IndexError) as exc:
        raise MatchingError(f"checkpoint does not look like a {name!r} model (missing or malformed {exc})") from None
