"""Spec-inference rules for multi-head attention (a mixin of ``matching.infer_layers.GraphLabels``).

Inside an attention layer a tensor has more than one permuted axis: after ``qkv.reshape(B, N, 3, H, d)`` the
axes are (stack of q/k/v, head, dimension within the head). Such a tensor is tracked as a ``Heads`` value: a
role per axis ("part", "head", "within" or None), the head permutation S, and the within-head label of each
part (one label when there is no part axis). A within-head label is a block-structured permutation of the
``H * d`` units of the projection (groups = heads, group permutation S), which is how it appears in the spec.
The symmetries this finds: heads (S, shared by Q, K, V and the output projection's input), the dimensions
within each head (one permutation shared by Q and K, since the scores contract them; another shared by V and
the output projection), and per-head parameters such as a relative position bias table (its head axis takes S).
Anything else done to a ``Heads`` tensor fixes its labels, as unknown ops do elsewhere.
"""

from __future__ import annotations

import inspect
import math
import operator
import sys
from dataclasses import dataclass, replace

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from matching.infer_labels import FIXED
from matching.infer_rotary import RotaryRules

_HEAD_PASS_FUNCTIONS = {F.softmax, torch.softmax, F.normalize, F.dropout, torch.exp, torch.clamp}
_HEAD_REDUCTIONS = {"amax", "mean", "sum", torch.amax, torch.mean, torch.sum}
_HEAD_PASS_METHODS = {"softmax", "contiguous", "clone", "float", "double", "to", "type_as", "exp", "detach"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
           operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.maximum, torch.minimum,
           "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}  # in place: MPNet's `scores += position_bias`
_MATMUL = {operator.matmul, torch.matmul, "matmul"}


@dataclass(frozen=True)
class Heads:
    roles: tuple  # per axis: "part", "head", "within" or None
    head: str  # the head permutation's label (S)
    within: tuple  # within-head label of each part (one entry when there is no part axis; none for scores)

    def axis(self, role):
        return self.roles.index(role) if role in self.roles else None


def _base(label):
    return label.removeprefix("P_")


def _timm_functions():
    module = sys.modules.get("timm.layers.attention")
    if module is None or not hasattr(module, "maybe_add_mask"):
        return {}
    return {module.maybe_add_mask: "add_mask", module.resolve_self_attn_mask: "mask"}


def _swin_functions():
    module = sys.modules.get("torchvision.models.swin_transformer")
    if module is None:
        return {}
    return {module.shifted_window_attention: "window_attention", module._get_relative_position_bias: "position_bias",
            module._patch_merging_pad: "patch_merging"}


class AttentionRules(RotaryRules):
    """Needs from the host: info, params, find/union/fix/new_label/new_derived/set_groups, groups, derived,
    shape, channel_in, set_axes, param_key, param_shape, linear."""

    heads: dict
    tuples: dict

    # --- bookkeeping ------------------------------------------------------------------------------------
    def fix_value(self, name):
        """Fix every label a Heads value or a tuple carries."""
        if name in self.heads:
            h = self.heads.pop(name)
            for label in (h.head, *h.within):
                self.fix(label)
        for entry in self.tuples.pop(name, []):
            if entry is not None and entry[0] == "heads":
                for label in (entry[1].head, *entry[1].within):
                    self.fix(label)
            elif entry is not None:
                self.fix(entry[1][0])

    def attention_visit(self, node, out_shape) -> bool:
        """Handle ``node`` if it is an attention construct or touches a Heads value or tuple; True if handled."""
        structured = [a for a in self._node_args(node) if a.name in self.heads or a.name in self.tuples]
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node) \
                and node.args[0].name in self.tuples:
            entries = self.tuples[node.args[0].name]
            i = node.args[1]
            entry = entries[i] if isinstance(i, int) and -len(entries) <= i < len(entries) else None
            if entry is not None and entry[0] == "heads":
                self.heads[node.name] = entry[1]
                self.info[node.name] = (FIXED, 0)
            elif entry is not None and out_shape is not None:
                self.info[node.name] = entry[1]
            elif out_shape is not None:
                self.info[node.name] = (FIXED, 0)
            return True
        result = None
        special = self.attention_rule(node, out_shape) if not structured else None
        if special is not None:
            result = special
        elif structured:
            result = self.head_rule(node, out_shape)
            if result is None:
                for a in structured:
                    self.fix_value(a.name)
                return False  # the generic rules now see fixed inputs
        else:
            return False
        kind, value = result
        if kind == "heads":
            self.heads[node.name] = value
            self.info[node.name] = (FIXED, 0)
        elif kind == "tuple":
            self.tuples[node.name] = value
        elif kind == "none":  # a None value
            pass
        elif kind == "param":
            self.params[node.name] = value
            self.info[node.name] = (FIXED, 0)
        else:
            self.info[node.name] = value
        return True

    @staticmethod
    def _node_args(node):
        out = []
        torch.fx.node.map_arg((node.args, node.kwargs), out.append)
        return out

    # --- constructs recognised whole --------------------------------------------------------------------
    def attention_rule(self, node, out_shape):
        x = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) and node.args[0].name in self.info \
            and node.args[0].name not in self.params else None
        if x is not None and (node.op == "call_method" and node.target in ("view", "reshape")
                              or node.op == "call_function" and node.target is torch.reshape):
            if any(self._over_paths(user, self.info[x.name][1]) for user in node.users):
                return None  # attention over branches (selective kernel, split attention): not heads
            return self.split_heads(x, out_shape) or self.split_heads_per_head(x, out_shape) or \
                self.split_heads_regrouped(x, out_shape)
        if x is not None and (node.op == "call_method" and node.target == "chunk" or node.target is torch.chunk):
            return self.chunked(x, node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks"),
                                node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0))
        if x is not None and (node.op == "call_method" and node.target == "split" or node.target is torch.split):
            parts = node.meta.get("tensor_meta")  # the split size is often read from x.shape: take the result's
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            if isinstance(parts, (tuple, list)) and isinstance(dim, int) and len({p.shape[dim] for p in parts}) == 1:
                return self.chunked(x, len(parts), dim)
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            return self.single_head_sdpa(node, out_shape)
        if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), nn.MultiheadAttention):
            return self.multihead_attention(node, self.gm.get_submodule(node.target))
        if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), nn.Embedding):
            # token (or position) embedding: a row per id, the residual stream's units are its columns
            out = self.new_label(node.target)
            self.set_axes(f"{node.target}.weight", [None, out])
            return "info", (out, len(out_shape) - 1)
        if node.op == "call_function":
            kind = _swin_functions().get(node.target)
            if kind is not None:
                args = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
                return getattr(self, f"swin_{kind}")(args, out_shape)
        if node.args and isinstance(node.args[0], torch.fx.Node) and node.args[0].name in self.params:
            if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), nn.Linear):
                # Swin v2's continuous position bias: an MLP over a coordinate buffer (unpermuted input)
                bias = f"{node.target}.bias" if self.gm.get_submodule(node.target).bias is not None else None
                return "info", self.linear(f"{node.target}.weight", bias, node.args[0], out_shape)
            return self.param_view(node, node.args[0], out_shape)
        return None

    def single_head_sdpa(self, node, out_shape):
        """Attention of one head on plain channels (MaxViT's first stage: 1 head of 32 dimensions): the scores
        contract q's and k's channels (one permutation), the output carries v's; a mask must not move."""
        q, k, v = (list(node.args) + [node.kwargs.get(n) for n in ("query", "key", "value")[len(node.args):]])[:3]
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        tensors = (q, k, v)
        if not all(isinstance(t, torch.fx.Node) and t.name in self.info and t.name not in self.params
                   and self.info[t.name][1] == len(self.shape(t)) - 1 for t in tensors) \
                or node.kwargs.get("enable_gqa") or len(node.args) > 6:
            return None
        if isinstance(mask, torch.fx.Node) and mask.name not in self.params \
                and (mask.name not in self.info or self.find(self.info[mask.name][0]) != FIXED):
            return None
        self.union(self.info[q.name][0], self.info[k.name][0])
        return "info", (self.info[v.name][0], len(out_shape) - 1)

    @staticmethod
    def _over_paths(node, axis):
        """A softmax or sum over ``axis``: heads are never mixed that way (attention's softmax is over keys)."""
        name = getattr(node.target, "__name__", node.target) if node.op != "call_module" else None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return name in ("softmax", "sum") and dim == axis

    def param_view(self, node, x, out_shape):
        """A per-head table read through an index and laid out as [H, N, N] (MaxViT's relative position bias):
        table[index] (a gather on axis 0), view, permute; the table's head axis is tracked through them."""
        key, dims = self.params[x.name]
        in_shape = self.shape(x)
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], torch.fx.Node):
            index = self.shape(node.args[1])
            return ("param", (key, [None] * len(index) + dims[1:])) if index is not None else None
        if node.op == "call_method" and node.target == "permute":
            order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            return "param", (key, [dims[d % len(dims)] for d in order])
        if node.op == "call_method" and node.target in ("view", "reshape") and \
                [n for n in in_shape if n != 1] != [n for n in out_shape if n != 1]:
            prefix = lambda shape, i: torch.Size(shape[:i]).numel()
            out = [None] * len(out_shape)
            for axis, d in enumerate(dims):
                if d is None:
                    continue
                match = [i for i in range(len(out_shape)) if prefix(out_shape, i) == prefix(in_shape, axis)
                         and out_shape[i] == in_shape[axis]]
                if not match:
                    return None
                out[match[0]] = d
            return "param", (key, out)
        return None

    def attention_projections(self, name, heads, size):
        """Labels of one attention layer: S, the Q/K within-head label, the V one, and the label of a packed
        [q; k; v] projection's output (``size`` rows each)."""
        head = self.new_label(name, "S_")
        qk = self.set_groups(self.new_label(f"{name}.qk"), heads, head)
        v = self.set_groups(self.new_label(f"{name}.v"), heads, head)
        packed = self.new_derived(f"{name}.qkv", ("segments", [(qk, size), (qk, size), (v, size)]))
        return head, qk, v, packed

    def multihead_attention(self, node, m):
        query, key, value = (node.args + tuple(node.kwargs.get(n) for n in ("query", "key", "value")[len(node.args):]))[:3]
        mask = node.kwargs.get("attn_mask", node.args[5] if len(node.args) > 5 else None)
        if m.bias_k is not None or m.add_zero_attn or not all(isinstance(t, torch.fx.Node) and t.name in self.info
                                                                for t in (query, key, value)):
            return None
        if isinstance(mask, torch.fx.Node) and mask.name in self.info and len(self.shape(mask)) == 3:
            return None  # a per-head mask [N * H, L, S] does not follow the heads
        name, embed = node.target, m.embed_dim
        inputs = [self.channel_in(t, -1) for t in (query, key, value)]
        _, qk, v, packed = self.attention_projections(name, m.num_heads, embed)
        if m._qkv_same_embed_dim:
            self.set_axes(f"{name}.in_proj_weight", [packed, self.union(self.union(*inputs[:2]), inputs[2])])
        else:
            for n, lab, inp in (("q", qk, inputs[0]), ("k", qk, inputs[1]), ("v", v, inputs[2])):
                self.set_axes(f"{name}.{n}_proj_weight", [lab, inp])
        if m.in_proj_bias is not None:
            self.set_axes(f"{name}.in_proj_bias", [packed])
        out = self.output_projection(f"{name}.out_proj.weight", f"{name}.out_proj.bias" if m.out_proj.bias is not None else None, v)
        return "tuple", [("info", (out, len(self.shape(query)) - 1)), None]

    def output_projection(self, key_w, key_b, within):
        out = self.new_label(key_w.rsplit(".", 1)[0])
        self.set_axes(key_w, [out, within])
        if key_b is not None:
            self.set_axes(key_b, [out])
        return out

    def swin_window_attention(self, args, out_shape):
        x = args["input"]
        qkv_w, proj_w = self.param_key(args["qkv_weight"]), self.param_key(args["proj_weight"])
        qkv_b, proj_b = (self.param_key(args.get(n)) if args.get(n) is not None else None for n in ("qkv_bias", "proj_bias"))
        if not qkv_w or not proj_w or False in (qkv_b, proj_b) or not isinstance(args["num_heads"], int):
            return None
        channels = self.param_shape(proj_w)[1]
        head, _, v, packed = self.attention_projections(qkv_w.rsplit(".", 2)[0], args["num_heads"], channels)
        self.set_axes(qkv_w, [packed, self.channel_in(x, -1)])
        if qkv_b:
            self.set_axes(qkv_b, [packed])
        out = self.output_projection(proj_w, proj_b, v)
        for tensor in (args["relative_position_bias"], args.get("logit_scale")):
            if tensor is not None:
                self.follow_heads(tensor, 1 if tensor is args["relative_position_bias"] else 0, head)
        return "info", (out, len(out_shape) - 1)

    def follow_heads(self, tensor, axis, head):
        """A per-head tensor (bias table, logit scale) whose ``axis`` is the head axis takes S."""
        if tensor.name in self.params:
            key, dims = self.params[tensor.name]
            if dims[axis] is not None:
                axes = list(self.param_axes.get(key, [None] * len(self.param_shape(key))))
                axes[dims[axis]] = head
                self.set_axes(key, axes)
                return
        elif tensor.name in self.info and self.info[tensor.name][1] == axis % len(self.shape(tensor)):
            self.union(self.info[tensor.name][0], head)
            return
        self.fix(head)
        self.fix_node(tensor)

    def swin_position_bias(self, args, out_shape):
        """torchvision's _get_relative_position_bias: table [(2h-1)(2w-1), H] -> [1, H, N, N]."""
        table = args["relative_position_bias_table"]
        if table.name in self.params:
            key, dims = self.params[table.name]
            return "param", (key, [None, dims[1], None, None])
        if table.name in self.info and self.info[table.name][1] == 1:
            return "info", (self.info[table.name][0], 1)
        return None

    def swin_patch_merging(self, args, out_shape):
        x = args["x"]
        label, cdim = self.info[x.name]
        if cdim != len(self.shape(x)) - 1:
            return None
        channels = self.shape(x)[-1]
        return "info", (self.new_derived(f"merge_{x.name}", ("segments", [(label, channels)] * 4)), cdim)

    # --- splitting a channel axis into heads, and merging them back ---------------------------------------
    def split_heads(self, x, out_shape):
        """[..., C, ...] -> [..., H, d, ...] or [..., m, H, d, ...] (m = 2 or 3 stacked projections); the axes after
        the channel may be merged at once (Visformer's conv attention: [B, C, H, W] -> [B, 3, heads, d, H * W]),
        and so may those before a last channel axis (MaxViT's windows: [B', h, w, C] -> [B', h * w, H, 3d])."""
        label, cdim = self.info[x.name]
        in_shape = self.shape(x)
        root = self.find(label)
        if root == FIXED or root in self.derived:
            return None
        if tuple(out_shape[:cdim]) != tuple(in_shape[:cdim]):
            return self.split_heads_merging_before(root, cdim, in_shape, out_shape)
        same_rest = [e for e in (1, 2) if tuple(out_shape[cdim + e + 1:]) == tuple(in_shape[cdim + 1:])
                     and len(out_shape) == len(in_shape) + e]
        merged_rest = [e for e in (1, 2) if cdim + e + 1 < len(out_shape) and
                       torch.Size(out_shape[cdim + e + 1:]).numel() == torch.Size(in_shape[cdim + 1:]).numel()]
        extra = next(iter(same_rest or merged_rest), None)
        if extra is None or torch.Size(out_shape[cdim:cdim + extra + 1]).numel() != in_shape[cdim]:
            return None
        return self.heads_at(root, in_shape[cdim], out_shape, cdim, extra)

    def heads_at(self, root, channels, out_shape, start, extra, packed_if_grouped=True):
        """The channel's label split at ``out_shape[start:start + extra + 1]``: [H, d] (extra 1) or [m, H, d]
        (extra 2, m = 2 or 3 stacked projections)."""
        split = out_shape[start:start + extra + 1]
        heads, parts = split[-2], (split[0] if extra == 2 else 1)
        if heads == 1 or split[-1] == 1 or (extra == 2 and parts not in (2, 3)):
            return None
        roles = [None] * len(out_shape)
        roles[start + extra - 1], roles[start + extra] = "head", "within"
        if extra == 1:
            root = self.set_groups(root, heads, self.new_label(_base(root), "S_"))
            if root == FIXED:
                return None
            return "heads", Heads(tuple(roles), self.groups[root][1], (root,))
        if not packed_if_grouped and root in self.groups:  # grouped only through its parts, if packed
            return None
        head = self.new_label(_base(root), "S_")
        within = tuple(self.set_groups(self.new_label(f"{_base(root)}.{part}"), heads, head) for part in "qkv"[-parts:])
        self.derived[root] = ("segments", [(lab, channels // parts) for lab in within])
        roles[start] = "part"
        return "heads", Heads(tuple(roles), head, within)

    def split_heads_merging_before(self, root, cdim, in_shape, out_shape):
        """[B, h, w, C] -> [B, h * w, H, d] or [B, h * w, m, H, d]: the axes before the channel merged while it
        splits into heads (GCViT's global query, the stage's stream itself: ``q_global.reshape(B, N, heads, d)``;
        SAM2-Hiera's ``qkv(x).reshape(B, H * W, 3, heads, d)`` on [B, H, W, C]). The axes after the channel stay
        as they are."""
        prefix = lambda shape, i: torch.Size(shape[:i]).numel()
        rest = len(in_shape) - cdim - 1
        for extra in (1, 2):
            start = len(out_shape) - rest - extra - 1
            if start >= 1 and tuple(out_shape[start + extra + 1:]) == tuple(in_shape[cdim + 1:]) \
                    and prefix(out_shape, start) == prefix(in_shape, cdim) \
                    and torch.Size(out_shape[start:start + extra + 1]).numel() == in_shape[cdim]:
                break
        else:
            return None
        return self.heads_at(root, in_shape[cdim], out_shape, start, extra, packed_if_grouped=False)

    def split_heads_regrouped(self, x, out_shape):
        """The heads split while the axes before the channel are regrouped in the same reshape (Hiera's mask unit
        attention: ``qkv(x).reshape(B, -1, num_windows, 3, heads, d)`` cuts the tokens into windows): the
        channel's split as ``split_heads`` reads it, those axes plain (no role)."""
        _, cdim = self.info[x.name]
        in_shape = self.shape(x)
        lead = math.prod(in_shape[:cdim])
        start = next((k for k in range(len(out_shape) + 1) if math.prod(out_shape[:k]) == lead), None)
        if start is None or tuple(out_shape[:start]) == tuple(in_shape[:cdim]):
            return None
        found = self.split_heads(x, tuple(in_shape[:cdim]) + tuple(out_shape[start:]))
        if found is None:
            return None
        heads = found[1]
        return "heads", Heads((None,) * start + heads.roles[cdim:], heads.head, heads.within)

    def chunked(self, x, chunks, dim):
        """q, k, v = qkv.chunk(3, dim=-1): the channel label becomes segments, one per chunk."""
        label, cdim = self.info[x.name]
        shape = self.shape(x)
        root = self.find(label)
        if not isinstance(dim, int) or dim % len(shape) != cdim or not isinstance(chunks, int) or shape[cdim] % chunks \
                or root == FIXED or root in self.derived or root in self.groups:
            return None
        parts = [self.new_label(f"{_base(root)}.{i}") for i in range(chunks)]
        self.derived[root] = ("segments", [(lab, shape[cdim] // chunks) for lab in parts])
        return "tuple", [("info", (lab, cdim)) for lab in parts]

    # --- ops on Heads values -------------------------------------------------------------------------------
    def head_rule(self, node, out_shape):
        target, args, kw = node.target, node.args, node.kwargs
        x = args[0] if args and isinstance(args[0], torch.fx.Node) else None
        h = self.heads.get(x.name) if x is not None else None
        op = target if node.op in ("call_function", "call_method") else None
        if out_shape is None and (op is getattr or op in ("size", "dim", "numel")):
            return "none", None  # its shape read (CoaT's factorised attention): the labels stay
        if node.op == "call_module":
            m = self.gm.get_submodule(target)
            if h is not None and isinstance(m, nn.Conv2d):
                bias = f"{target}.bias" if m.bias is not None else None
                return self.talking_heads(h, f"{target}.weight", bias, m.weight.shape, m.groups)
            # softmax commutes with a permutation of any axis (timm's unfused attention has an nn.Softmax)
            return ("heads", h) if h is not None and isinstance(m, (nn.Identity, nn.Dropout, nn.Softmax)) else None
        if op is None:
            return None
        if op is getattr and out_shape is None:  # x.shape, x.dtype: metadata, harmless
            return "none", None
        rotary = self.rotary_rule(node, op, h, out_shape)  # rotary embeddings, grouped-query attention
        if rotary is not None:
            return rotary
        timm_kind = _timm_functions().get(op)
        if timm_kind == "mask":  # the mask of timm's unfused attention: reads only the scores' dtype and device
            return ("info", (FIXED, 0)) if out_shape is not None else ("none", None)
        if timm_kind == "add_mask":
            mask = args[1] if len(args) > 1 else kw.get("attn_mask")
            return ("heads", h) if mask is None or self.shape(mask) is None else self.head_binary(node, out_shape)
        if op in _MATMUL:
            return self.head_matmul(args[0], args[1])
        if op is torch.einsum:
            operands = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
            return self.head_einsum(args[0], list(operands), out_shape)
        if op is F.scaled_dot_product_attention:
            return self.head_sdpa(node)
        if h is None:
            return self.head_binary(node, out_shape) if op in _BINARY else None
        if op in _BINARY:
            return self.head_binary(node, out_shape)
        if op in _HEAD_PASS_FUNCTIONS or op in _HEAD_PASS_METHODS:
            return "heads", h
        if op in ("permute", torch.permute):
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else (list(args[1:]) or kw.get("dims"))
            dims = [d % len(h.roles) for d in dims]
            return "heads", replace(h, roles=tuple(h.roles[d] for d in dims))
        if op in ("transpose", torch.transpose):
            d0, d1 = (list(args[1:3]) + [kw.get("dim0"), kw.get("dim1")])[:2] if len(args) >= 3 else (kw["dim0"], kw["dim1"])
            roles = list(h.roles)
            d0, d1 = d0 % len(roles), d1 % len(roles)
            roles[d0], roles[d1] = roles[d1], roles[d0]
            return "heads", replace(h, roles=tuple(roles))
        if op in ("unbind", torch.unbind):
            dim = args[1] if len(args) > 1 else kw.get("dim", 0)
            part = h.axis("part")
            if part is None or dim % len(h.roles) != part:
                return None
            roles = h.roles[:part] + h.roles[part + 1:]
            return "tuple", [("heads", Heads(roles, h.head, (w,))) for w in h.within]
        if op is operator.getitem:
            return self.head_index(h, args[1])
        if op in ("view", "reshape", torch.reshape, "reshape_as", "view_as"):  # *_as: its shape
            return self.head_reshape(x, h, out_shape)
        if op in _HEAD_REDUCTIONS:
            return self.head_reduced(h, args[1:], kw)
        return None

    def talking_heads(self, h, key_w, key_b, weight_shape, groups):
        """A 1x1 conv across the heads of the scores [B, H, N, N] (EfficientFormerV2's talking heads): its input
        axis takes the scores' head permutation, its output heads are a new one, which the scores then carry
        (``attn @ v`` ties it to v's heads)."""
        if h.roles[1:2] != ("head",) or "within" in h.roles or groups != 1 or tuple(weight_shape[2:]) != (1, 1):
            return None
        head = self.new_label(key_w.rsplit(".", 1)[0], "S_")
        self.set_axes(key_w, [head, h.head, None, None])
        if key_b is not None:
            self.set_axes(key_b, [head])
        return "heads", Heads(h.roles, head, ())

    @staticmethod
    def head_reduced(h, rest, kw):
        """A max, mean or sum over axes that hold no role (Hiera pools q over a token stride:
        ``q.view(B, heads, windows, stride, -1, d).amax(dim=3)``): the roles of the other axes stay."""
        dims = rest[0] if rest else kw.get("dim")
        keepdim = rest[1] if len(rest) > 1 else kw.get("keepdim", False)
        dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else None
        if not dims or not isinstance(keepdim, bool) or not all(isinstance(d, int) for d in dims):
            return None
        dims = {d % len(h.roles) for d in dims}
        if any(h.roles[d] is not None for d in dims):
            return None
        return "heads", replace(h, roles=tuple(r for d, r in enumerate(h.roles) if keepdim or d not in dims))

    def head_index(self, h, index):
        """qkv[0]: an integer index on the part axis picks that projection; full slices elsewhere."""
        index = index if isinstance(index, tuple) else (index,)
        part = h.axis("part")
        if part is None or len(index) != part + 1 or not isinstance(index[part], int) or \
                any(i != slice(None) for i in index[:part]):
            return None
        return "heads", Heads(h.roles[:part] + h.roles[part + 1:], h.head, (h.within[index[part]],))

    def head_reshape(self, x, h, out_shape):
        """Merge (head, within) back into one channel axis, or reshape axes that hold no role."""
        in_shape = self.shape(x)
        hd, wd = h.axis("head"), h.axis("within")
        prefix = lambda shape, i: torch.Size(shape[:i]).numel()
        if wd is not None and hd is not None and wd == hd + 1 and len(h.within) == 1 and "part" not in h.roles:
            for i in range(len(out_shape)):
                if prefix(out_shape, i) == prefix(in_shape, hd) and out_shape[i] == in_shape[hd] * in_shape[wd]:
                    within = self.set_groups(h.within[0], in_shape[hd], h.head)
                    return "info", (within, i)
            return None
        roles = [None] * len(out_shape)
        for axis, role in enumerate(h.roles):
            if role is None:
                continue
            match = [i for i in range(len(out_shape)) if prefix(out_shape, i) == prefix(in_shape, axis)
                     and out_shape[i] == in_shape[axis]]
            if match:
                roles[match[0]] = role
            elif not self._batch_heads(in_shape, out_shape, h.roles, axis, roles, prefix):
                return None
        return "heads", replace(h, roles=tuple(roles))

    @staticmethod
    def _batch_heads(in_shape, out_shape, in_roles, axis, roles, prefix) -> bool:
        """The head axis merged into the batch axis before it (``view(B * H, T, d)``: XGLM, Bloom, DeBERTa
        compute their scores with ``bmm``), or split back out of it: the merged axis holds role
        ``batch_head:H``, whose head permutation moves the inner factor within each example."""
        role = in_roles[axis]
        if role == "head" and axis > 0 and in_roles[axis - 1] is None:
            for i in range(len(out_shape)):
                if prefix(out_shape, i) == prefix(in_shape, axis - 1) and out_shape[i] == in_shape[axis - 1] * in_shape[axis]:
                    roles[i] = f"batch_head:{in_shape[axis]}"
                    return True
        elif role.startswith("batch_head:"):
            heads = int(role.split(":")[1])
            for i in range(len(out_shape) - 1):
                if prefix(out_shape, i) == prefix(in_shape, axis) and out_shape[i + 1] == heads \
                        and out_shape[i] * heads == in_shape[axis]:
                    roles[i + 1] = "head"
                    return True
        return False

    def _role_label(self, h, role):
        return h.head if role == "head" or role and role.startswith("batch_head:") else h.within[0] if role == "within" else None

    def _tie(self, labels):
        """Axes contracted or broadcast together: their labels must be the same permutation."""
        present = [lab for lab in labels if lab is not None]
        if len(present) != len(labels):
            return False
        for lab in present[1:]:
            self.union(present[0], lab)
        return True

    def head_binary(self, node, out_shape):
        """Heads value (op) scalar / per-head parameter / mask broadcast over the heads / another Heads value."""
        tensors = [a for a in self._node_args(node)]
        nd = len(out_shape)
        base = next(self.heads[t.name] for t in tensors if t.name in self.heads)
        roles = [None] * nd
        for t in tensors:
            if t.name in self.heads:
                th = self.heads[t.name]
                if len(th.within) > 1 or th.within and base.within and not self.same_within(th.within[0], base.within[0]):
                    return None
                for axis, role in enumerate(th.roles):
                    if role == "repeat" and self.shape(t)[axis] == 1:
                        continue  # broadcast (ConViT's attn / attn.sum(-1).unsqueeze(-1)): the other's role
                    roles[axis + nd - len(th.roles)] = roles[axis + nd - len(th.roles)] or role
        for t in tensors:
            self._fix_within_table(t, roles, nd)
        for t in tensors:
            shape = self.shape(t)
            for axis, size in enumerate(shape):
                role = roles[axis + nd - len(shape)]
                if role is None:
                    continue
                if t.name in self.heads:
                    th = self.heads[t.name]
                    if th.roles[axis] != role:
                        if size != 1:
                            return None
                        continue
                    if not self._tie([self._role_label(base, role), self._role_label(th, role)]):
                        return None
                elif size != 1:
                    if role == "within" and (t.name in self.params or self.find(self.info[t.name][0]) == FIXED):
                        # a table along the head's dimensions (rotary cos/sin, a per-dimension norm weight)
                        base = self.pin_heads(base, size)
                        if base is None:
                            return None
                        continue
                    if role != "head":
                        return None
                    self.follow_heads(t, axis, base.head)  # a per-head bias (or a mask that fixes the heads)
            # a labelled tensor may only be a per-head one whose label became the head permutation: MPNet's position
            # bias (an embedding expanded over the batch: its columns move with the heads), ConViT's positional scores
            # (a Linear's output per head, mixed into the attention)
            if t.name not in self.heads and t.name not in self.params \
                    and self.find(self.info[t.name][0]) not in (FIXED, self.find(base.head)):
                return None
        return "heads", replace(base, roles=tuple(roles))

    def _fix_within_table(self, t, roles, nd):
        """A table along the heads' dimensions whose channel is a free label, broadcast over the heads (RoFormer's
        sinusoidal positions: an embedding weight in the state dict): it stays in place (the rotary pins the
        dimensions within a head anyway), so its label is fixed."""
        if t.name in self.heads or t.name in self.params or t.name not in self.info:
            return
        label, cdim = self.info[t.name]
        shape = self.shape(t)
        if shape is None or self.find(label) == FIXED or roles[cdim + nd - len(shape)] != "within":
            return
        if all(size == 1 for axis, size in enumerate(shape) if roles[axis + nd - len(shape)] not in (None, "within")):
            self.fix(label)

    def head_matmul(self, a, b):
        if not all(isinstance(t, torch.fx.Node) and t.name in self.heads for t in (a, b)):
            return None
        if len(self.shape(a)) != len(self.shape(b)):
            return None
        letters = "abcdefgh"[:len(self.heads[a.name].roles) - 2]
        return self.head_einsum(f"{letters}ij,{letters}jk->{letters}ik", [a, b], None)

    def head_einsum(self, equation, operands, out_shape):
        if not isinstance(equation, str) or not all(isinstance(t, torch.fx.Node) and t.name in self.heads for t in operands):
            return None
        equation = equation.replace(" ", "")
        if "->" not in equation or "." in equation:
            return None
        inputs, output = equation.split("->")
        inputs = inputs.split(",")
        hs = [self.heads[t.name] for t in operands]
        if len(inputs) != len(hs) or any(len(s) != len(h.roles) for s, h in zip(inputs, hs)):
            return None
        by_letter: dict[str, list] = {}
        for spec, h, t in zip(inputs, hs, operands):
            for letter, role, size in zip(spec, h.roles, self.shape(t)):
                by_letter.setdefault(letter, []).append((role, self._role_label(h, role), size))
        roles, within, head = [], (), hs[0].head
        for letter, seen in by_letter.items():
            labelled = [s for s in seen if s[0] is not None]
            if not labelled:
                continue
            if len({r for r, _, _ in labelled}) != 1 or (len(labelled) != len(seen) and any(size != 1 for _, _, size in seen)):
                return None
            self._tie([lab for _, lab, _ in labelled])
        kept = []
        for letter in output:
            role = next((r for r, _, _ in by_letter[letter] if r is not None), None)
            roles.append(role)
            if role == "within":
                kept.append(next(lab for r, lab, _ in by_letter[letter] if r == "within"))
        # A value holds one within-head label. XCiT's cross-covariance scores (q^T k: the tokens contracted) keep
        # q's and k's dimensions both: they then take one permutation (P A P^T, which softmax and A @ v follow).
        if len(kept) > 1 and not self._tie(kept):
            return None
        within = tuple(kept[:1])
        return "heads", Heads(tuple(roles), head, within)

    def head_sdpa(self, node):
        q, k, v = node.args[:3]
        if not all(isinstance(t, torch.fx.Node) and t.name in self.heads for t in (q, k, v)):
            return None
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        roles = self.heads[q.name].roles
        if "head" not in roles:
            return None
        if isinstance(mask, torch.fx.Node) and (mask.name in self.info or mask.name in self.heads):
            shape, from_right = self.shape(mask), roles.index("head") - len(roles)
            if mask.name in self.heads:
                return None
            if len(shape) >= -from_right and shape[from_right] != 1:  # a bias per head (a position bias table)
                self.follow_heads(mask, len(shape) + from_right, self.heads[q.name].head)
            elif mask.name not in self.params and self.find(self.info[mask.name][0]) != FIXED:
                return None
        letters = "abcdefgh"[:len(roles) - 2]
        scores = self.head_einsum(f"{letters}ij,{letters}kj->{letters}ik", [q, k], None)
        if scores is None:
            return None
        hv = self.heads[v.name]
        if hv.roles[:-2] != self.heads[q.name].roles[:-2] or hv.roles[-1] != "within":
            return None
        self.union(hv.head, scores[1].head)
        return "heads", hv
