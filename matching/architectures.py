"""Registered architectures: module definitions whose state_dict key layout the service expects.

Layouts (state_dict keys):
- ``mlp``: ``layers.{i}.weight`` ``[sizes[i+1], sizes[i]]`` and ``layers.{i}.bias``, ReLU between layers.
- ``vgg``: ``features.{j}`` (Conv2d 3x3, then the norm if any, ReLU, MaxPool2d after each stage),
  adaptive average pool to 1x1, ``classifier.{0,2,4}`` Linear layers (512w -> 512w -> 512w -> classes).
  ``norm=layer`` is GroupNorm(1, C): LayerNorm over (C, H, W) with a per-channel affine.
- ``resnet20``: CIFAR ResNet-20 (3 stages x 3 BasicBlocks, 16w/32w/64w channels): ``conv1``, ``bn1``,
  ``layer{1,2,3}.{0,1,2}.{conv1,bn1,conv2,bn2}``, ``layer{2,3}.0.downsample.{0,1}`` (1x1 conv + norm), ``fc``.
  ``norm=layer`` uses GroupNorm(1, C) under the same ``bn*`` names.
- ``resnet18``, ``resnet50``: built by torchvision (``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``fc``), so
  torchvision/timm ResNet state dicts load unchanged.
- ``gpt``: a GPT-2-style decoder in nanoGPT's layout: ``transformer.wte`` ``[vocab, C]``, ``transformer.wpe``
  ``[block_size, C]``, ``transformer.h.{i}.ln_1``, ``.attn.c_attn`` ``[3C, C]`` (q, k, v rows), ``.attn.c_proj``,
  ``.ln_2``, ``.mlp.c_fc`` ``[4C, C]``, ``.mlp.c_proj``, ``transformer.ln_f``, ``lm_head`` ``[vocab, C]``.
- ``torchvision/<name>``, ``timm/<name>``: every classification model of those libraries, built without
  weights; options are the constructor's keywords, ``num_classes`` (and timm's ``in_chans``) inferred.
- Plugins: packages an operator installs declare entry points in the group ``rebasin.architectures`` that
  name an ``Architecture`` (or a factory function); see docs/plugins.md. Uploaded code is never executed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable

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


class ResNet(nn.Module):
    """CIFAR ResNet (stem 3x3, no max-pool), torchvision's key layout."""

    def __init__(self, block, blocks, widths, num_classes, in_channels=3, norm="batch"):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = _norm(norm, widths[0])
        self.relu = nn.ReLU(inplace=True)
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
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPTBlock(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.mlp.gelu = nn.GELU()
        self.mlp.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2-style decoder in nanoGPT's layout (Karpathy's nanoGPT ``model.py``, whose checkpoints' ``model``
    state dicts load as they are): token ids ``[N, T]`` in, next-token logits ``[N, T, vocab_size]`` out."""

    def __init__(self, vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=True):
        super().__init__()
        if not isinstance(bias, bool) or n_embd % n_head:  # a JSON "false" string would read as true
            raise ValueError(f"bias must be true or false and n_embd ({n_embd}) a multiple of n_head ({n_head})")
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList(GPTBlock(n_embd, n_head, bias) for _ in range(n_layer)), ln_f=nn.LayerNorm(n_embd, bias=bias)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


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
    return ResNet(BasicBlock, [3, 3, 3], [16 * w, 32 * w, 64 * w], int(num_classes), int(in_channels), norm)


def _torchvision_resnet(name):
    def build(num_classes=1000):
        return _build_torchvision(name, {"num_classes": int(num_classes)})
    return build



# ---------------------------------------------------------------------------------------------------------
# The registry: built-ins, torchvision/<name>, timm/<name>, and plugins (entry points "rebasin.architectures")
# ---------------------------------------------------------------------------------------------------------

ENTRY_POINT_GROUP = "rebasin.architectures"
FAMILIES = ("builtin", "plugin", "torchvision", "timm")
# options that would download weights or read files: never passed to a library
_REFUSED_OPTIONS = {"weights", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                    "pretrained_strict", "cache_dir", "progress"}


@dataclass(frozen=True)
class Architecture:
    """A trusted module definition. ``build(**options)`` returns the module; ``options`` describes them
    ({name: {"type", "default", "description"}}). Optional: ``infer_options(shapes)`` (options a checkpoint's
    tensor shapes determine), ``example_input(model, batch)`` (a small input to trace and verify with;
    default: 3 x 64 x 64 images, or the first layer's input size for a Linear first layer), and
    ``open_options`` (any keyword the constructor takes is accepted)."""
    name: str
    build: Callable[..., nn.Module]
    description: str = ""
    options: dict = field(default_factory=dict)
    infer_options: Callable[[dict], dict] | None = None
    example_input: Callable[[nn.Module, int], torch.Tensor] | None = None
    open_options: bool = False
    family: str = "plugin"

    def describe(self) -> dict:
        out = {"name": self.name, "family": self.family, "description": self.description,
               "options": {k: dict(v) for k, v in self.options.items()}}
        if self.open_options:
            out["open_options"] = True
        return out


def _opt(type_, default, description):
    return {"type": type_, "default": default, "description": description}


_CLASSES = _opt("int", 10, "number of output classes (inferred from the checkpoint)")
_IN = _opt("int", 3, "input channels (inferred from the checkpoint)")
_LIBRARY_OPTIONS = {"num_classes": _opt("int", 1000, "number of output classes (inferred from the checkpoint)")}


def _builtin(name, build, description, options):
    return Architecture(name, build, description, options, infer_options=lambda shapes: _infer_builtin(name, shapes),
                        example_input=lambda model, batch: _builtin_example(name, model, batch), family="builtin")


BUILTINS = {a.name: a for a in [
    _builtin("mlp", _mlp, "Multi-layer perceptron: Linear layers with ReLU between them; keys layers.{i}.weight/bias.",
             {"sizes": _opt("list[int]", [784, 512, 512, 512, 10], "layer sizes, input first, output last (inferred)")}),
    _builtin("vgg", _vgg, "VGG-style CNN (3x3 convs, max-pooling, global average pool, 3 Linear layers); keys features.{j}, classifier.{0,2,4}.",
             {"config": _opt("str", "vgg11", "vgg11, vgg13 or vgg16 (inferred)"),
              "width": _opt("float", 1.0, "channel multiplier (inferred)"),
              "norm": _opt("str", "none", "none, batch or layer (inferred)"),
              "num_classes": _CLASSES, "in_channels": _IN}),
    _builtin("resnet20", _resnet20, "CIFAR ResNet-20 with a width multiplier; norm=layer is GroupNorm(1, C) under the bn* names.",
             {"width": _opt("int", 1, "channel multiplier 1..32 (16w/32w/64w channels; inferred)"),
              "norm": _opt("str", "batch", "batch or layer (inferred)"),
              "num_classes": _CLASSES, "in_channels": _IN}),
    _builtin("resnet18", _torchvision_resnet("resnet18"), "ResNet-18 built by torchvision (keys conv1, bn1, layer1.0.conv1, ..., fc); same as torchvision/resnet18.",
             {"num_classes": _opt("int", 1000, "number of output classes (inferred)")}),
    _builtin("resnet50", _torchvision_resnet("resnet50"), "ResNet-50 built by torchvision (keys conv1, bn1, layer1.0.conv1, ..., fc); same as torchvision/resnet50.",
             {"num_classes": _opt("int", 1000, "number of output classes (inferred)")}),
    _builtin("gpt", GPT, "GPT-2-style decoder (causal self-attention, pre-LayerNorm, GELU MLP) in nanoGPT's layout: "
             "keys transformer.wte/wpe, transformer.h.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}, "
             "transformer.ln_f, lm_head (a nanoGPT checkpoint's tied lm_head loads as is). Takes token ids [N, T]; "
             "datasets with integer inputs and next-token targets [N, T].",
             {"vocab_size": _opt("int", 64, "vocabulary size (inferred)"),
              "block_size": _opt("int", 32, "longest sequence, rows of the position embedding (inferred)"),
              "n_layer": _opt("int", 2, "number of blocks (inferred)"),
              "n_head": _opt("int", 4, "attention heads per block (not in the weights' shapes: give it if not 4)"),
              "n_embd": _opt("int", 64, "width of the residual stream (inferred)"),
              "bias": _opt("bool", True, "biases in Linear and LayerNorm layers (inferred)")}),
]}


def _hf(config=None):
    from matching import hf

    if config is None:
        raise MatchingError("architecture 'hf' builds the model from the checkpoint's own config.json: upload the "
                            "checkpoint as a model folder (config.json and its weights, as save_pretrained writes them)")
    return hf.build(config)


def _hf_example(model, batch):
    from matching import hf

    return hf.example_inputs(model, batch)


BUILTINS["hf"] = Architecture(
    "hf", _hf, "Hugging Face transformers model (GPT-2, BERT, LLaMA, ViT, ...) built from the checkpoint's own "
    "config.json: the class its 'architectures' names, else the AutoModel of its model_type; for checkpoints uploaded "
    "as model folders (config.json and weights as save_pretrained writes them). Custom code (auto_map) is refused.",
    {"config": _opt("object", None, "the checkpoint's config.json (read from the model folder: leave it out)")},
    infer_options=lambda shapes: {}, example_input=_hf_example, family="builtin")
ARCHITECTURES = BUILTINS  # backwards-compatible name


@functools.lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    """Classification models of torchvision (detection, segmentation, video ... are not listed)."""
    try:
        import torchvision.models as tv
    except ImportError:  # pragma: no cover
        return ()
    return tuple(sorted(tv.list_models(module=tv)))


@functools.lru_cache(maxsize=1)
def timm_names() -> tuple[str, ...]:
    try:
        import timm
    except ImportError:  # pragma: no cover
        return ()
    return tuple(sorted(timm.list_models()))


@functools.lru_cache(maxsize=1)
def plugins() -> dict[str, Architecture]:
    """Architectures from installed packages' entry points (group ``rebasin.architectures``). An entry point
    names an ``Architecture`` or a factory function (its keyword defaults become the options). A plugin
    that fails to load, or takes a built-in or library name, is skipped with a warning."""
    from importlib.metadata import entry_points
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            arch = obj if isinstance(obj, Architecture) else _from_factory(ep.name, obj)
            arch = dataclasses.replace(arch, name=ep.name, family="plugin")
        except Exception as exc:  # a broken plugin must not take the service down
            warnings.warn(f"architecture plugin {ep.name!r} ({ep.value}) cannot be loaded: {exc}")
            continue
        if ep.name in BUILTINS or ep.name.startswith(("torchvision/", "timm/")):
            warnings.warn(f"architecture plugin {ep.name!r} clashes with a built-in name; skipped")
            continue
        found[ep.name] = arch
    return found


def _from_factory(name, factory) -> Architecture:
    if not callable(factory):
        raise TypeError(f"{factory!r} is neither an Architecture nor a callable")
    options = {}
    for pname, param in inspect.signature(factory).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = None if param.default is param.empty else param.default
        options[pname] = _opt(type(default).__name__ if default is not None else "any", default, "")
    doc = (inspect.getdoc(factory) or "").split("\n\n")[0]
    return Architecture(name, factory, doc, options)


def get_architecture(name: str) -> Architecture:
    if not isinstance(name, str):
        raise MatchingError("architecture name must be a string")
    if name in BUILTINS:
        return BUILTINS[name]
    family, _, model_name = name.partition("/")
    if family == "torchvision" and model_name in torchvision_names():
        return Architecture(name, lambda **o: _build_torchvision(model_name, o),
                            f"torchvision.models.{model_name}; options: the constructor's keywords (weights are never loaded)",
                            dict(_LIBRARY_OPTIONS), infer_options=lambda shapes: _infer_library(name, shapes),
                            example_input=lambda model, batch: _library_example(name, model, batch),
                            open_options=True, family="torchvision")
    if family == "timm" and model_name in timm_names():
        return Architecture(name, lambda **o: _build_timm(model_name, o),
                            f"timm.create_model({model_name!r}); options: its keywords (pretrained weights are never loaded)",
                            {**_LIBRARY_OPTIONS, "in_chans": _opt("int", 3, "input channels (inferred)")},
                            infer_options=lambda shapes: _infer_library(name, shapes),
                            example_input=lambda model, batch: _library_example(name, model, batch),
                            open_options=True, family="timm")
    if name in plugins():
        return plugins()[name]
    hint = ""
    if family in ("torchvision", "timm"):
        close = difflib.get_close_matches(model_name, torchvision_names() if family == "torchvision" else timm_names(), 3)
        hint = f"; did you mean {', '.join(f'{family}/{c}' for c in close)}?" if close else ""
    raise MatchingError(f"unknown architecture {name!r}{hint} (built-in: {sorted(BUILTINS)}; also "
                        "torchvision/<name>, timm/<name> and installed plugins: GET /v1/architectures lists them)")


def list_architectures(family: str | None = None, contains: str | None = None) -> list[dict]:
    """Names, options and a description each: built-ins, plugins, then every torchvision and timm
    classification model (``family`` and a case-insensitive substring ``contains`` filter)."""
    out = []
    needle = (contains or "").lower()
    for fam in FAMILIES:
        if family not in (None, fam):
            continue
        if fam == "builtin":
            archs = [a.describe() for a in BUILTINS.values()]
        elif fam == "plugin":
            archs = [a.describe() for a in plugins().values()]
        else:
            names = torchvision_names() if fam == "torchvision" else timm_names()
            options = {k: dict(v) for k, v in _LIBRARY_OPTIONS.items()}
            archs = [{"name": f"{fam}/{n}", "family": fam,
                      "description": f"{fam} {n} (options: the constructor's keywords; weights are never loaded)",
                      "options": options, "open_options": True} for n in names]
        out += [a for a in archs if needle in a["name"].lower()]
    return out


def build_model(name: str, **options) -> nn.Module:
    arch = get_architecture(name)
    refused = sorted(set(options) & _REFUSED_OPTIONS) if arch.family in ("torchvision", "timm") else []
    if refused:
        raise MatchingError(f"option(s) {refused} are not accepted: the service never downloads or reads weights; "
                            "upload the checkpoint instead")
    unknown = sorted(set(options) - set(arch.options))
    if unknown and not arch.open_options:
        raise MatchingError(f"unknown option(s) {unknown} for architecture {name!r}; it takes {sorted(arch.options)}")
    try:
        model = arch.build(**options)
    except MatchingError:
        raise
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
        raise MatchingError(f"bad options for architecture {name!r}: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from None
    if not isinstance(model, nn.Module):
        raise MatchingError(f"architecture {name!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def example_input(name: str, model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A small input of the right shape, used to trace the model and verify its spec."""
    arch = get_architecture(name)
    if arch.example_input is not None:
        return arch.example_input(model, batch)
    return _default_example(model, batch)


def _default_example(model: nn.Module, batch: int, side: int = 64) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    if isinstance(first, nn.Linear):
        return torch.randn(batch, first.in_features)
    channels = first.in_channels if first is not None else 3
    dims = first.weight.dim() - 2 if first is not None else 2
    return torch.randn(batch, channels, *([side] * dims))


def infer_options(name: str, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Options determined by a checkpoint's tensor shapes (user options override these)."""
    arch = get_architecture(name)
    return arch.infer_options(shapes) if arch.infer_options is not None else {}


def _builtin_example(name, model, batch):
    if name == "gpt":
        wte, wpe = model.transformer.wte, model.transformer.wpe
        return torch.randint(wte.num_embeddings, (batch, wpe.num_embeddings), generator=torch.Generator().manual_seed(0))
    if name == "mlp":
        return torch.randn(batch, model.layers[0].in_features)
    in_channels = model.features[0].in_channels if name == "vgg" else model.conv1.in_channels
    side = 64 if name in ("resnet18", "resnet50") else 32
    return torch.randn(batch, in_channels, side, side)


def _infer_builtin(name: str, shapes: dict[str, tuple[int, ...]]) -> dict:
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
        if name == "gpt":
            vocab, n_embd = shapes["transformer.wte.weight"]
            n_layer = 0
            while f"transformer.h.{n_layer}.attn.c_attn.weight" in shapes:
                n_layer += 1
            return {"vocab_size": int(vocab), "block_size": int(shapes["transformer.wpe.weight"][0]), "n_layer": n_layer,
                    "n_embd": int(n_embd), "bias": "transformer.ln_f.bias" in shapes}
        conv1, fc = shapes["conv1.weight"], shapes["fc.weight"]
        if name == "resnet20":
            return {"width": max(1, int(conv1[0]) // 16), "norm": "batch" if "bn1.running_mean" in shapes else "layer",
                    "num_classes": int(fc[0]), "in_channels": int(conv1[1])}
        return {"num_classes": int(fc[0])}
    except (KeyError, IndexError) as exc:
        raise MatchingError(f"checkpoint does not look like a {name!r} model (missing or malformed {exc})") from None


# --- torchvision and timm ---------------------------------------------------------------------------------

class _MNASNetV2Loading:
    """torchvision's MNASNet reads a state dict without version metadata (safetensors has none) as version 1
    and rebuilds its stem with other channel counts for alpha != 1; a state dict saved by torchvision today is
    version 2, which is what every checkpoint the service stores is."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") is None:
            local_metadata = {**local_metadata, "version": 2}
        return super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _mnasnet_v2_class(cls):
    return type(cls.__name__, (_MNASNetV2Loading, cls), {"__module__": cls.__module__})


def _build_torchvision(model_name: str, options: dict) -> nn.Module:
    import torchvision.models as tv
    model = tv.get_model(model_name, weights=None, **options)
    if isinstance(model, tv.MNASNet):
        model.__class__ = _mnasnet_v2_class(type(model))
    return model


def _build_timm(model_name: str, options: dict) -> nn.Module:
    import timm
    return timm.create_model(model_name, pretrained=False, **options)


@functools.lru_cache(maxsize=256)
def _library_probe(name: str, options: tuple) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a model built on the meta device (no memory, no compute), or on the CPU where
    its initialisation needs data (RegNet)."""
    try:
        with torch.device("meta"):
            model = build_model(name, **dict(options))
    except MatchingError:
        model = build_model(name, **dict(options))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _infer_library(name: str, shapes: dict[str, tuple[int, ...]]) -> dict:
    """num_classes (and timm's in_chans): the tensors whose shapes follow an option, compared with the
    checkpoint's."""
    out = {}
    probes = [("num_classes", 1000, 1001)] + ([("in_chans", 3, 4)] if name.startswith("timm/") else [])
    for option, a, b in probes:
        try:
            shapes_a, shapes_b = _library_probe(name, ((option, a),)), _library_probe(name, ((option, b),))
        except MatchingError:
            continue
        for key, sa in shapes_a.items():
            sb = shapes_b.get(key)
            if sb is None or sa == sb or key not in shapes or len(shapes[key]) != len(sa):
                continue
            axis = next(i for i, (x, y) in enumerate(zip(sa, sb)) if x != y)
            if sb[axis] - sa[axis] == b - a:  # the axis is the option itself (not a multiple of it)
                out[option] = int(shapes[key][axis]) - sa[axis] + a
                break
    return out


def _library_example(name: str, model: nn.Module, batch: int) -> torch.Tensor:
    """32 x 32 images where the model takes them (cheap to trace and verify), else the smallest size that
    runs on the meta device among the library's own input sizes; a size that also runs the auxiliary heads
    (computed with the top module's training flag: Inception v3's need 299 x 299) is preferred, so that spec
    inference sees and permutes them."""
    x = _default_example(model, batch)
    sides = [32, 64, 96, 128]
    # A patch-embedded model built for another image size (timm's img_size=8) runs at that size only.
    built_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(built_size, (tuple, list)) and built_size and isinstance(built_size[-1], int):
        sides.append(built_size[-1])
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    for key in ("min_input_size", "input_size", "test_input_size"):
        if cfg.get(key):
            sides.append(int(cfg[key][-1]))
    sides += [224, 299]
    # The first conv's in-channels are the image's, except where the stem reshapes the image first (TResNet's
    # space-to-depth: 48 of 3; CSATv2's DCT stem): then the channels the model was built for (timm's in_chans,
    # else its config's input_size), tried after the first conv's.
    channels = [x.shape[1]] if x.dim() > 2 else [None]
    if x.dim() > 2:
        built = getattr(model, "in_chans", None)
        channels += [c for c in (built, (cfg.get("input_size") or (None,))[0]) if isinstance(c, int)]
    runs = None
    meta = copy.deepcopy(model).to("meta")
    for c in dict.fromkeys(channels):
        for side in dict.fromkeys(sides):
            shape = (batch, c, *([side] * (x.dim() - 2))) if x.dim() > 2 else tuple(x.shape)
            if _runs_on_meta(meta, shape):
                if _runs_on_meta(meta, shape, top_training=True):
                    return torch.randn(shape)
                runs = runs or shape
        if runs is not None:
            return torch.randn(runs)
    return torch.randn(batch, x.shape[1], 224, 224) if x.dim() > 2 else x


def _runs_on_meta(meta: nn.Module, shape, top_training: bool = False) -> bool:
    try:
        meta.eval().training = top_training
        with torch.no_grad():
            meta(torch.empty(shape, device="meta"))
        return True
    except Exception:
        return False
