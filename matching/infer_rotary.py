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

from matching.infer_labels import FIXED

aten = torch.ops.aten
LEFT_OUT = {
    "rotary": "dimensions within a query/key head stay in place: rotary position embeddings rotate pairs of them "
              "at distinct frequencies, which only the identity keeps (whole heads still move)",
    "repeated": "dimensions within a key/value head repeated for grouped-query attention stay in place: every query "
                "head of the group would have to share their permutation, which the spec format cannot express "
                "(whole key/value heads, and query heads within their group, still move)",
}
_NEG = {torch.neg, "neg", aten.neg.default}


class RotaryRules:
    """Needs from the host: heads, info, shape, groups, derived, find, new_label, new_derived, set_groups,
    union, fix; ``Heads`` values (matching.infer_attention)."""

    def pinned(self, label, why="rotary"):
        """The pinned form of a within-head label (grouped by heads): the head permutation expanded over the
        head's dimensions; None if it cannot be pinned."""
        root = self.find(label)
        if root == FIXED:
            return None
        kind = self.derived.get(root)
        if kind is not None:
            return root if kind[0] == "expand" else None
        if root not in self.groups:
            return None
        heads, head = self.groups.pop(root)
        size = self.unit_count(root)
        if size is None or size % heads:
            self.groups[root] = (heads, head)
            return None
        self.derived[root] = ("expand", head, size // heads)
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

    def unit_count(self, root):
        """Number of units of a free label, read off a parameter axis that carries it."""
        for key, axes in self.param_axes.items():
            for axis, label in enumerate(axes):
                if label is not None and self.find(label) == root:
                    return self.param_shape(key)[axis]
        return None

    def pin_heads(self, h, why="rotary"):
        """``h`` with its within-head label pinned (one part only), or None."""
        if len(h.within) != 1:
            return None
        label = self.pinned(h.within[0], why)
        return None if label is None else replace(h, within=(label,))

    def rotary_rule(self, node, op, h, out_shape):
        """Rules for Heads values in rotary embeddings and repeat_kv; None where they do not apply."""
        args = node.args
        if op in (torch.cat, aten.cat.default) and isinstance(args[0], (list, tuple)):
            return self.heads_cat(args[0], args[1] if len(args) > 1 else node.kwargs.get("dim", 0))
        if h is None:
            return None
        x = args[0]
        if op in _NEG:
            return "heads", h
        if op == "unsqueeze" or op is torch.unsqueeze:
            dim = args[1] if len(args) > 1 else node.kwargs["dim"]
            dim %= len(h.roles) + 1
            return "heads", replace(h, roles=h.roles[:dim] + ("repeat",) + h.roles[dim:])
        if op == "expand":
            in_shape = self.shape(x)
            if all(role is None or role == "repeat" or n == m for role, n, m in zip(h.roles, in_shape, out_shape)):
                return "heads", h
            return None
        if op in ("view", "reshape", torch.reshape):
            return self.heads_merged(x, h, out_shape)
        if op is operator.getitem:
            return self.heads_sliced(x, h, args[1], out_shape)
        return None

    def heads_merged(self, x, h, out_shape):
        """(head, repeat) merged into one head axis (repeat_kv), or (head, pinned within) into the channel."""
        in_shape = self.shape(x)
        hd, wd = h.axis("head"), h.axis("within")
        prefix = lambda shape, i: math.prod(shape[:i])
        if "repeat" in h.roles and h.roles.index("repeat") == hd + 1 and len(out_shape) == len(in_shape) - 1 \
                and tuple(out_shape[:hd]) == tuple(in_shape[:hd]) and out_shape[hd] == in_shape[hd] * in_shape[hd + 1] \
                and tuple(out_shape[hd + 1:]) == tuple(in_shape[hd + 2:]):
            pinned = self.pin_heads(h, "repeated")
            if pinned is None:
                return None
            query_heads = self.set_groups(self.new_label(f"{h.head.removeprefix('S_')}.rep", "S_"), in_shape[hd], h.head)
            per_unit = self.derived[self.find(pinned.within[0])][2]
            within = self.new_derived(f"{pinned.within[0].removeprefix('P_')}.rep", ("expand", query_heads, per_unit))
            roles = h.roles[:hd + 1] + h.roles[hd + 2:]
            return "heads", replace(h, roles=roles, head=query_heads, within=(within,))
        if wd is not None and wd == hd + 1 and len(h.within) == 1 and self.derived.get(self.find(h.within[0]), ("",))[0] == "expand":
            for i in range(len(out_shape)):
                if prefix(out_shape, i) == prefix(in_shape, hd) and out_shape[i] == in_shape[hd] * in_shape[wd]:
                    return "info", (self.find(h.within[0]), i)
        return None

    def heads_sliced(self, x, h, index, out_shape):
        """A slice of the within-head axis (rotate_half's halves, a partial rotary's part): pinned."""
        index = index if isinstance(index, tuple) else (index,)
        if all(i == slice(None) for i in index):
            return "heads", h
        wd = h.axis("within")
        if wd is None or len(index) != wd + 1 or any(i != slice(None) for i in index[:wd]) \
                or not isinstance(index[wd], slice) or index[wd].step not in (None, 1):
            return None
        pinned = self.pin_heads(h)
        if pinned is None:
            return None
        return "heads", replace(pinned, within=(self.pinned_like(pinned, out_shape[wd]),))

    def pinned_like(self, h, size):
        """A pinned within-head label of ``size`` dimensions per head, moved by ``h``'s head permutation."""
        head = self.derived[self.find(h.within[0])][1]
        return self.new_derived(f"{h.within[0].removeprefix('P_')}[{size}]", ("expand", head, size))

    def heads_cat(self, tensors, dim):
        """rotate_half's ``cat((-x2, x1), -1)`` along the pinned within-head axis."""
        if not all(isinstance(t, torch.fx.Node) and t.name in self.heads for t in tensors) or not isinstance(dim, int):
            return None
        hs = [self.heads[t.name] for t in tensors]
        wd = hs[0].axis("within")
        if wd is None or dim % len(hs[0].roles) != wd or any(h.roles != hs[0].roles for h in hs):
            return None
        pinned = [self.pin_heads(h) for h in hs]
        if any(p is None for p in pinned):
            return None
        head = pinned[0].head
        for p in pinned[1:]:
            head = self.union(head, p.head)
        size = sum(self.shape(t)[wd] for t in tensors)
        return "heads", replace(pinned[0], head=head, within=(self.pinned_like(pinned[0], size),))
