"""Spec inference over a traced graph: every value gets a channel label (matching.infer_labels).

Layers create labels (Linear/Conv outputs), pass them through (norms, activations, pooling, dropout, gates) or
tie them (residual adds, broadcast gates). A label that ever touches FIXED (inputs, outputs, anything not
understood) is not permuted at all. Ops that move, cut or join axes are in matching.infer_shapes, attention in
matching.infer_attention.
"""

from __future__ import annotations

import operator
import sys

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from matching.infer_attention import AttentionRules
from matching.infer_labels import FIXED, LabelSet
from matching.infer_ops import OpRules
from matching.infer_params import ParamRules
from matching.infer_shapes import ShapeRules

_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.ReLU6, nn.Hardswish, nn.Mish,
                nn.Hardsigmoid, nn.Softplus, nn.Hardtanh, nn.SELU, nn.CELU)
_PASS_MODULES = _ACTIVATIONS + (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
                                nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d)
_ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.leaky_relu,
                         F.elu, F.relu6, F.hardswish, F.hardsigmoid, F.mish, F.softplus, F.hardtanh, F.selu, F.celu,
                         torch.relu_, F.relu_}
_PASS_FUNCTIONS = _ACTIVATION_FUNCTIONS | {
    F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate,
    torch.clamp, torch.clip, torch.abs, torch.square, torch.exp, torch.neg, torch.rsqrt, torch.sqrt,
    F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}  # a softmax over the channels commutes with their order
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardsigmoid"}
_PASS_METHODS = _ACTIVATION_METHODS | {"contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as",
                                       "clamp", "clamp_", "clamp_min", "clamp_max", "abs", "neg", "exp", "square",
                                       "detach", "rsqrt", "sqrt", "softmax", "log_softmax"}
_POWERS = {"pow", "pow_", torch.pow, operator.pow}  # elementwise when the exponent is a number (x ** 2: StarReLU)
_ELEMENTWISE_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
                       torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum}
_ELEMENTWISE_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_", "sub_", "div_"}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax}
_REDUCTION_METHODS = {"mean", "sum", "amax"}


def _pass_through_functions():
    """Functions (fx leaves) that are identities in eval mode and per-sample otherwise: stochastic depth. Only
    looked up when already imported (a model using it has imported it; importing torchvision costs seconds)."""
    module = sys.modules.get("torchvision.ops.stochastic_depth")
    return {module.stochastic_depth} if module is not None else set()



class GraphLabels(OpRules, AttentionRules, ShapeRules, ParamRules, LabelSet):
    """The labels of one model's graph(s): ``visit_graph`` labels every node of a traced graph module."""

    def __init__(self):
        super().__init__()
        self.auxiliary = False  # labelled also from the graph with the top module's training flag
        self.state_keys: set[str] = set()
        self.pass_functions = _PASS_FUNCTIONS | _pass_through_functions()

    def visit_graph(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.state_keys |= set(gm.state_dict())
        self.info: dict[str, tuple[str, int]] = {}  # node name -> (label, channel axis)
        self.params: dict[str, tuple[str, list[int | None]]] = {}  # node -> (state key, node dim -> param dim)
        self.pieces: dict[str, list[tuple[str, int]]] = {}  # node returning tensors (chunk, split) -> their info
        self.spread: dict[str, tuple[int, torch.Tensor]] = {}  # node -> (first axis, unit at each position)
        # node -> (label, axis, outer, channels, inner, general): a channel merged into an axis as a factor
        # (see ShapeRules.merged_into); general: only moved until restored (a flattened map or tile: not)
        self.embedded: dict[str, tuple] = {}
        self.activation_nodes: list[str] = []
        self.heads: dict = {}  # node -> Heads (a tensor inside an attention layer, see matching.infer_attention)
        self.tuples: dict = {}  # node -> per element: ("info", (label, axis)) | ("heads", Heads) | None
        self.joined: dict[str, list] = {}  # node -> module_pieces of a torch.cat of the module's 1-D tensors
        self.bias_pieces: list = []  # (output label, size, those pieces) of linear layers with such a bias
        # node -> (label, axis): the units of a linear layer over another axis than the channel's (a token MLP's
        # hidden units), followed to the linear layer that reads them; per piece for a chunk
        self.second: dict[str, tuple[str, int]] = {}
        self.second_pieces: dict[str, list[tuple[str, int]]] = {}
        for node in gm.graph.nodes:
            self.visit(node)
            self.follow_second(node)
        for label, n, pieces in self.bias_pieces:
            start = 0
            for key, size in pieces:
                if key is not None:
                    self.set_axes(key, [self.sliced(label, n, start, start + size)])
                start += size

    # --- helpers ----------------------------------------------------------------------------------------
    @staticmethod
    def shape(node):
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def tensor_args(self, node):
        out = []
        torch.fx.node.map_arg((node.args, node.kwargs),
                              lambda n: out.append(n) if n.name in self.info or n.name in self.pieces else None)
        return out

    def fix_node(self, node):
        if node.name in self.pieces:
            for label, _ in self.pieces[node.name]:
                self.fix(label)
            return
        if node.name in self.params:
            self.set_axes(self.params[node.name][0], [FIXED] * len(self.param_shape(self.params[node.name][0])))
        self.fix(self.info[node.name][0])

    def fix_all(self, node):
        for n in self.tensor_args(node):
            self.fix_node(n)

    def channel_in(self, node, axis):
        """Label of ``node``'s channel if it sits on ``axis`` (normalised), else FIXED."""
        label, cdim = self.info[node.name]
        if cdim == axis % len(self.shape(node)):
            return label
        return self.fix(label)

    def param_key(self, arg):
        """State key of a tensor read straight from the module (get_attr), else None."""
        if isinstance(arg, torch.fx.Node) and arg.name in self.params:
            key, dims = self.params[arg.name]
            if dims == list(range(len(dims))):
                return key
        return None

    # --- ops ----------------------------------------------------------------------------------------------
    def linear(self, key_w, key_b, x, out_shape):
        if self.across_channels(x) or x.name in self.second:
            return self.mixing_other_axis(key_w, key_b, x)
        out = self.new_label(key_w.rsplit(".", 1)[0])
        self.set_axes(key_w, [out, self.channel_in(x, -1)])
        if key_b is not None:
            self.set_axes(key_b, [out])
        return out, len(out_shape) - 1

    def across_channels(self, x):
        """Whether a linear layer reading ``x`` mixes another axis than its permuted channel (a token-mixing MLP
        on ``x.transpose(1, 2)``: MLP-Mixer, gMLP's spatial gate). Every other axis of a labelled tensor is in
        its own order, so the layer's weight touches no permutation."""
        label, cdim = self.info[x.name]
        shape = self.shape(x)
        return x.name not in self.params and shape is not None and cdim != len(shape) - 1 \
            and self.find(label) != FIXED and shape[cdim] > 1

    def mixing_other_axis(self, key_w, key_b, x):
        """A linear layer over an axis other than the channel's: the channel axis passes through with its label.
        Its output units (a token MLP's hidden units) get a second label, followed through activations, a chunk
        and their product (GLU) to the linear layer over them (``follow_second``); its input axis (tokens, or
        those hidden units) stays in place unless it carries one."""
        second = self.second.get(x.name)
        last = len(self.shape(x)) - 1
        inp = second[0] if second is not None and second[1] == last else None
        out = self.new_label(key_w.rsplit(".", 1)[0]) if inp is None else None
        self.set_axes(key_w, [out, inp])
        if key_b is not None:
            self.set_axes(key_b, [out])
        if out is not None:
            self.second[self.current] = (out, last)
        return self.info[x.name]

    def follow_second(self, node):
        """Second labels (see ``mixing_other_axis``) pass through element-wise ops and chunks along other axes, are
        cut by a chunk along theirs, and are tied by a product of two of them; anything else fixes them."""
        carried = [a for a in node.all_input_nodes if a.name in self.second or a.name in self.second_pieces]
        if not carried or node.name in self.second:
            return
        x = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        # element-wise only (pooling, also in the pass-through sets, would mix these units' neighbours)
        passing = isinstance(module, _ACTIVATIONS + (nn.Dropout, nn.Identity)) \
            or node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS | {F.dropout} \
            or node.op == "call_method" and node.target in _PASS_METHODS
        if node.op == "call_function" and node.target is operator.getitem and x is not None and x.name in self.second_pieces \
                and isinstance(node.args[1], int):
            self.second[node.name] = self.second_pieces[x.name][node.args[1]]
            return
        if passing and len(carried) == 1 and x is carried[0] and self.shape(node) == self.shape(x):
            self.second[node.name] = self.second[x.name]
            return
        if node.name in self.pieces and x is carried[0] and len(carried) == 1 and x.name in self.second:
            label, axis = self.second[x.name]
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            metas = node.meta.get("tensor_meta")
            if isinstance(dim, int) and dim % len(self.shape(x)) == axis:
                bounds = [0]
                for meta in metas:
                    bounds.append(bounds[-1] + meta.shape[axis])
                n = self.shape(x)[axis]
                self.second_pieces[node.name] = [(self.sliced(label, n, a, b), axis) for a, b in zip(bounds, bounds[1:])]
            else:
                self.second_pieces[node.name] = [(label, axis)] * len(metas)
            return
        if node.op in ("call_function", "call_method") and node.target in (operator.mul, torch.mul, "mul") \
                and all(a.name in self.second for a in carried) and len(carried) == 2 \
                and all(isinstance(a, torch.fx.Node) for a in node.args) and self.shape(node) == self.shape(carried[0]) \
                and self.shape(carried[0]) == self.shape(carried[1]) and self.second[carried[0].name][1] == self.second[carried[1].name][1]:
            self.second[node.name] = (self.union(self.second[carried[0].name][0], self.second[carried[1].name][0]),
                                      self.second[carried[0].name][1])
            return
        if node.op == "call_module" and isinstance(module, nn.Linear) and all(a is x for a in carried):
            return  # read by the layer over its axis (mixing_other_axis), or fixed there with the channel
        for a in carried:
            for label, _ in [self.second[a.name]] if a.name in self.second else self.second_pieces[a.name]:
                self.fix(label)

    def conv(self, key_w, key_b, x, groups, weight_shape):
        out_channels, in_per_group = weight_shape[0], weight_shape[1]
        in_channels = in_per_group * groups
        inp = self.channel_in(x, 1)
        spatial = [None] * (len(weight_shape) - 2)
        name = key_w.rsplit(".", 1)[0]
        if groups == 1:
            out = self.new_label(name)
            axes = [out, inp]
        elif groups == in_channels and out_channels == in_channels:  # depthwise: output channel i reads input i
            out, axes = inp, [inp, None]
        elif groups == in_channels:  # depthwise with a multiplier: channel i feeds outputs i*m .. i*m+m-1
            out = self.new_derived(name, ("expand", inp, out_channels // in_channels)) if self.find(inp) != FIXED else FIXED
            axes = [out, None]
        else:  # grouped: channels move within their group, groups move together on both sides
            if self.find(inp) in self.derived:
                self.fix(inp)
            inp = self.set_groups(inp, groups)
            out = self.new_label(name)
            if self.find(inp) == FIXED:  # the groups of the input cannot move: neither can the output's
                self.set_groups(out, groups, FIXED)
            else:
                self.set_groups(out, groups, self.groups[self.find(inp)][1])
            axes = [out, inp]
            self.grouped.append((out, inp))
        self.set_axes(key_w, axes + spatial)
        if key_b is not None:
            self.set_axes(key_b, [out])
        return out, 1

    def norm_params(self, label, keys):
        for key in keys:
            if key is not None:
                self.set_axes(key, [label])

    def broadcast(self, node, out_shape):
        """Elementwise ops with broadcasting (residual adds, gates x * s[:, :, None, None], layer scale)."""
        args = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if any(a.name not in self.info for a in args):
            return None
        nd = len(out_shape)
        aligned = lambda a, d: d + nd - len(self.shape(a))
        labelled = [a for a in args if a.name not in self.params and self.find(self.info[a.name][0]) != FIXED]
        cdim = None
        for a in labelled:
            label, d = self.info[a.name]
            if self.shape(a)[d] == out_shape[aligned(a, d)] and out_shape[aligned(a, d)] > 1:
                cdim = aligned(a, d)
                break
        if cdim is None:
            for a in args:
                self.fix_node(a)
            return FIXED, 0
        label = None
        params = []
        for a in args:
            shape = self.shape(a)
            local = cdim - (nd - len(shape))
            full = 0 <= local < len(shape) and shape[local] == out_shape[cdim]
            if a.name in self.params:
                params.append((a, local if full else None))
                continue
            own, d = self.info[a.name]
            if full and aligned(a, d) == cdim:
                label = own if label is None else self.union(label, own)
            elif full or (self.find(own) != FIXED and shape[d] > 1):
                # the output's channel axis is not this tensor's channel axis: nothing may move
                self.fix(own)
                label = FIXED if label is None else self.union(label, FIXED)
        for a, local in params:  # per-channel parameters (layer scale) move with the channel
            key, dims = self.params[a.name]
            axes = [None] * len(self.param_shape(key))
            if local is not None and dims[local] is not None:
                axes[dims[local]] = label
            self.set_axes(key, axes)
        return self.find(label), cdim

    def param_shape(self, key):
        return tuple(self.gm.get_parameter(key).shape) if key in dict(self.gm.named_parameters()) else \
            tuple(self.gm.get_buffer(key).shape)

    def visit(self, node):
        self.current = node.name
        out_shape = self.shape(node)
        if node.op == "placeholder":
            if out_shape is not None:
                self.info[node.name] = (FIXED, 0)
            return
        if node.op == "get_attr":
            if out_shape is not None:
                self.info[node.name] = (FIXED, 0)
                if node.target in self.state_keys:
                    self.params[node.name] = (node.target, list(range(len(out_shape))))
            return
        if self.embedded and self.embedded_visit(node, out_shape):
            return
        if self.attention_visit(node, out_shape):
            return
        if node.op == "call_module" and self.recurrent(node):
            return
        if node.op == "output":
            self.fix_all(node)
            return
        if out_shape is None:  # not a tensor: metadata reads are harmless, anything else (tuples of tensors) fixes
            if not (node.op == "call_function" and node.target in (getattr, torch._assert)
                    or node.op == "call_method" and node.target in ("size", "dim", "numel")
                    or self.split(node)):
                self.fix_all(node)
            return
        result = self.rule(node, out_shape)
        if result is None:  # not understood: nothing it touches may be permuted
            self.fix_all(node)
            result = (FIXED, 0)
        self.info[node.name] = result

    def recurrent(self, node) -> bool:
        """An RNN / GRU / LSTM module (Sequencer's LSTMs over rows and columns): its input-to-hidden weights of
        the first layer read the input's channel (their input axis takes its label); its hidden units, whose
        recurrence and gates this does not follow, stay in place. The result is a tuple (output, state)."""
        m = self.gm.get_submodule(node.target)
        x = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(m, nn.RNNBase) or getattr(m, "proj_size", 0) or not isinstance(x, torch.fx.Node) \
                or x.name not in self.info or x.name in self.params:
            return False
        inp = self.channel_in(x, -1)
        for key, _ in m.named_parameters():
            axes = [None] * getattr(m, key).dim()
            if key in ("weight_ih_l0", "weight_ih_l0_reverse"):
                axes[1] = inp
            self.set_axes(f"{node.target}.{key}", axes)
        self.tuples[node.name] = [("info", (FIXED, 0)), None]
        return True

    def rule(self, node, out_shape):
        args = node.args
        x = args[0] if args and isinstance(args[0], torch.fx.Node) and args[0].name in self.info else None
        kw = node.kwargs
        if any(a.name in self.spread for a in self.tensor_args(node)):
            return self.spread_rule(node, x, out_shape)
        if node.op == "call_function" and node.target is operator.getitem and isinstance(args[0], torch.fx.Node) \
                and args[0].name in self.pieces:
            return self.pieces[args[0].name][args[1]] if isinstance(args[1], int) else None
        if x is not None and x.name in self.params and self.param_rule(node, x, out_shape):
            return FIXED, 0
        found = self.op_rule(node, x, out_shape)  # embeddings, Conv1D, RMS norm, ops of exported graphs
        if found is not None:
            return found
        if x is not None and x.name in self.params and not (node.op == "call_function" and node.target in _ELEMENTWISE_BINARY) \
                and not (node.op == "call_method" and node.target in _ELEMENTWISE_BINARY_METHODS):
            if node.op == "call_method" and node.target in ("view", "reshape", "unsqueeze", "squeeze", "flatten") or \
                    node.op == "call_function" and node.target in (torch.reshape, torch.unsqueeze, torch.squeeze, operator.getitem):
                if self.param_reshaped(node, x, out_shape):
                    return FIXED, 0
            elif node.op == "call_method" and node.target in _PASS_METHODS:
                self.params[node.name] = self.params[x.name]
                return FIXED, 0
            elif node.op == "call_method" and node.target == "expand":  # a class token broadcast over the batch
                key, dims = self.params[x.name]
                self.params[node.name] = (key, [d if n == m else None for d, n, m in zip(dims, self.shape(x), out_shape)])
                return FIXED, 0
            return None
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            key = node.target
            if x is None:
                return None
            if isinstance(m, nn.Linear):
                return self.linear(f"{key}.weight", f"{key}.bias" if m.bias is not None else None, x, out_shape)
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and self.info[x.name][1] > 1 \
                    and self.find(self.info[x.name][0]) != FIXED and set(m.kernel_size) == set(m.stride) == {1} \
                    and not any(m.padding if isinstance(m.padding, tuple) else [m.padding != "valid"]) \
                    and m.padding_mode == "zeros":
                # a 1x1 conv over another axis (CoaT's aggregate: Conv1d over the stacked stages, the channels as
                # its length): it acts on each position alone, so the channels there keep their permutation;
                # its own weights stay in place
                return self.info[x.name]
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return self.conv(f"{key}.weight", f"{key}.bias" if m.bias is not None else None, x, m.groups,
                                 tuple(m.weight.shape))
            if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                return self.conv_transposed(key, m, x)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                label = self.channel_in(x, 1)
                self.norm_params(label, [f"{key}.{n}" for n in ("weight", "bias", "running_mean", "running_var")
                                         if getattr(m, n, None) is not None])
                return label, 1
            if isinstance(m, nn.LayerNorm):
                return self.layer_norm(x, out_shape, len(m.normalized_shape),
                                       [f"{key}.weight" if m.weight is not None else None,
                                        f"{key}.bias" if m.bias is not None else None])
            if isinstance(m, nn.GroupNorm):
                label = self.set_groups(self.channel_in(x, 1), m.num_groups) if m.num_groups != m.num_channels \
                    else self.channel_in(x, 1)
                if m.affine:
                    self.norm_params(label, [f"{key}.weight", f"{key}.bias"])
                return self.find(label), 1
            if isinstance(m, _PASS_MODULES):
                if isinstance(m, _ACTIVATIONS):
                    self.activation_nodes.append(node.name)
                return self.info[x.name]
            if isinstance(m, nn.Flatten):
                return self.reshaped(x, out_shape)
            return None
        if node.op != "call_module" and node.target in _POWERS and x is not None and len(args) == 2 \
                and isinstance(args[1], (int, float)) and not kw:
            return self.info[x.name]
        if node.op == "call_function":
            target = node.target
            if target in self.pass_functions and x is not None:
                if target in _ACTIVATION_FUNCTIONS:
                    self.activation_nodes.append(node.name)
                return self.info[x.name]
            if target in _ELEMENTWISE_BINARY:
                return self.broadcast(node, out_shape)
            if target in (torch.flatten, torch.reshape) and x is not None:
                return self.reshaped(x, out_shape)
            if target in (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims) and x is not None:
                return self.permuted(x, target.__name__, args[1:], kw)
            if target is torch.stack:
                return self.stacked(args[0], args[1] if len(args) > 1 else kw.get("dim", 0), out_shape)
            if target in (torch.cat, torch.concat, torch.concatenate):
                return self.concat(node, args[0], args[1] if len(args) > 1 else kw.get("dim", 0), out_shape)
            if target in _REDUCTIONS and x is not None:
                return self.reduced(x, args[1:], kw, out_shape)
            if target is operator.getitem and x is not None:
                return self.indexed(x, args[1], out_shape)
            if target is F.layer_norm and x is not None:
                return self.layer_norm(x, out_shape, len(args[1] if len(args) > 1 else kw["normalized_shape"]),
                                       [self._arg(node, 2, "weight"), self._arg(node, 3, "bias")])
            if target is F.batch_norm and x is not None:
                label = self.channel_in(x, 1)
                keys = [self._arg(node, i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
                if any(k is False for k in keys):
                    return None
                self.norm_params(label, keys)
                return label, 1
            if target is F.group_norm and x is not None:
                groups = args[1] if len(args) > 1 else kw["num_groups"]
                keys = [self._arg(node, 2, "weight"), self._arg(node, 3, "bias")]
                if any(k is False for k in keys):
                    return None
                label = self.channel_in(x, 1)
                if groups != self.shape(x)[1]:
                    label = self.set_groups(label, groups)
                self.norm_params(label, keys)
                return self.find(label), 1
            if target is F.linear and x is not None:
                w, b = self._arg(node, 1, "weight"), self._arg(node, 2, "bias")
                bias = node.args[2] if len(node.args) > 2 else kw.get("bias")
                pieces = self.joined.get(bias.name) if b is False and isinstance(bias, torch.fx.Node) else None
                if not w or b is False and pieces is None:
                    return None
                label, axis = self.linear(w, None if pieces else b, x, out_shape)
                if pieces:  # labelled once the output's structure is known (the attention rules cut it into q, k, v)
                    self.bias_pieces.append((label, sum(size for _, size in pieces), pieces))
                return label, axis
            if target in (F.conv1d, F.conv2d, F.conv3d) and x is not None:
                w, b = self._arg(node, 1, "weight"), self._arg(node, 2, "bias")
                groups = args[6] if len(args) > 6 else kw.get("groups", 1)
                if not w or b is False or not isinstance(groups, int):
                    return None
                return self.conv(w, b, x, groups, self.param_shape(w))
            if target is torch.roll and x is not None:  # a shift along other axes (Swin's shifted windows)
                dims = args[2] if len(args) > 2 else kw.get("dims")
                dims = [dims] if isinstance(dims, int) else list(dims or ())
                label, cdim = self.info[x.name]
                if dims and all(d % len(out_shape) != cdim for d in dims):
                    return label, cdim
                return None
            if target is F.pad and x is not None:
                pad = args[1] if len(args) > 1 else kw["pad"]
                label, cdim = self.info[x.name]
                from_end = len(out_shape) - 1 - cdim  # pad pairs go from the last axis backwards
                if from_end < len(pad) // 2 and tuple(pad[2 * from_end:2 * from_end + 2]) != (0, 0):
                    mode = args[2] if len(args) > 2 else kw.get("mode", "constant")
                    before, after = pad[2 * from_end:2 * from_end + 2]
                    if mode != "constant" or min(before, after) < 0:
                        return None
                    # a constant column added to the channels (EfficientViT's lite attention pads v with ones):
                    # the channels keep their permutation, the added columns are fixed segments around them
                    pieces = [(FIXED, before), (label, self.shape(x)[cdim]), (FIXED, after)]
                    return self.new_derived(f"pad_{node.name}", ("segments", [p for p in pieces if p[1]])), cdim
                return label, cdim
            return self.other_axis_rule(node, x, out_shape)
        if node.op == "call_method":
            target = node.target
            if x is None:
                return None
            if target in _PASS_METHODS:
                if target in _ACTIVATION_METHODS:
                    self.activation_nodes.append(node.name)
                return self.info[x.name]
            if target in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "reshape_as", "view_as"):  # *_as: its shape
                return self.reshaped(x, out_shape)
            if target in _ELEMENTWISE_BINARY_METHODS:
                return self.broadcast(node, out_shape)
            if target in ("permute", "transpose", "swapaxes", "swapdims"):
                return self.permuted(x, target, args[1:], kw)
            if target in _REDUCTION_METHODS:
                return self.reduced(x, args[1:], kw, out_shape)
            if target in ("repeat", "repeat_interleave", "expand"):
                return self.repeated(node, x, out_shape)
        return None

    def repeated(self, node, x, out_shape):
        """Copies along other axes than the channel's (GCViT's global query repeated for each window of its
        image, ``repeat_interleave(n, dim=0)``; ``repeat`` / ``expand`` with the channel's size unchanged): the
        channel keeps its label, its axis shifted by the leading axes added."""
        label, cdim = self.info[x.name]
        shape = self.shape(x)
        if node.target == "repeat_interleave":
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
            if not isinstance(dim, int) or dim % len(shape) == cdim or len(out_shape) != len(shape):
                return None
            return label, cdim
        if node.kwargs:
            return None
        sizes = node.args[1:]
        sizes = list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else list(sizes)
        shift = len(out_shape) - len(shape)
        # the other axes' sizes may be read from shapes (graph values): only the channel's must be a number
        if len(sizes) != len(out_shape) or shift < 0 or not isinstance(sizes[cdim + shift], int) \
                or out_shape[cdim + shift] != shape[cdim]:
            return None
        if node.target == "repeat" and sizes[cdim + shift] != 1:  # the channel tiled: not followed
            return None
        return label, cdim + shift

    def other_axis_rule(self, node, x, out_shape):
        """Ops that leave the channel axis alone: an exported slice of another axis whose bounds are read from
        shapes (CPUBone's ``o[..., :H, :W]``, ``aten.slice`` with a symbolic stop), and single-head attention on
        plain tensors (q, k and v with the channel last: q and k share their permutation, the output has v's)."""
        target, args = node.target, node.args
        if target is torch.ops.aten.slice.Tensor and x is not None and x.name not in self.params:
            dim = args[1] if len(args) > 1 else 0
            label, cdim = self.info[x.name]
            return (label, cdim) if isinstance(dim, int) and dim % len(out_shape) != cdim else None
        kw = node.kwargs
        if target is F.scaled_dot_product_attention and len(args) == 3 and kw.get("attn_mask") is None \
                and not kw.get("is_causal") and set(kw) <= {"attn_mask", "dropout_p", "is_causal", "scale"} \
                and all(isinstance(a, torch.fx.Node) and a.name in self.info and a.name not in self.params for a in args):
            q, k, v = (self.info[a.name] for a in args)
            if any(cdim != len(self.shape(a)) - 1 for a, (_, cdim) in zip(args, (q, k, v))):
                return None
            self.union(q[0], k[0])
            return self.find(v[0]), len(out_shape) - 1
        return None

    def _arg(self, node, index, name):
        """State key of an argument read from the module; None if absent; False if something else."""
        value = node.args[index] if len(node.args) > index else node.kwargs.get(name)
        if value is None:
            return None
        return self.param_key(value) or False

    def layer_norm(self, x, out_shape, normalized_dims, keys):
        label, cdim = self.info[x.name]
        first = len(out_shape) - normalized_dims
        for key in keys:
            if key is None:
                continue
            axes = [None] * normalized_dims
            if cdim >= first:  # statistics over a set of axes that holds the channel: permutation invariant
                axes[cdim - first] = label
            self.set_axes(key, axes)
        return self.find(label), cdim
