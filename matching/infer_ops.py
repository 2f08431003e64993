"""Spec-inference rules for the ops that transformers are written with beyond nn.Linear and nn.LayerNorm (a mixin
of ``matching.infer_layers.GraphLabels``): token embeddings read with ``F.embedding``, GPT-2's ``Conv1D`` (an
``addmm`` with an ``[in, out]`` weight), RMS norm written out (``x * rsqrt(mean(x ** 2))``) or fused, and the
element-wise maths of exported graphs (ATen ops without a torch-level twin, see matching.infer_export).

A reduction over the whole channel axis (the mean of RMS norm, a hand-written LayerNorm's statistics) does not
depend on the order of the channels: its result is unpermuted and its input keeps its label.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F

from matching.infer_labels import FIXED

aten = torch.ops.aten


def _overloads(*names):
    out = set()
    for name in names:
        op, _, overload = name.partition(".")
        packet = getattr(aten, op, None)
        if packet is not None and hasattr(packet, overload or "default"):
            out.add(getattr(packet, overload or "default"))
    return out


# element-wise, first argument the tensor, the others scalars: the channel passes through
_ELEMENTWISE = _overloads("pow.Tensor_Scalar", "rsqrt.default", "sqrt.default", "cos.default", "sin.default",
                          "reciprocal.default", "erf.default", "log.default", "square.default", "exp.default",
                          "clamp_min.default", "clamp_max.default", "softplus.default", "gelu.default",
                          "relu6.default", "logical_not.default") | {torch.pow, torch.rsqrt, torch.sqrt, torch.erf,
                                                                     torch.cos, torch.sin, torch.reciprocal}
_ELEMENTWISE_METHODS = {"pow", "rsqrt", "sqrt", "reciprocal", "erf", "float", "to"}
_ACTIVATIONS = _overloads("gelu.default", "relu6.default", "softplus.default")
_CHANNEL_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std, torch.norm}
_CHANNEL_REDUCTION_METHODS = {"mean", "sum", "amax", "amin", "var", "std", "norm"}
_SCALAR_MATHS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.neg}
_RMS_NORM = _overloads("rms_norm.default") | ({F.rms_norm} if hasattr(F, "rms_norm") else set())
_MATMULS = {operator.matmul, torch.matmul, torch.bmm} | _overloads("bmm.default", "mm.default")


class OpRules:
    """Needs from the host: info, params, spread, embedded, shape, new_label, set_axes, channel_in, param_key,
    param_shape, layer_norm and the LabelSet operations."""

    def op_rule(self, node, x, out_shape):
        """The label of ``node`` if one of these rules applies, else None (the other rules then see it)."""
        if node.op not in ("call_function", "call_method"):
            return None
        target, args = node.target, node.args
        nodes = [a for a in args if isinstance(a, torch.fx.Node)]
        if target in _SCALAR_MATHS and len(nodes) == 1 and nodes[0].name in self.params and not node.kwargs:
            self.params[node.name] = self.params[nodes[0].name]  # a parameter (op) a number: Gemma's 1 + weight
            return FIXED, 0
        plain = x is not None and x.name not in self.params and x.name not in self.spread
        if node.op == "call_method":
            if plain and target in _ELEMENTWISE_METHODS and all(not isinstance(a, torch.fx.Node) for a in args[1:]):
                return self.info[x.name]
            if plain and target in _CHANNEL_REDUCTION_METHODS:
                return self.channel_reduction(x, args[1:], node.kwargs)
            return None
        if target in _ELEMENTWISE and plain and all(not isinstance(a, torch.fx.Node) for a in args[1:]):
            if target in _ACTIVATIONS:
                self.activation_nodes.append(node.name)
            return self.info[x.name]
        if target in _CHANNEL_REDUCTIONS and plain:
            return self.channel_reduction(x, args[1:], node.kwargs)
        if target is F.embedding:
            return self.embedding(node, out_shape)
        if target is aten.addmm.default and len(args) == 3:
            return self.transposed_linear(args[1], args[2], args[0], out_shape)
        if target in (aten.mm.default, operator.matmul) and len(args) == 2 and isinstance(args[1], torch.fx.Node) \
                and args[1].name in self.params and self.shape(args[1]) is not None and len(self.shape(args[1])) == 2:
            key, dims = self.params[args[1].name]
            if dims == [1, 0] and isinstance(args[0], torch.fx.Node) and args[0].name in self.info \
                    and args[0].name not in self.params:  # x @ weight.T (Falcon's linear layers)
                return self.linear(key, None, args[0], out_shape)
            return self.transposed_linear(args[0], args[1], None, out_shape)
        if target in _RMS_NORM and plain:
            shape = args[1] if len(args) > 1 else node.kwargs["normalized_shape"]
            weight = args[2] if len(args) > 2 else node.kwargs.get("weight")
            key = self.param_key(weight) if weight is not None else None
            if weight is not None and key is None:
                return None
            return self.layer_norm(x, out_shape, len(shape), [key])
        if target is F.normalize and plain:  # a p-norm over the channels (or per channel) is order-free
            return self.info[x.name]
        if target in _MATMULS and len(args) == 2 and not node.kwargs:
            return self.activation_matmul(args[0], args[1], out_shape)
        return None

    def activation_matmul(self, a, b, out_shape):
        """``a @ b`` of two activations (single-head attention written on channels: ``q^T @ k``, then
        ``v @ attn^T``, EfficientViT-M0's cascaded heads; EfficientViM's state-space mixer: ``x @ ab^T`` with x's
        channels on its rows, then ``h @ c`` contracting the states). Rows keep a's channel, columns b's; a channel on the
        contracted axis must be the other operand's there too (one permutation for both: it cancels). A value
        holds one channel label: where both the rows and the columns carry one, the columns' stays in place.
        A channel on a batch axis is not followed (None)."""
        if not all(isinstance(t, torch.fx.Node) and t.name in self.info and t.name not in self.params
                   and t.name not in self.spread and t.name not in self.embedded for t in (a, b)):
            return None
        sa, sb = self.shape(a), self.shape(b)
        if sa is None or sb is None or len(sa) != len(sb) or len(sa) < 2 or sa[:-2] != sb[:-2] \
                or tuple(out_shape) != (*sa[:-1], sb[-1]):
            return None
        (la, ca), (lb, cb) = self.info[a.name], self.info[b.name]
        nd = len(sa)
        free_a, free_b = self.find(la) != FIXED, self.find(lb) != FIXED
        if free_a and ca % nd < nd - 2 or free_b and cb % nd < nd - 2:
            return None
        inner_a = la if free_a and ca % nd == nd - 1 else None  # on the contracted axis
        inner_b = lb if free_b and cb % nd == nd - 2 else None
        if inner_a is not None and inner_b is not None:
            self.union(inner_a, inner_b)
        elif inner_a is not None or inner_b is not None:
            self.fix(inner_a if inner_a is not None else inner_b)
        rows = la if free_a and ca % nd == nd - 2 else None
        cols = lb if free_b and cb % nd == nd - 1 else None
        if rows is not None:
            if cols is not None:
                self.fix(cols)
            return self.find(rows), nd - 2
        return (self.find(cols), nd - 1) if cols is not None else (FIXED, 0)

    def conv_transposed(self, key, m, x):
        """nn.ConvTranspose (LowFormer's attention upsamples its output with one): the weight is laid out
        ``[in, out / groups, *kernel]``. Plain: a new output label; depthwise (each input channel spreads
        over its own output channel): the input's label. Other groupings are not followed (None)."""
        inp = self.channel_in(x, 1)
        in_channels, per_group = m.weight.shape[:2]
        if m.groups == 1:
            out = self.new_label(key)
            axes = [inp, out]
        elif m.groups == in_channels and per_group == 1:
            out, axes = inp, [inp, None]
        else:
            return None
        self.set_axes(f"{key}.weight", axes + [None] * (m.weight.dim() - 2))
        if m.bias is not None:
            self.set_axes(f"{key}.bias", [out])
        return out, 1

    def channel_reduction(self, x, rest, kw):
        """mean/sum/max... over axes that include the channel axis: the result does not depend on its order."""
        label, cdim = self.info[x.name]
        nd = len(self.shape(x))
        dims = rest[0] if rest else kw.get("dim")
        if dims is None or self.find(label) == FIXED:
            return None
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims) or cdim not in [d % nd for d in dims]:
            return None
        return FIXED, 0

    def embedding(self, node, out_shape):
        """F.embedding(ids, weight): a row per id; the units of the stream are the weight's columns."""
        ids, weight = (list(node.args) + [node.kwargs.get("weight")])[:2]
        key = self.param_key(weight)
        if key is None or not isinstance(ids, torch.fx.Node) or ids.name not in self.info:
            return None
        out = self.new_label(key.rsplit(".", 1)[0])
        self.set_axes(key, [None, out])
        return out, len(out_shape) - 1

    def transposed_linear(self, x, weight, bias, out_shape):
        """x @ W (+ b) with W laid out [in, out]: GPT-2's Conv1D."""
        key_w = self.param_key(weight)
        key_b = self.param_key(bias) if bias is not None else None
        if key_w is None or (bias is not None and key_b is None) or not isinstance(x, torch.fx.Node) \
                or x.name not in self.info or x.name in self.params or len(self.param_shape(key_w)) != 2:
            return None
        out = self.new_label(key_w.rsplit(".", 1)[0])
        self.set_axes(key_w, [self.channel_in(x, -1), out])
        if key_b is not None:
            self.set_axes(key_b, [out])
        return out, len(out_shape) - 1
