"""Permutation-spec inference from a traced module (torch.fx), and its verification.

Every tensor flowing through the graph carries a "channel label": the hidden
unit permutation its channel axis is in (or FIXED: inputs, outputs and
anything we do not understand). Layers create labels (Linear/Conv outputs),
pass them through (norms, activations, pooling, flatten of a 1x1 map) or tie
them (residual adds). A label that ever touches FIXED is not permuted at all:
an unknown op costs us a permutation, never correctness. The result is then
checked by permuting a model at random and comparing outputs; a spec that
fails that check is an error and never used.
"""

from __future__ import annotations

import copy
import math
import operator
import threading

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from matching.spec import PermutationSpec, apply_permutation, perm_sizes, random_perms

FIXED = "<fixed>"

_PASS_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Dropout, nn.Identity,
                 nn.Softplus, nn.Hardswish, nn.ReLU6, nn.Mish, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Dropout2d)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.leaky_relu, F.elu, F.dropout,
                   F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.relu6, F.hardswish}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "double", "half"}
_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.ReLU6, nn.Hardswish, nn.Mish)
_ELEMENTWISE_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}


# torch.fx tracing patches module-global state: two threads tracing at once (an API process answering
# concurrent job submissions) corrupt it for good, and every later trace in the process fails.
_TRACE_LOCK = threading.Lock()


def _trace(model: nn.Module, example_input: torch.Tensor):
    """Label every graph value; return (graph module, node -> (label, channel_dim), param axes, find, activations)."""
    with _TRACE_LOCK:
        gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(example_input)
    parent: dict[str, str] = {FIXED: FIXED}
    order: dict[str, int] = {FIXED: -1}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:  # the oldest label (or FIXED) names the group
            if order[ra] > order[rb]:
                ra, rb = rb, ra
            parent[rb] = ra
        return ra

    def new_label(name):
        name = "P_" + name
        while name in parent:
            name += "'"
        parent[name] = name
        order[name] = len(order)
        return name

    info: dict[str, tuple[str, int]] = {}  # node name -> (label, channel axis)
    param_axes: dict[str, list[str | None]] = {}
    activation_nodes: list[str] = []  # nodes that are outputs of nonlinearities (activation-matching points)

    def shape(node):
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def tensor_args(node):
        out = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) if n.name in info else None)
        return out

    def fix_all(node):
        for n in tensor_args(node):
            union(info[n.name][0], FIXED)

    def set_axes(key, labels):
        if key in param_axes:  # a module used twice: tie what it sees
            labels = [union(a, b) if a and b else (a or b) for a, b in zip(param_axes[key], labels)]
        param_axes[key] = list(labels)

    def channel_in(node, axis):
        """Label of ``node``'s channel if it sits on ``axis`` (normalised), else FIXED."""
        label, cdim = info[node.name]
        ndim = len(shape(node))
        if cdim == axis % ndim:
            return label
        union(label, FIXED)
        return FIXED

    def reshaped(node, x, out_shape):
        """Channel survives a reshape iff it stays its own axis with the same leading elements."""
        label, cdim = info[x.name]
        in_shape = shape(x)
        lead = math.prod(in_shape[:cdim])
        for i in range(len(out_shape)):
            if math.prod(out_shape[:i]) == lead and out_shape[i] == in_shape[cdim]:
                return label, i
        union(label, FIXED)
        return FIXED, 0

    for node in gm.graph.nodes:
        out_shape = shape(node)
        if node.op == "placeholder" or node.op == "get_attr":
            if out_shape is not None:
                info[node.name] = (FIXED, 0)
            continue
        if node.op == "output":
            fix_all(node)
            continue
        if out_shape is None:  # sizes, ints, tuples: not tensors
            fix_all(node)
            continue
        x = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) and node.args[0].name in info else None
        result = None
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            key = node.target
            if isinstance(m, nn.Linear) and x is not None:
                inp = channel_in(x, -1)
                out = new_label(key)
                set_axes(f"{key}.weight", [out, inp])
                if m.bias is not None:
                    set_axes(f"{key}.bias", [out])
                result = (out, len(out_shape) - 1)
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and x is not None:
                inp = channel_in(x, 1)
                spatial = [None] * (m.weight.dim() - 2)
                if m.groups == 1:
                    out = new_label(key)
                    set_axes(f"{key}.weight", [out, inp, *spatial])
                elif m.groups == m.in_channels == m.out_channels:  # depthwise: output channel i reads input i
                    out = inp
                    set_axes(f"{key}.weight", [out, None, *spatial])
                else:  # grouped: a channel may only move within its group; leave both sides unpermuted
                    union(inp, FIXED)
                    out = FIXED
                    set_axes(f"{key}.weight", [None, None, *spatial])
                if m.bias is not None:
                    set_axes(f"{key}.bias", [out])
                result = (out, 1)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and x is not None:
                label = channel_in(x, 1)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, name, None) is not None:
                        set_axes(f"{key}.{name}", [label])
                result = (label, 1)
            elif isinstance(m, nn.LayerNorm) and x is not None:
                label, cdim = info[x.name]
                first = len(out_shape) - len(m.normalized_shape)
                axes = [None] * len(m.normalized_shape)
                if cdim >= first:  # stats over a set of axes containing the channel: permutation invariant
                    axes[cdim - first] = label
                if m.elementwise_affine:
                    set_axes(f"{key}.weight", axes)
                    if m.bias is not None:
                        set_axes(f"{key}.bias", axes)
                result = (label, cdim)
            elif isinstance(m, nn.GroupNorm) and x is not None:
                label = channel_in(x, 1)
                if m.num_groups not in (1, m.num_channels):  # channels may not leave their group: refuse
                    union(label, FIXED)
                if m.affine:
                    set_axes(f"{key}.weight", [label])
                    set_axes(f"{key}.bias", [label])
                result = (label, 1)
            elif isinstance(m, _PASS_MODULES) and x is not None:
                result = info[x.name]
                if isinstance(m, _ACTIVATIONS):
                    activation_nodes.append(node.name)
            elif isinstance(m, nn.Flatten) and x is not None:
                result = reshaped(node, x, out_shape)
        elif node.op == "call_function":
            if node.target in _PASS_FUNCTIONS and x is not None:
                result = info[x.name]
                if node.target not in (F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
                    activation_nodes.append(node.name)
            elif node.target in _ELEMENTWISE_BINARY:
                tensors = tensor_args(node)
                if all(shape(t) == out_shape for t in tensors) and len({info[t.name][1] for t in tensors}) == 1:
                    label = info[tensors[0].name][0]
                    for t in tensors[1:]:  # a residual add ties the permutations of both branches
                        label = union(label, info[t.name][0])
                    result = (find(label), info[tensors[0].name][1])
            elif node.target in (torch.flatten, torch.reshape) and x is not None:
                result = reshaped(node, x, out_shape)
        elif node.op == "call_method":
            if node.target in _PASS_METHODS and x is not None:
                result = info[x.name]
                if node.target in ("relu", "sigmoid", "tanh"):
                    activation_nodes.append(node.name)
            elif node.target in ("view", "reshape", "flatten", "squeeze", "unsqueeze") and x is not None:
                result = reshaped(node, x, out_shape)
            elif node.target in _ELEMENTWISE_BINARY_METHODS:
                tensors = tensor_args(node)
                if all(shape(t) == out_shape for t in tensors) and len({info[t.name][1] for t in tensors}) == 1:
                    label = info[tensors[0].name][0]
                    for t in tensors[1:]:
                        label = union(label, info[t.name][0])
                    result = (find(label), info[tensors[0].name][1])
        if result is None:  # not understood: nothing it touches may be permuted
            fix_all(node)
            result = (FIXED, 0)
        info[node.name] = result
    return gm, info, param_axes, find, activation_nodes


_ELEMENTWISE_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}


def infer_spec(model: nn.Module, example_input: torch.Tensor, verify: bool = True) -> PermutationSpec:
    """Infer the permutation spec of ``model`` (a trusted module) and, by default, verify it."""
    gm, info, param_axes, find, _ = _trace(model, example_input)
    axes_to_perm = {}
    for key, tensor in model.state_dict().items():
        labels = param_axes.get(key, [None] * tensor.dim())
        axes_to_perm[key] = tuple(None if lab is None or find(lab) == FIXED else find(lab) for lab in labels)
    spec = PermutationSpec(axes_to_perm)
    if verify:
        verify_spec(model, spec, example_input)
    return spec


def activation_points(model: nn.Module, example_input: torch.Tensor, spec: PermutationSpec) -> dict[str, list[str]]:
    """For each permutation of ``spec``: graph nodes whose channel axis it permutes, post-nonlinearity ones
    preferred (the paper matches post-activation units). Returns {perm: [node names]} on the traced graph."""
    gm, info, _, find, activation_nodes = _trace(model, example_input)
    points: dict[str, list[str]] = {p: [] for p in spec.perm_to_axes}
    post: dict[str, list[str]] = {p: [] for p in spec.perm_to_axes}
    for name, (label, _) in info.items():
        perm = find(label)
        if perm in points:
            points[perm].append(name)
            if name in activation_nodes:
                post[perm].append(name)
    return {p: post[p] or points[p] for p in points}, info, gm


def verify_spec(model: nn.Module, spec: PermutationSpec, example_input: torch.Tensor, seed: int = 0) -> None:
    """Permute a float64 copy of ``model`` at random per ``spec``; outputs must not change."""
    reference = copy.deepcopy(model).double().eval()
    state = reference.state_dict()
    # randomise BN statistics so that a spec that forgets them fails
    gen = torch.Generator().manual_seed(seed)
    for key, tensor in state.items():
        if key.endswith("running_mean"):
            tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype) * 0.1)
        elif key.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype) + 0.5)
    reference.load_state_dict(state)
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in state.items()})
    permuted = copy.deepcopy(reference)
    permuted.load_state_dict(apply_permutation(spec, random_perms(sizes, gen), state))
    x = example_input.double()
    with torch.no_grad():
        expected, got = reference(x), permuted(x)
    err = (expected - got).abs().max().item()
    if not err <= 1e-8 * (1 + expected.abs().max().item()):
        raise RuntimeError(f"inferred permutation spec is not function-preserving (max abs diff {err:.3g}); not used")
