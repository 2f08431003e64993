"""Rotary position embeddings and grouped-query attention (a mixin of ``matching.infer_attention``'s rules).

Rotary embeddings rotate pairs of dimensions within a head by angles that depend on the position and on the
pair's frequency: ``q * cos + rotate_half(q) * sin`` with tables that vary along the within-head axis. A
permutation of the within-head dimensions would have to keep every pair and its frequency, and with distinct
frequencies only the identity does; so the dimensions of the queries and keys stay in place ("pinned") and
whole heads still move. A pinned within-head label is the head permutation expanded over the head's
dimensions (``{"expand": S, "per_unit": d}``): slices, ``neg`` and ``cat`` along the pinned axis (rotate_half)
are then harmless.

Grouped-query attention repeats each key/value head for ``n_rep`` query heads (``repeat_kv``: unsqueeze,
expand, reshape). A query head may then move only within its key/value group and the groups move together:
the query heads' permutation is block-structured (``{"groups": H_kv, "group_perm": S_kv}``), S_kv being the
key/value heads' permutation. The value dimensions are pinned as well where they are repeated (their
permutation would have to be shared by every query head of a group, which the spec format cannot say).
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace

import torch
import torch.fx
import torch.nn.functional as F

from matching.infer_labels import FIXED

aten = torch.ops.aten
LEFT_OUT = {
    "rotary": "dimensions within a query/key head stay in place: rotary position embeddings rotate pairs of them "
              "at distinct frequencies, which only the identity keeps (whole heads still move)",
    "repeated": "dimensions within a key/value head repeated for grouped-query attention stay in place: every query "
                "head of the group would have to share their permutation, which the spec format cannot express "
                "(whole key/value heads, and query heads within their group, still move)",
    "head norm": "dimensions within a query/key head stay in place: a layer norm over each head's dimensions "
                 "(Persimmon's q/k norm) has one weight for all heads (whole heads still move)",
}
_NEG = {torch.neg, "neg", aten.neg.default, operator.neg}  # operator.neg: `-x` traced by torch.fx
_ELEMENTWISE = {aten.pow.Tensor_Scalar, aten.rsqrt.default, torch.pow, torch.rsqrt, "pow", "rsqrt", torch.tanh, "tanh"}


class RotaryRules:
    """Needs from the host: heads, info, shape, groups, derived, find, new_label, new_derived, set_groups,
    union, fix; ``Heads`` values (matching.infer_attention)."""

    def pinned(self, label, per_unit, why="rotary"):
        """The pinned form of a within-head label (grouped by heads, ``per_unit`` dimensions each): the head
        permutation expanded over the head's dimensions; None if it cannot be pinned."""
        root = self.find(label)
        if root == FIXED:
            return None
        kind = self.derived.get(root)
        if kind is not None:
            return root if kind[0] == "expand" else None
        if root not in self.groups:
            return None
        _, head = self.groups.pop(root)
        self.derived[root] = ("expand", head, per_unit)
        self.left_out[why] = LEFT_OUT[why]
        return root

    def same_within(self, a, b):
        """Whether two within-head labels are one permutation (two pinned ones are tied: their heads move as one)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        kinds = [self.derived.get(r, ("",)) for r in (ra, rb)]
        if kinds[0][0] == kinds[1][0] == "expand" and kinds[0][2] == kinds[1][2]:
            self.union(*sorted((ra, rb), key=self.order.get))  # the older label names them
            return True
        return False

    def pin_heads(self, h, per_unit, why="rotary"):
        """``h`` with its within-head label pinned (one part only), or None."""
        if len(h.within) != 1:
            return None
        label = self.pinned(h.within[0], per_unit, why)
        return None if label is None else replace(h, within=(label,))

    def rotary_rule(self, node, op, h, out_shape):
        """Rules for Heads values in rotary embeddings and repeat_kv; None where they do not apply."""
        args = node.args
        if op in (torch.cat, aten.cat.default) and isinstance(args[0], (list, tuple)):
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return self.heads_cat_other_axis(args[0], dim) or self.heads_cat(args[0], dim)
        if op is torch.where:  # masking the scores: where(mask, scores, -inf)
            return self.head_binary(node, out_shape) if any(a.name in self.heads for a in self._node_args(node)) else None
        if op is torch.stack and isinstance(args[0], (list, tuple)):
            return self.heads_stacked(args[0], args[1] if len(args) > 1 else node.kwargs.get("dim", 0))
        if h is None:
            return None
        x = args[0]
        if op is F.layer_norm and isinstance(args[1], (list, tuple)) and len(args[1]) == 1 \
                and h.axis("within") == len(h.roles) - 1:  # over each head's dimensions: the heads still move
            pinned = self.pin_heads(h, args[1][0], "head norm")
            return None if pinned is None else ("heads", pinned)
        if op in _NEG or op in _ELEMENTWISE and all(not isinstance(a, torch.fx.Node) for a in args[1:]):
            return "heads", h
        if op in ("mean", torch.mean) and len(args) > 1:  # a norm's statistics over the head's dimensions
            wd, dims = h.axis("within"), args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
            if wd is not None and keep is True and [d % len(h.roles) for d in dims] == [wd]:
                return "heads", replace(h, roles=h.roles[:wd] + (None,) + h.roles[wd + 1:], within=())
        if op == "unsqueeze" or op is torch.unsqueeze:
            dim = args[1] if len(args) > 1 else node.kwargs["dim"]
            dim %= len(h.roles) + 1
            return "heads", replace(h, roles=h.roles[:dim] + ("repeat",) + h.roles[dim:])
        if op == "expand":
            in_shape = self.shape(x)
            if all(role is None or role == "repeat" or n == m for role, n, m in zip(h.roles, in_shape, out_shape)):
                return "heads", h
            return None
        if op in ("view", "reshape", torch.reshape, "flatten", torch.flatten, "reshape_as", "view_as"):
            return self.heads_merged(x, h, out_shape)
        if op is operator.getitem:
            index = self.full_index(args[1], len(h.roles))
            return self.heads_sliced_other_axes(h, index) or self.heads_sliced(x, h, index, out_shape)
        if op in ("chunk", torch.chunk, "split", torch.split):
            return self.heads_chunked(node, x, h)
        return None

    def split_heads_per_head(self, x, out_shape):
        """Bloom's and Persimmon's fused projection viewed as [.., H, m, d] (q, k, v of each head side by side):
        the reindexed segments [q; k; v] of ``m`` within-head labels that share the head permutation."""
        label, cdim = self.info[x.name]
        in_shape, root = self.shape(x), self.find(label)
        if root == FIXED or root in self.derived or root in self.groups or len(out_shape) != len(in_shape) + 2 \
                or tuple(out_shape[:cdim]) != tuple(in_shape[:cdim]) or tuple(out_shape[cdim + 3:]) != tuple(in_shape[cdim + 1:]):
            return None
        from matching.infer_attention import Heads  # (that module builds on this one)

        heads, m, d = out_shape[cdim:cdim + 3]
        if m not in (2, 3) or heads == 1 or d == 1:
            return None
        head = self.new_label(root.removeprefix("P_"), "S_")
        self.derived[root] = self.interleaved(root, heads, head, [d] * m)
        roles = [None] * len(out_shape)
        roles[cdim:cdim + 3] = "head", "part", "within"
        return "heads", Heads(tuple(roles), head, tuple(lab for lab, _ in self.derived[self.derived[root][1]][1]))

    def interleaved(self, root, heads, head, sizes):
        """("reindex", [part 0; ...; part m-1], index) for units laid out head by head, parts side by side, part j
        holding ``sizes[j]`` dimensions of each head (LeViT splits each head into q, k, v of d, d and 2d)."""
        labels = [self.set_groups(self.new_label(f"{root.removeprefix('P_')}.{i}"), heads, head) for i in range(len(sizes))]
        stacked = self.new_derived(f"{root.removeprefix('P_')}.parts", ("segments", [(lab, heads * d) for lab, d in zip(labels, sizes)]))
        starts = [heads * sum(sizes[:j]) for j in range(len(sizes))]
        return "reindex", stacked, [starts[j] + g * d + t for g in range(heads) for j, d in enumerate(sizes) for t in range(d)]

    def heads_chunked(self, node, x, h):
        """GPT-NeoX's fused projection viewed as [.., H, 3 * d] and chunked into q, k, v along the head's axis:
        its units are interleaved per head (q_0 k_0 v_0 q_1 ...), the reindexed segments [q; k; v] of three
        within-head labels that share the head permutation (q and k's are tied by the scores later). The parts
        may differ in size (LeViT: ``view(B, N, H, -1).split([d, d, 2d], dim=3)``)."""
        wd, parts = h.axis("within"), node.meta.get("tensor_meta")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        root = self.find(h.within[0]) if len(h.within) == 1 else FIXED
        if wd is None or not isinstance(dim, int) or dim % len(h.roles) != wd or not isinstance(parts, (tuple, list)) \
                or root == FIXED or root not in self.groups:
            return None
        heads, head = self.groups.pop(root)
        self.derived[root] = self.interleaved(root, heads, head, [p.shape[wd] for p in parts])
        labels = [lab for lab, _ in self.derived[self.derived[root][1]][1]]
        return "tuple", [("heads", replace(h, within=(lab,))) for lab in labels]

    def heads_merged(self, x, h, out_shape):
        """(head, repeat) merged into one head axis (repeat_kv), or (head, pinned within) into the channel."""
        in_shape = self.shape(x)
        hd, wd = h.axis("head"), h.axis("within")
        prefix = lambda shape, i: math.prod(shape[:i])
        if hd is not None and "repeat" in h.roles and h.roles.index("repeat") == hd + 1 and len(out_shape) == len(in_shape) - 1 \
                and tuple(out_shape[:hd]) == tuple(in_shape[:hd]) and out_shape[hd] == in_shape[hd] * in_shape[hd + 1] \
                and tuple(out_shape[hd + 1:]) == tuple(in_shape[hd + 2:]):
            pinned = self.pin_heads(h, in_shape[wd], "repeated")
            if pinned is None:
                return None
            query_heads = self.set_groups(self.new_label(f"{h.head.removeprefix('S_')}.rep", "S_"), in_shape[hd], h.head)
            per_unit = self.derived[self.find(pinned.within[0])][2]
            within = self.new_derived(f"{pinned.within[0].removeprefix('P_')}.rep", ("expand", query_heads, per_unit))
            roles = h.roles[:hd + 1] + h.roles[hd + 2:]
            return "heads", replace(h, roles=roles, head=query_heads, within=(within,))
        if wd is not None and wd + 1 < len(in_shape) and h.roles[wd + 1] is None and len(out_shape) == len(in_shape) - 1 \
                and tuple(out_shape[:wd]) == tuple(in_shape[:wd]) and out_shape[wd] == in_shape[wd] * in_shape[wd + 1] \
                and self.derived.get(self.find(h.within[0]), ("",))[0] == "expand":  # GPT-J's interleaved pairs merged
            return "heads", replace(h, roles=h.roles[:wd + 1] + h.roles[wd + 2:],
                                    within=(self.pinned_like(h, out_shape[wd]),))
        if wd is not None and hd is not None and wd == hd + 1 and len(h.within) == 1 and self.derived.get(self.find(h.within[0]), ("",))[0] == "expand":
            for i in range(len(out_shape)):
                if prefix(out_shape, i) == prefix(in_shape, hd) and out_shape[i] == in_shape[hd] * in_shape[wd]:
                    return "info", (self.find(h.within[0]), i)
        return None

    @staticmethod
    def full_index(index, ndim):
        """``index`` as a tuple with an Ellipsis spelled out as full slices (``x[..., ::2]``)."""
        index = index if isinstance(index, tuple) else (index,)
        if sum(i is Ellipsis for i in index) == 1:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1:]
        return index

    def heads_sliced_other_axes(self, h, index):
        """Slices of axes that hold no role (EVA's ``q[:, :, :npt, :]``: the prefix tokens kept out of the
        rotary): the roles stay."""
        if len(index) > len(h.roles) or not all(isinstance(i, slice) for i in index) \
                or any(i != slice(None) for i, role in zip(index, h.roles) if role is not None) \
                or all(i == slice(None) for i in index):
            return None
        return "heads", h

    def heads_cat_other_axis(self, tensors, dim):
        """Heads values joined along an axis that holds no role (EVA's prefix tokens and rotated tokens of one q):
        their head and within-head labels are one."""
        if not all(isinstance(t, torch.fx.Node) and t.name in self.heads for t in tensors) or not isinstance(dim, int):
            return None
        hs = [self.heads[t.name] for t in tensors]
        dim %= len(hs[0].roles)
        if hs[0].roles[dim] is not None or any(h.roles != hs[0].roles or len(h.within) != 1 for h in hs):
            return None
        for h in hs[1:]:
            if not self.same_within(hs[0].within[0], h.within[0]):
                return None
            self.union(hs[0].head, h.head)
        return "heads", replace(hs[0], head=self.find(hs[0].head), within=(self.find(hs[0].within[0]),))

    def heads_sliced(self, x, h, index, out_shape):
        """A slice of the within-head axis (rotate_half's halves, a partial rotary's part): pinned."""
        index = index if isinstance(index, tuple) else (index,)
        if all(i == slice(None) for i in index):
            return "heads", h
        wd = h.axis("within")
        if wd is None or len(index) != wd + 1 or any(i != slice(None) for i in index[:wd]) \
                or not isinstance(index[wd], slice):
            return None
        pinned = self.pin_heads(h, self.shape(x)[wd])
        if pinned is None:
            return None
        return "heads", replace(pinned, within=(self.pinned_like(pinned, out_shape[wd]),))

    def pinned_like(self, h, size):
        """A pinned within-head label of ``size`` dimensions per head, moved by ``h``'s head permutation."""
        head = self.derived[self.find(h.within[0])][1]
        return self.new_derived(f"{h.within[0].removeprefix('P_')}[{size}]", ("expand", head, size))

    def heads_stacked(self, tensors, dim):
        """GPT-J's rotate_every_two: ``stack((-x2, x1), -1)`` of pinned halves, then flattened into the head's axis."""
        if not all(isinstance(t, torch.fx.Node) and t.name in self.heads for t in tensors) or not isinstance(dim, int):
            return None
        hs = [self.heads[t.name] for t in tensors]
        wd = hs[0].axis("within")
        dim %= len(hs[0].roles) + 1
        if wd is None or dim != wd + 1 or any(h.roles != hs[0].roles for h in hs):
            return None
        pinned = [self.pin_heads(h, self.shape(t)[wd]) for h, t in zip(hs, tensors)]
        if any(p is None for p in pinned):
            return None
        head = pinned[0].head
        for p in pinned[1:]:
            head = self.union(head, p.head)
        return "heads", replace(pinned[0], head=head, roles=hs[0].roles[:dim] + (None,) + hs[0].roles[dim:])

    def heads_cat(self, tensors, dim):
        """rotate_half's ``cat((-x2, x1), -1)`` along the pinned within-head axis."""
        if not all(isinstance(t, torch.fx.Node) and t.name in self.heads for t in tensors) or not isinstance(dim, int):
            return None
        hs = [self.heads[t.name] for t in tensors]
        wd = hs[0].axis("within")
        if wd is None or dim % len(hs[0].roles) != wd or any(h.roles != hs[0].roles for h in hs):
            return None
        pinned = [self.pin_heads(h, self.shape(t)[wd]) for h, t in zip(hs, tensors)]
        if any(p is None for p in pinned):
            return None
        head = pinned[0].head
        for p in pinned[1:]:
            head = self.union(head, p.head)
        size = sum(self.shape(t)[wd] for t in tensors)
        return "heads", replace(pinned[0], head=head, within=(self.pinned_like(pinned[0], size),))
