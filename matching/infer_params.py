"""Spec-inference rules for parameters computed on before use (a mixin of ``matching.infer_layers.GraphLabels``).

A parameter read from the module (get_attr) is tracked as ``params[node] = (state key, node axis -> key axis)``
through the ops that keep its axes. Here: arithmetic with a Python number (``gain * scale``), and weight
standardisation (timm's StdConv2d and ScaledStdConv2d in NFNet, ResNetV2-BiT):

    F.batch_norm(W.reshape(1, O, -1), None, None, weight=gain.view(-1), training=True).reshape_as(W)

normalises each output unit's weights over its inputs and kernel taps: permuting the inputs permutes within
that set (mean and variance unchanged), permuting the outputs permutes the rows and the gain with them. The
result is W with its own axes, and the gain moves with W's output axis (``companions``).
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
import torch.fx
import torch.nn.functional as F

from matching.infer_labels import FIXED

_SCALAR_ARITHMETIC = {"mul", "add", "sub", "truediv", "div"}
_ENTRYWISE = {torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.exp, torch.abs, torch.neg, F.softplus, torch.sqrt,
              torch.rsqrt}


class ParamRules:
    """Needs from the host: params, gm, shape, param_shape, set_axes, param_axes and companions (LabelSet)."""

    def param_rule(self, node, x, out_shape):
        """A rule for an op whose first argument is a tracked parameter: True if it keeps tracking it."""
        if self.param_scaled(node, x) or self.param_elementwise(node, x) or self.param_indexed(node, x):
            return True
        return self.weight_standardised(node, x, out_shape)

    def param_elementwise(self, node, x):
        """``torch.sigmoid(param)`` and other functions of each entry alone keep the axes (EfficientViM's layer
        scale ``sigmoid(alpha)``)."""
        if node.op != "call_function" or node.target not in _ENTRYWISE or len(node.args) != 1 or node.kwargs:
            return False
        self.params[node.name] = self.params[x.name]
        return True

    def param_indexed(self, node, x):
        """``param[i]`` (and full slices): the indexed axes are gone, and a parameter axis read at one index
        stays in place (EfficientViM's ``alpha.view(4, -1, 1, 1)[0]``, one row per branch)."""
        if not (node.op == "call_function" and node.target is operator.getitem):
            return False
        key, dims = self.params[x.name]
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if len(index) > len(dims) or not all(isinstance(i, int) or i == slice(None) for i in index):
            return False
        for i, d in zip(index, dims):
            if isinstance(i, int) and d is not None:
                axes = [None] * len(self.param_shape(key))
                axes[d] = FIXED
                self.set_axes(key, axes)
        self.params[node.name] = (key, [d for i, d in zip(index + (slice(None),) * len(dims), dims) if not isinstance(i, int)])
        return True

    def param_scaled(self, node, x):
        """``param * 0.28`` (or +, -, /): a number applied to every entry keeps the axes."""
        name = getattr(node.target, "__name__", node.target)
        others = [a for a in list(node.args) + list(node.kwargs.values()) if a is not x]
        if name not in _SCALAR_ARITHMETIC or node.args[0] is not x and node.args[1] is not x \
                or not all(isinstance(a, numbers.Number) for a in others):
            return False
        self.params[node.name] = self.params[x.name]
        return True

    def weight_standardised(self, node, x, out_shape):
        """The three nodes of weight standardisation, each checked against the whole pattern (its only use)."""
        key, dims = self.params[x.name]
        if node.op == "call_method" and node.target in ("reshape", "view") and dims == list(range(len(dims))):
            w_shape = self.shape(x)
            users = list(node.users)
            if tuple(out_shape) == (1, w_shape[0], math.prod(w_shape[1:])) and len(users) == 1 \
                    and self._standardising(users[0], node, w_shape) is not None:
                self.params[node.name] = (key, [None, 0, None])  # read only by that batch norm (checked there)
                return True
            return False
        if node.op == "call_function" and node.target is F.batch_norm and dims == [None, 0, None]:
            affine = self._standardising(node, x, self.param_shape(key))
            if affine is None or not all(self._per_unit(a, self.param_shape(key)[0]) for a in affine):
                return False
            for arg in affine:
                other, other_dims = self.params[arg.name]
                self.companions.setdefault(key, []).append((other, other_dims[0], len(self.param_shape(other))))
                if key in self.param_axes:
                    self.set_axes(key, self.param_axes[key])
            self.params[node.name] = (key, [None, 0, None])
            return True
        if node.op == "call_method" and node.target in ("reshape_as", "reshape", "view") and dims == [None, 0, None] \
                and tuple(out_shape) == self.param_shape(key):
            self.params[node.name] = (key, list(range(len(out_shape))))
            return True
        return False

    def _standardising(self, bn, x, w_shape):
        """If ``bn`` normalises ``x`` (W as [1, O, K]) with batch statistics and its only use reshapes the result
        back to W's shape: the nodes of its affine weight and bias (those given), else None."""
        if not (bn.op == "call_function" and bn.target is F.batch_norm and bn.args[0] is x):
            return None
        args = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training"), bn.args)) | bn.kwargs
        if args.get("running_mean") is not None or args.get("running_var") is not None \
                or args.get("training") is not True:
            return None
        users = list(bn.users)
        if len(users) != 1 or users[0].op != "call_method" or users[0].target not in ("reshape_as", "reshape", "view") \
                or tuple(users[0].meta["tensor_meta"].shape) != tuple(w_shape):
            return None
        return [args[n] for n in ("weight", "bias") if args.get(n) is not None]

    def _per_unit(self, arg, units):
        """A parameter with one entry per output unit (the gain, as ``gain.view(-1)``)."""
        return isinstance(arg, torch.fx.Node) and arg.name in self.params and self.shape(arg) == (units,) \
            and self.params[arg.name][1][0] is not None
