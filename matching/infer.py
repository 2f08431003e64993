"""Permutation-spec inference from a traced module (torch.fx), and its verification.

Every tensor flowing through the graph carries a "channel label": the hidden
unit permutation its channel axis is in (or FIXED: inputs, outputs and
anything we do not understand). Layers create labels (Linear/Conv outputs),
pass them through (norms, activations, pooling, dropout, permutes, gates) or
tie them (residual adds, broadcast gates). A label that ever touches FIXED is
not permuted at all: an unknown op costs us a permutation, never correctness.
Structure that a plain permutation cannot express is kept as such (see
matching.spec): grouped convolutions and GroupNorm make a label block-structured
(units move within their group, groups move together), ``torch.cat`` along the
channel axis makes a label of segments, and flattening a ``C x H x W`` map into
a Linear layer expands each channel into ``H * W`` inputs. The result is then
checked by permuting a model at random and comparing outputs; a spec that fails
that check is an error and never used.
"""

from __future__ import annotations

import copy
import math
import operator
import sys
import threading

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves

from matching.errors import MatchingError
from matching.infer_attention import AttentionRules
from matching.spec import PermutationSpec, apply_permutation, perm_sizes, random_perms

FIXED = "<fixed>"

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
    torch.clamp, torch.clip, torch.abs, torch.square, torch.exp, torch.neg}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardsigmoid"}
_PASS_METHODS = _ACTIVATION_METHODS | {"contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as",
                                       "clamp", "clamp_", "clamp_min", "clamp_max", "abs", "neg", "exp", "square",
                                       "detach"}
_ELEMENTWISE_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
                       torch.add, torch.sub, torch.mul, torch.div}
_ELEMENTWISE_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_", "sub_", "div_"}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax}
_REDUCTION_METHODS = {"mean", "sum", "amax"}


def _pass_through_functions():
    """Functions (fx leaves) that are identities in eval mode and per-sample otherwise: stochastic depth. Only
    looked up when already imported (a model using it has imported it; importing torchvision costs seconds)."""
    module = sys.modules.get("torchvision.ops.stochastic_depth")
    return {module.stochastic_depth} if module is not None else set()


# torch.fx tracing patches module-global state (nn.Module.__call__ among it): two threads tracing at once (an API
# process answering concurrent job submissions) corrupt it for good, and a model run in one thread while another
# traces goes through the patched call and fails. Traces and the runs of inference (shape propagation,
# verification) take this lock.
_TRACE_LOCK = threading.Lock()


def trace(model: nn.Module, top_training: bool = False) -> torch.fx.GraphModule:
    """torch.fx symbolic trace in eval mode (``top_training``: the top module's own flag set, every submodule in
    eval mode: the graph with GoogLeNet's and Inception's auxiliary heads, still deterministic); a model that
    cannot be traced is a MatchingError naming the construct."""
    was_training = model.training
    model.eval()
    model.training = top_training
    try:
        with _TRACE_LOCK:
            return torch.fx.symbolic_trace(model)
    except Exception as exc:  # TraceError, TypeError from control flow on proxies, NotImplementedError, ...
        raise MatchingError(untraceable_message(model, exc)) from None
    finally:
        model.train(was_training)


def untraceable_message(model: nn.Module, exc: BaseException) -> str:
    import traceback
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if "/torch/" not in frame.filename.replace("\\", "/"):
            where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} ({(frame.line or '').strip()[:120]})"
            break
    reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return (f"{type(model).__name__} cannot be traced by torch.fx{where}: {type(exc).__name__}: {reason}. "
            "Its permutation spec cannot be inferred on the server; export it where the model code lives with "
            "`rebasin spec --module package.module:factory --input-shape C,H,W` (or write it by hand) and submit "
            "it as 'permutation_spec' instead of 'architecture' (weight matching only).")


def _trace(model: nn.Module, example_input: torch.Tensor):
    """Label every graph value; returns a _Labels with the graph module, node -> (label, channel_dim), param axes.
    Parameters that the eval-mode graph never reads (auxiliary heads that run only in training) are labelled
    from the graph traced with the top module's training flag, in the same union-find: a parameter read by
    both graphs ties their labels. The eval-mode graph is labelled last: its nodes are the activation points."""
    gm = trace(model)
    labels = _Labels()
    if _unread_parameters(gm, model):
        try:
            auxiliary = _propagated(trace(model, top_training=True), model, example_input)
        except MatchingError:  # that graph does not trace or run: its parameters stay unpermuted
            auxiliary = None
        if auxiliary is not None:
            labels.visit_graph(auxiliary)
            labels.auxiliary = True
    labels.visit_graph(_propagated(gm, model, example_input))
    return labels


def _unread_parameters(gm: torch.fx.GraphModule, model: nn.Module) -> bool:
    read = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    return any(not any(".".join(key.split(".")[:i]) in read for i in range(1, key.count(".") + 2))
               for key, _ in model.named_parameters())


def _propagated(gm: torch.fx.GraphModule, model: nn.Module, example_input: torch.Tensor) -> torch.fx.GraphModule:
    """Shapes on every node, from one run in eval mode (the graph's submodules are the model's own: a run in
    training mode would update its BN statistics)."""
    was_training = model.training
    gm.eval()
    try:
        with _TRACE_LOCK, torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        raise MatchingError(f"the example input of shape {list(example_input.shape)} does not run through "
                            f"{type(model).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from None
    finally:
        model.train(was_training)
    return gm


class _Labels(AttentionRules):
    """Union-find over channel labels, with the structure of each (groups, segments, expansion)."""

    def __init__(self):
        self.parent: dict[str, str] = {FIXED: FIXED}
        self.order: dict[str, int] = {FIXED: -1}
        self.groups: dict[str, tuple[int, str]] = {}  # root label -> (number of groups, group-permutation label)
        # label -> ("segments", [(label, size)]) | ("expand", label, per_unit) | ("reindex", label, index)
        self.derived: dict[str, tuple] = {}
        self.param_axes: dict[str, list[str | None]] = {}
        self.grouped: list[tuple[str, str]] = []  # (output, input) labels of grouped convolutions
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
        self.activation_nodes: list[str] = []
        self.heads: dict = {}  # node -> Heads (a tensor inside an attention layer, see matching.infer_attention)
        self.tuples: dict = {}  # node -> per element: ("info", (label, axis)) | ("heads", Heads) | None
        self.joined: dict[str, list] = {}  # node -> module_pieces of a torch.cat of the module's 1-D tensors
        self.bias_pieces: list = []  # (output label, size, those pieces) of linear layers with such a bias
        for node in gm.graph.nodes:
            self.visit(node)
        for label, n, pieces in self.bias_pieces:
            start = 0
            for key, size in pieces:
                if key is not None:
                    self.set_axes(key, [self.sliced(label, n, start, start + size)])
                start += size

    # --- union-find -------------------------------------------------------------------------------------
    def find(self, x):
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def new_label(self, name, prefix="P_"):
        name = prefix + name
        while name in self.parent:
            name += "'"
        self.parent[name] = name
        self.order[name] = len(self.order)
        return name

    def fix(self, label):
        root = self.find(label)
        if root == FIXED:
            return FIXED
        self.parent[root] = FIXED
        if root in self.derived:
            kind = self.derived[root]
            for part in ([lab for lab, _ in kind[1]] if kind[0] == "segments" else [kind[1]]):
                self.fix(part)
        return FIXED

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.alike(ra, rb):  # the same structure (one graph's cat and another's): the same parts
            self.parent[rb] = ra
            kind_a, kind_b = self.derived[ra], self.derived[rb]
            for part_a, part_b in zip(*([p for p, _ in k[1]] if k[0] == "segments" else [k[1]] for k in (kind_a, kind_b))):
                self.union(part_a, part_b)
            return self.find(ra)
        if FIXED in (ra, rb) or ra in self.derived or rb in self.derived:
            self.fix(ra)
            return self.fix(rb)
        if self.order[ra] > self.order[rb]:  # the oldest label names the group
            ra, rb = rb, ra
        ga, gb = self.groups.pop(ra, None), self.groups.pop(rb, None)
        self.parent[rb] = ra
        if ga and gb:
            if ga[0] != gb[0]:
                return self.fix(ra)
            self.union(ga[1], gb[1])
        if ga or gb:
            self.groups[ra] = ga or gb
        return ra

    def alike(self, ra, rb):
        kind_a, kind_b = self.derived.get(ra), self.derived.get(rb)
        if kind_a is None or kind_b is None or kind_a[0] != kind_b[0]:
            return False
        if kind_a[0] == "segments":
            return [n for _, n in kind_a[1]] == [n for _, n in kind_b[1]]
        return kind_a[2] == kind_b[2]

    def set_groups(self, label, groups, group_label=None):
        """Units of ``label`` move only within ``groups`` contiguous groups; whole groups move by ``group_label``."""
        root = self.find(label)
        if root == FIXED or groups == 1:
            return root
        if root in self.derived:
            return self.fix(root)
        if root in self.groups:
            if self.groups[root][0] != groups:
                return self.fix(root)
            if group_label is not None:
                self.union(self.groups[root][1], group_label)
        else:
            self.groups[root] = (groups, group_label or self.new_label(root, "S_"))
        return self.find(root)

    def new_derived(self, name, structure):
        label = self.new_label(name)
        self.derived[label] = structure
        return label

    def sliced(self, label, n, start, stop):
        """Label of units ``start:stop`` of ``label`` (``n`` units; torch.chunk, split, x[:, a:b]). Permuted
        units must stay inside the slice, so the label is cut there: a free label becomes segments of new ones,
        a derived label is cut in its parts."""
        root = self.find(label)
        if root == FIXED or (start, stop) == (0, n):
            return root
        kind = self.derived.get(root)
        if kind is None:
            if root in self.groups:  # units move within groups: a cut through them is not followed
                return self.fix(root)
            cuts = [(a, b) for a, b in ((0, start), (start, stop), (stop, n)) if b > a]
            parts = [(self.new_label(f"{root}[{a}:{b}]", ""), b - a) for a, b in cuts]
            self.derived[root] = ("segments", parts)
            return parts[cuts.index((start, stop))][0]
        if kind[0] == "segments":
            pieces, offset = [], 0
            for part, size in kind[1]:
                lo, hi = max(start, offset), min(stop, offset + size)
                if lo < hi:
                    pieces.append((self.sliced(part, size, lo - offset, hi - offset), hi - lo))
                offset += size
            return pieces[0][0] if len(pieces) == 1 else self.new_derived(f"{root}[{start}:{stop}]", ("segments", pieces))
        if kind[0] == "reindex":  # the slice holds some units of the inner label: cut it around each run of them
            units = kind[2][start:stop]
            ordered = sorted(units)
            runs, begin = [], 0
            for i in range(1, len(ordered) + 1):
                if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
                    runs.append((ordered[begin], ordered[i - 1] + 1))
                    begin = i
            pieces = [(self.sliced(kind[1], n, a, b), b - a) for a, b in runs]
            inner = pieces[0][0] if len(pieces) == 1 else self.new_derived(f"{root}[{start}:{stop}]", ("segments", pieces))
            rank = {u: r for r, u in enumerate(ordered)}
            return self.reindexed(inner, [rank[u] for u in units])
        return self.fix(root)  # an expansion (a flattened map) is not cut

    def reindexed(self, label, index):
        """``label``'s units in the order ``index`` (entry i is unit index[i])."""
        if index == sorted(index) or self.find(label) == FIXED:
            return self.find(label)
        return self.new_derived(f"reindex_{label}", ("reindex", label, list(index)))

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

    def set_axes(self, key, labels):
        if key in self.param_axes:  # a tensor used twice: tie what it sees
            labels = [self.union(a, b) if a and b else (a or b) for a, b in zip(self.param_axes[key], labels)]
        self.param_axes[key] = list(labels)

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

    def reshaped(self, x, out_shape):
        """A reshape keeps the channel if it stays its own axis with the same leading elements, or becomes the
        outermost factor of a merged axis (a C x H x W map flattened: each channel spans H*W entries)."""
        label, cdim = self.info[x.name]
        in_shape = self.shape(x)
        lead = math.prod(in_shape[:cdim])
        if x.name in self.spread:
            return self.merged(x, out_shape)
        for i in range(len(out_shape)):
            if math.prod(out_shape[:i]) != lead:
                continue
            for j in range(cdim + 1, len(in_shape) + 1):
                if math.prod(in_shape[cdim:j]) == out_shape[i]:
                    per_unit = math.prod(in_shape[cdim + 1:j])
                    if per_unit == 1:
                        return label, i
                    if self.find(label) == FIXED:
                        return FIXED, 0
                    return self.new_derived(f"flat_{x.name}", ("expand", label, per_unit)), i
        for i in range(len(out_shape)):  # the innermost factor of a merged axis (timm's Swin patch merging:
            for k in range(cdim):  # [.., 2, 2, C] -> [.., 4C]): a segment per copy, each permuted by the channel's
                if math.prod(out_shape[:i]) == math.prod(in_shape[:k]) and out_shape[i] == math.prod(in_shape[k:cdim + 1]):
                    if self.find(label) == FIXED:
                        return FIXED, 0
                    copies = math.prod(in_shape[k:cdim])
                    if copies == 1:
                        return label, i
                    return self.new_derived(f"tile_{x.name}", ("segments", [(label, in_shape[cdim])] * copies)), i
        for i in range(len(out_shape)):  # the channel split over several axes (a channel shuffle's view)
            for j in range(i + 2, len(out_shape) + 1):
                if math.prod(out_shape[:i]) == lead and math.prod(out_shape[i:j]) == in_shape[cdim] and out_shape[i] > 1:
                    self.spread[self.current] = (i, torch.arange(in_shape[cdim]).reshape(out_shape[i:j]))
                    return label, i
        return self.fix(label), 0

    def merged(self, x, out_shape):
        """A channel spread over axes (``spread``) merged back into one axis: its units in their new order."""
        label, first = self.info[x.name]
        units = self.spread[x.name][1]
        lead = math.prod(self.shape(x)[:first])
        for i in range(len(out_shape)):
            if math.prod(out_shape[:i]) == lead and out_shape[i] == units.numel():
                return self.reindexed(label, units.reshape(-1).tolist()), i
        return self.fix(label), 0

    def spread_permuted(self, x, dims):
        """A permute of a spread channel's axes among themselves (the shuffle's transpose) reorders its units."""
        label, first = self.info[x.name]
        units = self.spread[x.name][1]
        axes = range(first, first + units.dim())
        where = [o for o, d in enumerate(dims) if d in axes]
        if where != list(range(where[0], where[0] + len(where))):
            return None
        self.spread[self.current] = (where[0], units.permute([dims[o] - first for o in where]))
        return label, where[0]

    def param_reshaped(self, node, x, out_shape):
        """A parameter viewed with singleton axes added or removed keeps track of its own axes."""
        key, dims = self.params[x.name]
        in_shape = self.shape(x)
        if [s for s in in_shape if s != 1] != [s for s in out_shape if s != 1]:
            return False
        real = iter([d for d, s in zip(dims, in_shape) if s != 1])
        self.params[node.name] = (key, [next(real) if s != 1 else None for s in out_shape])
        return True

    # --- ops ----------------------------------------------------------------------------------------------
    def linear(self, key_w, key_b, x, out_shape):
        out = self.new_label(key_w.rsplit(".", 1)[0])
        self.set_axes(key_w, [out, self.channel_in(x, -1)])
        if key_b is not None:
            self.set_axes(key_b, [out])
        return out, len(out_shape) - 1

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
        if self.attention_visit(node, out_shape):
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

    def rule(self, node, out_shape):
        args = node.args
        x = args[0] if args and isinstance(args[0], torch.fx.Node) and args[0].name in self.info else None
        kw = node.kwargs
        if any(a.name in self.spread for a in self.tensor_args(node)):
            return self.spread_rule(node, x, out_shape)
        if node.op == "call_function" and node.target is operator.getitem and isinstance(args[0], torch.fx.Node) \
                and args[0].name in self.pieces:
            return self.pieces[args[0].name][args[1]] if isinstance(args[1], int) else None
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
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return self.conv(f"{key}.weight", f"{key}.bias" if m.bias is not None else None, x, m.groups,
                                 tuple(m.weight.shape))
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
                    return None
                return label, cdim
            return None
        if node.op == "call_method":
            target = node.target
            if x is None:
                return None
            if target in _PASS_METHODS:
                if target in _ACTIVATION_METHODS:
                    self.activation_nodes.append(node.name)
                return self.info[x.name]
            if target in ("view", "reshape", "flatten", "squeeze", "unsqueeze"):
                return self.reshaped(x, out_shape)
            if target in _ELEMENTWISE_BINARY_METHODS:
                return self.broadcast(node, out_shape)
            if target in ("permute", "transpose", "swapaxes", "swapdims"):
                return self.permuted(x, target, args[1:], kw)
            if target in _REDUCTION_METHODS:
                return self.reduced(x, args[1:], kw, out_shape)
        return None

    def split(self, node):
        """torch.chunk / split: each piece gets its slice of the channel (or the whole channel when split along
        another axis); ``getitem`` picks them. Returns whether it understood the node."""
        chunking = node.op == "call_method" and node.target in ("chunk", "split") or \
            node.op == "call_function" and node.target in (torch.chunk, torch.split)
        x = node.args[0] if node.args else None
        metas = node.meta.get("tensor_meta")
        if not chunking or not isinstance(x, torch.fx.Node) or x.name not in self.info or x.name in self.params \
                or x.name in self.spread or not isinstance(metas, (tuple, list)):
            return False
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if not isinstance(dim, int):
            return False
        label, cdim = self.info[x.name]
        n = self.shape(x)[cdim]
        if dim % len(self.shape(x)) != cdim:
            self.pieces[node.name] = [(label, cdim)] * len(metas)
            return True
        bounds = [0]
        for meta in metas:
            bounds.append(bounds[-1] + meta.shape[cdim])
        self.pieces[node.name] = [(self.sliced(label, n, a, b), cdim) for a, b in zip(bounds, bounds[1:])]
        return True

    def spread_rule(self, node, x, out_shape):
        """The ops a channel spread over several axes goes through in a channel shuffle; anything else fixes it."""
        if x is None or x.name not in self.spread or sum(a.name in self.spread for a in self.tensor_args(node)) > 1:
            return None
        method, function = node.op == "call_method", node.op == "call_function"
        if method and node.target in ("contiguous", "clone"):
            self.spread[node.name] = self.spread[x.name]
            return self.info[x.name]
        if method and node.target in ("view", "reshape", "flatten") or function and node.target in (torch.reshape, torch.flatten):
            return self.reshaped(x, out_shape)
        if method and node.target in ("permute", "transpose") or function and node.target in (torch.permute, torch.transpose):
            return self.permuted(x, node.target if method else node.target.__name__, node.args[1:], node.kwargs)
        return None

    def module_pieces(self, tensors, dim):
        """[(state key or None, size)] of 1-D tensors of the module joined end to end (BEiT's bias: q bias, a
        zero k bias kept out of the state, v bias), or None. A piece outside the state must be zero: it stays
        in place."""
        if dim not in (0, -1):
            return None
        pieces = []
        for t in tensors:
            shape = self.shape(t) if t.op == "get_attr" else None
            if shape is None or len(shape) != 1:
                return None
            key = self.param_key(t)
            if key is None and operator.attrgetter(t.target)(self.gm).count_nonzero() > 0:
                return None
            pieces.append((key, shape[0]))
        return pieces

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

    def permuted(self, x, kind, rest, kw):
        label, cdim = self.info[x.name]
        nd = len(self.shape(x))
        if kind == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else (list(rest) or kw.get("dims"))
            if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
                return None
            dims = [d % nd for d in dims]
        else:
            d0, d1 = (list(rest) + [kw.get("dim0"), kw.get("dim1")])[:2] if len(rest) >= 2 else (kw.get("dim0"), kw.get("dim1"))
            if not isinstance(d0, int) or not isinstance(d1, int):
                return None
            dims = list(range(nd))
            dims[d0 % nd], dims[d1 % nd] = d1 % nd, d0 % nd
        if x.name in self.spread:
            return self.spread_permuted(x, dims)
        return label, dims.index(cdim)

    def reduced(self, x, rest, kw, out_shape):
        label, cdim = self.info[x.name]
        nd = len(self.shape(x))
        dims = rest[0] if rest else kw.get("dim")
        keepdim = rest[1] if len(rest) > 1 else kw.get("keepdim", False)
        if dims is None or not isinstance(keepdim, bool):
            return None
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            return None
        dims = [d % nd for d in dims]
        if cdim in dims:
            return None
        return label, cdim if keepdim else cdim - sum(d < cdim for d in dims)

    def indexed(self, x, index, out_shape):
        """x[:, :, None, None] and other indexing that leaves the channel axis whole."""
        label, cdim = self.info[x.name]
        nd = len(self.shape(x))
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.fx.Node) for i in index):
            return None
        if index.count(Ellipsis) > 1:
            return None
        if Ellipsis in index:
            at = index.index(Ellipsis)
            real = sum(i is not None for i in index if i is not Ellipsis)
            index = index[:at] + (slice(None),) * (nd - real) + index[at + 1:]
        index = index + (slice(None),) * (nd - sum(i is not None for i in index))
        in_dim = out_dim = 0
        new_cdim = None
        for i in index:
            if i is None:
                out_dim += 1
                continue
            if in_dim == cdim:
                if not isinstance(i, slice) or not all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step)):
                    return None
                units = range(self.shape(x)[cdim])[i]
                if units.step != 1 or not units:
                    return None
                label = self.sliced(label, self.shape(x)[cdim], units.start, units.stop)
                new_cdim = out_dim
            if isinstance(i, int):
                in_dim += 1
                continue
            if not isinstance(i, slice):
                return None
            in_dim += 1
            out_dim += 1
        return (label, new_cdim) if new_cdim is not None else None

    def concat(self, node, tensors, dim, out_shape):
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.fx.Node) and t.name in self.info
                                                            for t in tensors) or not isinstance(dim, int):
            return None
        pieces = self.module_pieces(tensors, dim)
        if pieces is not None:  # a bias assembled from the module's tensors: F.linear labels its pieces
            self.joined[node.name] = pieces
            return FIXED, 0
        params = [t for t in tensors if t.name in self.params]
        plain = [t for t in tensors if t.name not in self.params]
        dim = dim % len(out_shape)
        cdims = {self.info[t.name][1] for t in plain}
        if len(cdims) != 1:
            return None
        cdim = cdims.pop()
        if cdim != dim:  # joined along another axis (e.g. a token axis): one channel permutation for all
            label = self.info[plain[0].name][0]
            for t in plain[1:]:
                label = self.union(label, self.info[t.name][0])
            for t in params:  # a class token: its channel axis takes the permutation
                key, dims = self.params[t.name]
                axes = [None] * len(self.param_shape(key))
                if dims[cdim] is None:
                    return None
                axes[dims[cdim]] = label
                self.set_axes(key, axes)
            return self.find(label), cdim
        if params:
            return None
        segments = [(self.info[t.name][0], self.shape(t)[dim]) for t in tensors]
        return self.new_derived(f"cat_{node.name}", ("segments", segments)), dim


def _resolve_spec(labels: _Labels, state: dict) -> PermutationSpec:
    """Named permutations and their structure from the labels that were not fixed."""
    perms: dict[str, dict] = {}
    changed = True
    while changed:  # a grouped conv's input groups are located through its output's
        changed = False
        for out, inp in labels.grouped:
            if labels.find(out) == FIXED and labels.find(inp) != FIXED:
                labels.fix(inp)
                changed = True

    def name(label):
        root = labels.find(label)
        if root == FIXED:
            return None
        if root in labels.derived and root not in perms:
            kind = labels.derived[root]
            if kind[0] == "segments":
                segments = [[name(lab), size] for lab, size in kind[1]]
                if all(s is None for s, _ in segments):
                    return None
                perms[root] = {"segments": segments}
            else:
                inner = name(kind[1])
                if inner is None:
                    return None
                perms[root] = {"expand": inner, "per_unit": kind[2]} if kind[0] == "expand" else \
                    {"reindex": inner, "index": kind[2]}
        elif root in labels.groups and root not in perms:
            groups, group_label = labels.groups[root]
            group_root = labels.find(group_label)
            perms[root] = {"groups": groups, "group_perm": None if group_root == FIXED else group_root}
        return root

    axes_to_perm = {}
    for key, tensor in state.items():
        axes = labels.param_axes.get(key, [None] * tensor.dim())
        axes_to_perm[key] = tuple(None if lab is None else name(lab) for lab in axes)
    reachable, todo = set(), [p for axes in axes_to_perm.values() for p in axes if p]
    while todo:
        p = todo.pop()
        if p not in reachable:
            reachable.add(p)
            entry = perms.get(p, {})
            todo += [s for s, _ in entry.get("segments", []) if s] + [entry[k] for k in ("expand", "reindex") if k in entry]
    return PermutationSpec(axes_to_perm, {p: v for p, v in perms.items() if p in reachable})


def infer_spec(model: nn.Module, example_input: torch.Tensor, verify: bool = True) -> PermutationSpec:
    """Infer the permutation spec of ``model`` (a trusted module) and, by default, verify it."""
    labels = _trace(model, example_input)
    spec = _resolve_spec(labels, model.state_dict())
    if verify:
        verify_spec(model, spec, example_input, auxiliary=labels.auxiliary)
    return spec


def activation_points(model: nn.Module, example_input: torch.Tensor, spec: PermutationSpec):
    """For each free permutation of ``spec``: graph nodes whose channel axis it permutes, as (node, channel axis,
    offset, size) with the slice of the channel axis it holds (a segment of a concatenation), post-nonlinearity
    nodes preferred (the paper matches post-activation units). Returns ({perm: [...]}, graph module)."""
    labels = _trace(model, example_input)
    free = set(spec.free_perms)
    points: dict[str, list] = {p: [] for p in free}
    post: dict[str, list] = {p: [] for p in free}
    activations = set(labels.activation_nodes)

    def add(name, label, cdim, offset, size):
        root = labels.find(label)
        if root in free:
            points[root].append((name, cdim, offset, size))
            if name in activations:
                post[root].append((name, cdim, offset, size))
        elif root in labels.derived and labels.derived[root][0] == "segments":
            for lab, n in labels.derived[root][1]:
                add(name, lab, cdim, offset, n)
                offset += n

    for node in labels.gm.graph.nodes:
        if node.name in labels.info and node.name not in labels.params:
            label, cdim = labels.info[node.name]
            shape = labels.shape(node)
            add(node.name, label, cdim, 0, shape[cdim] if shape else 0)
    return {p: post[p] or points[p] for p in points}, labels.gm


def verify_spec(model: nn.Module, spec: PermutationSpec, example_input: torch.Tensor, seed: int = 0,
                auxiliary: bool = False) -> None:
    """Permute a float64 copy of ``model`` at random per ``spec``; outputs must not change (``auxiliary``: also
    those computed with the top module's training flag set and every submodule in eval mode, e.g. GoogLeNet's
    auxiliary heads)."""
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
    permuted.load_state_dict(apply_permutation(spec, random_perms(sizes, gen, spec), state))
    x = example_input.double() if example_input.is_floating_point() else example_input  # token ids stay ids
    err, scale = 0.0, 0.0
    for top_training in (False, True) if auxiliary else (False,):
        reference.training = permuted.training = top_training
        with _TRACE_LOCK, torch.no_grad():
            outputs = list(zip(tree_leaves(reference(x)), tree_leaves(permuted(x))))
        for expected, got in ((e, g) for e, g in outputs if isinstance(e, torch.Tensor)):
            err, scale = max(err, (expected - got).abs().max().item()), max(scale, expected.abs().max().item())
    if not err <= 1e-8 * (1 + scale):
        raise MatchingError(f"the inferred permutation spec of {type(model).__name__} is not function-preserving (max abs "
                            f"diff {err:.3g}), so it is not used; export a spec with `rebasin spec --module` and send it as permutation_spec")
