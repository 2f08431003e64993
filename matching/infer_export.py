"""Graph capture with ``torch.export`` for models torch.fx cannot trace (Hugging Face transformers, Python that
branches on shapes), rewritten into the vocabulary that the rules of matching.infer_layers read.

``torch.export.export(strict=False)`` runs the model's Python for real, so shape-dependent code is fine; what
it returns is an ATen-level graph. ``ep.module()`` reads every parameter and buffer with a ``get_attr`` whose
target is its state-dict key (a tied parameter is read under one of its keys; matching.infer ties the others
to it). The ATen ops are then rewritten in place into the torch-level ops that the rules already know
(``aten.linear`` -> ``F.linear``, ``aten.add.Tensor`` -> ``operator.add``, ``aten.view`` -> the ``view``
method, ...), so that one set of rules serves both captures and the rewritten graph still runs (shape
propagation, activation capture). Ops without a torch-level twin keep their ATen target; the few that matter
(Conv1D's ``addmm``, RMS norm, element-wise maths) have rules in matching.infer_ops. Batch and sequence axes
are exported as dynamic where the model allows it, so the graph also runs on batches of other sizes.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten


def _ops(*names):
    """The ATen overloads named ``op.overload`` that this torch has."""
    out = []
    for name in names:
        op, _, overload = name.partition(".")
        packet = getattr(aten, op, None)
        if packet is not None and hasattr(packet, overload or "default"):
            out.append(getattr(packet, overload or "default"))
    return out


# same arguments, first one the tensor: the Tensor method of that name
_METHODS = {op: name for names, name in (
    (("view.default", "_unsafe_view.default"), "view"), (("reshape.default",), "reshape"),
    (("permute.default",), "permute"), (("transpose.int",), "transpose"), (("unsqueeze.default",), "unsqueeze"),
    (("squeeze.dim", "squeeze.dims", "squeeze.default"), "squeeze"), (("flatten.using_ints",), "flatten"),
    (("contiguous.default",), "contiguous"), (("clone.default",), "clone"),
    (("alias.default", "detach.default", "detach_.default", "lift_fresh_copy.default"), "detach"),
    (("split.Tensor", "split_with_sizes.default"), "split"), (("chunk.default",), "chunk"),
    (("unbind.int",), "unbind"), (("mean.dim",), "mean"), (("sum.dim_IntList",), "sum"), (("amax.default",), "amax"),
    (("sym_size.int",), "size"), (("type_as.default",), "type_as"),
    (("reshape_as.default",), "reshape_as"), (("view_as.default",), "view_as"),
    # in place (HF ResNet's `hidden_state += residual`): the method keeps the mutation
    (("add_.Tensor", "add_.Scalar"), "add_"), (("mul_.Tensor", "mul_.Scalar"), "mul_"),
    (("sub_.Tensor", "sub_.Scalar"), "sub_"), (("div_.Tensor", "div_.Scalar"), "div_"),
    (("relu_.default",), "relu_"), (("sigmoid_.default",), "sigmoid_"), (("tanh_.default",), "tanh_"),
    (("clamp_.default",), "clamp_"),
) for op in _ops(*names)}
# same arguments: the torch-level function
_FUNCTIONS = {op: fn for names, fn in (
    (("linear.default",), F.linear), (("scaled_dot_product_attention.default",), F.scaled_dot_product_attention),
    (("add.Tensor", "add.Scalar"), operator.add), (("sub.Tensor", "sub.Scalar"), operator.sub),
    (("mul.Tensor", "mul.Scalar"), operator.mul), (("div.Tensor", "div.Scalar"), operator.truediv),
    (("matmul.default", "bmm.default"), operator.matmul), (("einsum.default",), torch.einsum),
    (("maximum.default", "max.other"), torch.maximum), (("minimum.default", "min.other"), torch.minimum),
    (("cat.default",), torch.cat), (("stack.default",), torch.stack), (("where.self",), torch.where), (("roll.default",), torch.roll), (("conv1d.default", "conv1d.padding"), F.conv1d),
    (("conv2d.default", "conv2d.padding"), F.conv2d), (("conv3d.default", "conv3d.padding"), F.conv3d),
    (("dropout.default",), F.dropout), (("dropout_.default",), F.dropout), (("exp.default",), torch.exp), (("neg.default",), torch.neg),
    (("relu.default",), F.relu), (("gelu.default",), F.gelu), (("silu.default",), F.silu), (("tanh.default",), torch.tanh),
    (("sigmoid.default",), torch.sigmoid), (("hardswish.default",), F.hardswish), (("hardsigmoid.default",), F.hardsigmoid),
    (("mish.default",), F.mish), (("elu.default",), F.elu), (("leaky_relu.default",), F.leaky_relu),
    (("hardtanh.default",), F.hardtanh), (("abs.default",), torch.abs), (("square.default",), torch.square),
    (("clamp.default",), torch.clamp),
    (("max_pool2d.default",), F.max_pool2d), (("avg_pool2d.default",), F.avg_pool2d),
    (("adaptive_avg_pool2d.default",), F.adaptive_avg_pool2d), (("adaptive_avg_pool1d.default",), F.adaptive_avg_pool1d),
) for op in _ops(*names)}
# in-place activations (timm's `act_layer(inplace=True)`: EfficientViT's Hardswish): the function in place, its
# leading arguments (the scalars that F's signature takes positionally)
_INPLACE = {op: (fn, n) for names, fn, n in (
    (("hardswish_.default",), F.hardswish, 1), (("hardsigmoid_.default",), F.hardsigmoid, 1),
    (("silu_.default",), F.silu, 1), (("mish_.default",), F.mish, 1),
    (("leaky_relu_.default",), F.leaky_relu, 2), (("hardtanh_.default",), F.hardtanh, 3),
) for op in _ops(*names)}
_BADDBMM = set(_ops("baddbmm.default"))
_RSUB = set(_ops("rsub.Scalar"))
_MASKED_FILL = set(_ops("masked_fill.Scalar", "masked_fill.Tensor"))
_UPSAMPLE = {op: mode for names, mode in (
    (("upsample_bilinear2d.vec",), "bilinear"), (("upsample_nearest2d.vec",), "nearest"),
    (("upsample_bicubic2d.vec",), "bicubic"), (("upsample_nearest1d.vec",), "nearest"),
    (("upsample_linear1d.vec",), "linear")) for op in _ops(*names)}
_TRANSPOSED = set(_ops("numpy_T.default", "t.default"))
_SOFTMAX = set(_ops("softmax.int", "_softmax.default", "_safe_softmax.default"))
_TO = set(_ops("to.dtype", "to.device", "to.dtype_layout", "_to_copy.default", "to.other"))
# bookkeeping that returns nothing: would otherwise read as an unknown use of its tensor
_ASSERTS = set(_ops("_assert_tensor_metadata.default", "_assert_scalar.default", "sym_constrain_range_for_size.default",
                    "_assert_async.msg", "sym_constrain_range.default"))


def export_graph(model: nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    """The model's exported graph (eval mode), rewritten for the rules; raises what torch.export raises."""
    dynamic = lambda value: {d: torch.export.Dim.AUTO for d in range(value.dim())} if isinstance(value, torch.Tensor) else None
    shapes = {name: dynamic(value) for name, value in inspect.signature(model.forward).bind(*args, **kwargs).arguments.items()}
    try:
        program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception:  # noqa: BLE001 - dynamic axes the model cannot take (a fixed sequence length): static shapes
        program = torch.export.export(model, args, kwargs, strict=False)
    gm = program.module()
    return normalised(gm)


def normalised(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite the ATen ops of an exported graph into torch-level ones, drop its input checks and guards, and
    give it plain positional inputs and outputs (placeholders keep their names; non-tensor inputs default to
    the values the graph was captured with)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" or node.op == "call_function" and node.target in _ASSERTS:
            graph.erase_node(node)
        elif node.op == "call_function":
            _rewrite(node)
    graph._codegen = torch.fx.graph.CodeGen()
    out = torch.fx.GraphModule(gm, graph)
    out._forward_pre_hooks.clear()
    for name in ("_guards_fn",):
        if hasattr(out, name):
            delattr(out, name)
    out.graph.lint()
    out.recompile()
    return out


def _method(node, name, args, kwargs=None):
    node.op, node.target, node.args, node.kwargs = "call_method", name, tuple(args), dict(kwargs or {})


def _function(node, fn, args, kwargs=None):
    node.target, node.args, node.kwargs = fn, tuple(args), dict(kwargs or {})


def _rank(node):
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _rewrite(node):
    target, args, kw = node.target, node.args, node.kwargs
    if target in _METHODS:
        name = _METHODS[target]
        if name in ("mean", "sum") and kw.get("dtype") is None:
            kw = {k: v for k, v in kw.items() if k != "dtype"}
        _method(node, name, args, kw)
    elif target is aten.expand.default:
        _method(node, "expand", args[:2])
    elif target in _FUNCTIONS:
        if _FUNCTIONS[target] in (operator.add, operator.sub) and kw.get("alpha", 1) != 1:
            return
        _function(node, _FUNCTIONS[target], args, {k: v for k, v in kw.items() if k != "alpha"})
    elif target in _INPLACE:
        fn, n = _INPLACE[target]
        _function(node, fn, args[:n], {"inplace": True})
    elif target in _TO:
        keep = {k: v for k, v in kw.items() if k in ("dtype", "device")}
        _method(node, "to", args[:3] if target is aten.to.device else args[:2], keep)
    elif target in _SOFTMAX:
        _method(node, "softmax", args[:2])
    elif target is aten.layer_norm.default:
        _function(node, F.layer_norm, args[:5])
    elif target is getattr(aten.group_norm, "default", None):
        _function(node, F.group_norm, args[:5])
    elif target is getattr(aten.batch_norm, "default", None):
        x, w, b, mean, var = (list(args) + [None] * 5)[:5]
        _function(node, F.batch_norm, (x, mean, var, w, b) + tuple(args[5:8]))
    elif target is aten.embedding.default:
        _function(node, F.embedding, (args[1], args[0]))
    elif target is getattr(aten.pad, "default", None) and (len(args) < 3 or args[2] == "constant"):  # nn.ConstantPad2d
        _function(node, F.pad, (args[0], args[1], "constant", (args[3] if len(args) > 3 else None) or 0.0))
    elif target is getattr(aten.constant_pad_nd, "default", None):
        _function(node, F.pad, (args[0], args[1], "constant", args[2] if len(args) > 2 else 0.0))
    elif target is getattr(aten.pad, "default", None):  # F.pad kept whole (EfficientViT's window padding)
        _function(node, F.pad, (args[0], args[1], args[2] if len(args) > 2 else kw.get("mode", "constant"),
                                args[3] if len(args) > 3 else kw.get("value")))
    elif target in _TRANSPOSED and _rank(args[0]) is not None:  # weight.T
        _method(node, "permute", (args[0], list(range(_rank(args[0])))[::-1]))
    elif target in _BADDBMM:  # beta * input + alpha * (b1 @ b2) (Bloom's ALiBi scores): the ops the rules know
        x, b1, b2 = args[:3]
        beta, alpha = kw.get("beta", 1), kw.get("alpha", 1)
        with node.graph.inserting_before(node):
            product = node.graph.call_function(operator.matmul, (b1, b2))
            if alpha != 1:
                product = node.graph.call_function(operator.mul, (product, alpha))
            if beta != 1:
                x = node.graph.call_function(operator.mul, (x, beta))
        _function(node, operator.add, (x, product))
    elif target in _RSUB and kw.get("alpha", 1) == 1 and len(args) == 2:  # number - x (ConViT's 1 - sigmoid(g))
        _function(node, operator.sub, (args[1], args[0]))
    elif target in _MASKED_FILL:  # x.masked_fill(mask, value) = where(mask, value, x): the rules know where
        _function(node, torch.where, (args[1], args[2], args[0]))
    elif target in _UPSAMPLE:  # (x, output_size, [align_corners,] scale_factors): spatial only
        mode, x, size, *rest = _UPSAMPLE[target], *args
        align = rest[0] if len(rest) == 2 else None
        _function(node, F.interpolate, (x,), {"size": size, "scale_factor": rest[-1] if rest else None, "mode": mode,
                                              "align_corners": align})
    elif target in (aten.slice.Tensor, aten.select.int):
        _indexing(node)


def _indexing(node):
    """aten.slice / aten.select -> x[:, ..., a:b] / x[:, ..., i] (what the rules read). Bounds read from the
    input's shape (``x[:, :H, :W]`` after a window padding) stay graph values: the rules follow such a slice
    along an axis other than the channel's."""
    rank = _rank(node.args[0])
    args = list(node.args) + [None] * 4
    dim = args[1] if args[1] is not None else 0
    if rank is None or not isinstance(dim, int) or node.target is aten.select.int and isinstance(args[2], torch.fx.Node):
        return
    dim %= rank
    if node.target is aten.select.int:
        index = args[2]
    else:
        start, stop, step = args[2], args[3], args[4] if args[4] is not None else 1
        index = slice(None if start in (None, 0) else start, None if stop is None or isinstance(stop, int) and stop >= 2 ** 62 else stop,
                      None if step == 1 else step)
    _function(node, operator.getitem, (node.args[0], (slice(None),) * dim + (index,)))
