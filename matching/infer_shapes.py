"""Spec-inference rules for ops that move, cut or join axes (a mixin of ``matching.infer_layers.GraphLabels``).

A channel survives a reshape when it stays its own axis or becomes the outermost factor of a merged axis (a
flattened map: each unit spans H*W entries); slices and ``chunk``/``split`` cut its label into segments;
``torch.cat`` along the channel axis joins labels into segments, along another axis ties them; a channel
split over several axes (a channel shuffle's view) is tracked as ``spread`` until it is merged back, which
reindexes its units.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx

from matching.infer_labels import FIXED


class ShapeRules:
    """Needs from the host: info, params, spread, pieces, joined, gm, current, shape, tensor_args, param_key,
    param_shape, set_axes and the LabelSet operations."""

    def reshaped(self, x, out_shape):
        """A reshape keeps the channel if it stays its own axis with the same leading elements, or becomes the
        outermost factor of a merged axis (a C x H x W map flattened: each channel spans H*W entries)."""
        label, cdim = self.info[x.name]
        in_shape = self.shape(x)
        lead = math.prod(in_shape[:cdim])
        if x.name in self.spread:
            return self.merged(x, out_shape)
        if self.find(label) == FIXED:  # nothing permuted: not a spread channel either (a linear layer after it
            return FIXED, 0  # labels its output as usual)
        if x.name in self.embedded:
            found = self.unmerged(x, out_shape)
            if found is not None:
                return found
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
                    self.embedded[self.current] = (label, i, 1, in_shape[cdim], per_unit, False)
                    return self.new_derived(f"flat_{x.name}", ("expand", label, per_unit)), i
        for i in range(len(out_shape)):  # the innermost factor of a merged axis (timm's Swin patch merging:
            for k in range(cdim):  # [.., 2, 2, C] -> [.., 4C]): a segment per copy, each permuted by the channel's
                if math.prod(out_shape[:i]) == math.prod(in_shape[:k]) and out_shape[i] == math.prod(in_shape[k:cdim + 1]):
                    if self.find(label) == FIXED:
                        return FIXED, 0
                    copies = math.prod(in_shape[k:cdim])
                    if copies == 1:
                        return label, i
                    self.embedded[self.current] = (label, i, copies, in_shape[cdim], 1, False)
                    return self.new_derived(f"tile_{x.name}", ("segments", [(label, in_shape[cdim])] * copies)), i
        for i in range(len(out_shape)):  # the channel split over several axes (a channel shuffle's view)
            for j in range(i + 2, len(out_shape) + 1):
                if math.prod(out_shape[:i]) == lead and math.prod(out_shape[i:j]) == in_shape[cdim] and out_shape[i] > 1:
                    self.spread[self.current] = (i, torch.arange(in_shape[cdim]).reshape(out_shape[i:j]))
                    return label, i
        return self.merged_into(label, in_shape, cdim, out_shape) or (self.fix(label), 0)

    def merged(self, x, out_shape):
        """A channel spread over axes (``spread``) merged back into one axis: its units in their new order."""
        label, first = self.info[x.name]
        units = self.spread[x.name][1]
        lead = math.prod(self.shape(x)[:first])
        for i in range(len(out_shape)):
            if math.prod(out_shape[:i]) == lead and out_shape[i] == units.numel():
                return self.reindexed(label, units.reshape(-1).tolist()), i
        return self.fix(label), 0

    @staticmethod
    def located(in_shape, axis, outer, channels, inner, out_shape):
        """Where a channel that is ``outer`` x C x ``inner`` of ``in_shape[axis]`` (C its own axis when both are 1)
        lands in a reshape to ``out_shape``, read off the entries in row-major order: (axis, outer, inner) when
        the channel's C units stay one factor of one axis, else None (the channel is cut)."""
        before = math.prod(in_shape[:axis]) * outer  # entries of the axes and factors before the channel
        lead = 1
        for i, size in enumerate(out_shape):
            if before % lead:
                return None
            span = lead * size
            if span % (before * channels) == 0:
                return i, before // lead, span // (before * channels)
            lead = span
        return None

    def merged_into(self, label, in_shape, cdim, out_shape):
        """The channel becomes a middle factor of an axis that merges it with others (MobileViT unfolds patches
        with ``[B, C, H, W] -> [B * C * n_h, p_h, n_w, p_w]``: the channels merged into the batch axis). That
        axis is no channel axis: only ops that move entries (reshape, permute, contiguous) may follow, until a
        reshape makes the channel its own axis again (``unmerged``; the fold back to ``[B, C, H, W]``)."""
        channels = in_shape[cdim]
        where = self.located(in_shape, cdim, 1, 1, 1, out_shape) if channels > 1 else None
        if where is None:
            return None
        if self.find(label) == FIXED:
            return FIXED, 0
        axis, outer, inner = where
        self.embedded[self.current] = (label, axis, outer, channels, inner, True)
        return label, axis

    def unmerged(self, x, out_shape):
        """A reshape of a value whose channel is a factor of a merged axis (``embedded``): the channel's own
        label where it is its own axis again; still merged, it stays tracked. A flattened map or a tile
        (recorded too, not ``general``) that is not restored returns None: the other rules read its label."""
        label, axis, outer, channels, inner, general = self.embedded[x.name]
        where = self.located(self.shape(x), axis, outer, channels, inner, out_shape)
        if where is not None and where[1:] == (1, 1):
            return self.find(label), where[0]
        if not general:
            return None
        if where is None or self.find(label) == FIXED:
            return self.fix(label), 0
        self.embedded[self.current] = (label, where[0], where[1], channels, where[2], True)
        return label, where[0]

    def embedded_visit(self, node, out_shape):
        """Ops on a value whose channel is merged into another axis (``embedded``): reshapes, permutes and copies
        move it along; anything else fixes it (its axis is not a channel axis). A flattened map or a tile is
        handed to the other rules unless a reshape restores its channel. True if handled."""
        inside = [a for a in self.tensor_args(node) if a.name in self.embedded]
        if not inside or node.op == "output":
            return False
        general = any(self.embedded[a.name][5] for a in inside)
        if out_shape is None:  # metadata reads are harmless; anything else (a split) is not followed
            if general and not (node.op == "call_function" and node.target in (getattr, torch._assert)
                                or node.op == "call_method" and node.target in ("size", "dim", "numel")):
                self.fix_all(node)
                return True
            return False
        x = node.args[0] if node.args else None
        method, function = node.op == "call_method", node.op == "call_function"
        result = None
        if len(inside) == 1 and x is inside[0] and len(self.tensor_args(node)) == 1:
            record = self.embedded[x.name]
            if method and node.target in ("contiguous", "clone", "detach"):
                self.embedded[node.name] = record
                result = self.info[x.name]
            elif method and node.target in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "reshape_as", "view_as") \
                    or function and node.target in (torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze):
                result = self.reshaped(x, out_shape) if general else self.unmerged(x, out_shape)
            elif method and node.target in ("permute", "transpose", "swapaxes", "swapdims") or \
                    function and node.target in (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims):
                result = self.permuted(x, node.target if method else node.target.__name__, node.args[1:], node.kwargs)
                if result is not None:
                    self.embedded[node.name] = (record[0], result[1], *record[2:])
        if result is None:
            if not general:
                return False
            self.fix_all(node)
            result = (FIXED, 0)
        self.info[node.name] = result
        return True

    def over_copies(self, node, spread):
        """Selective kernel and split attention: ``attn.view(B, paths, C, 1, 1)``, then a softmax or a sum over the
        paths axis, or a product with the stacked paths. Each path's C units are one channel: all take one
        permutation."""
        name = getattr(node.target, "__name__", node.target) if node.op != "call_module" else None
        if name in ("mul", "add", "sub", "truediv", "div"):
            return True
        if name not in ("softmax", "log_softmax", "sum", "mean") or len(spread) != 1 or node.args[0] is not spread[0]:
            return False
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else [None]
        first, units = self.spread[spread[0].name]
        nd = len(self.shape(spread[0]))
        return units.dim() == 2 and all(isinstance(d, int) and d % nd == first for d in dims)

    def tiled(self, x):
        """A channel spread as [copies, C] in its units' order becomes a tile: segments of one label, whose C
        units are the tensor's channel on the inner axis (the outer axis stays in place)."""
        label, first = self.info[x.name]
        units = self.spread[x.name][1]
        if units.dim() != 2 or not torch.equal(units.reshape(-1), torch.arange(units.numel())):
            return False
        copies, channels = units.shape
        root = self.find(label)
        kind = self.derived.get(root)
        if root == FIXED:
            inner = FIXED
        elif kind is None and self.groups.get(root, (copies,))[0] == copies:
            if root in self.groups:  # a copy per group (split attention's grouped conv, radix groups): they stay
                self.fix(self.groups[root][1])  # put, and the conv's input, whose groups a spec locates through the
                for out, inp in self.grouped:  # output's, cannot move within them
                    if self.find(out) == root:
                        self.fix(inp)
            inner = self.new_label(f"{root}.tile")
            self.derived[root] = ("segments", [(inner, channels)] * copies)
        elif kind is not None and kind[0] == "segments" and len(kind[1]) == copies and \
                len({(self.find(lab), n) for lab, n in kind[1]}) == 1 and kind[1][0][1] == channels:
            inner = kind[1][0][0]  # already a tile (the softmax over the paths of a flattened attention)
        else:
            return False
        del self.spread[x.name]
        self.info[x.name] = (self.find(inner), first + 1)
        return True

    def stacked(self, tensors, dim, out_shape):
        """torch.stack of tensors with the same channel axis: one permutation for all; the new axis stays in place."""
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or not all(
                isinstance(t, torch.fx.Node) and t.name in self.info and t.name not in self.params for t in tensors):
            return None
        cdims = {self.info[t.name][1] for t in tensors}
        if len(cdims) != 1:
            return None
        cdim = cdims.pop()
        label = self.info[tensors[0].name][0]
        for t in tensors[1:]:
            label = self.union(label, self.info[t.name][0])
        return self.find(label), cdim + (dim % len(out_shape) <= cdim)

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
        """The ops a channel spread over several axes goes through in a channel shuffle; an op that treats the outer
        axis as copies of the channel (attention over branches) makes it a tile; anything else fixes it."""
        spread = [a for a in self.tensor_args(node) if a.name in self.spread]
        if self.over_copies(node, spread) and all(self.tiled(a) for a in spread):
            return self.rule(node, out_shape)
        if x is None or x.name not in self.spread or sum(a.name in self.spread for a in self.tensor_args(node)) > 1:
            return None
        method, function = node.op == "call_method", node.op == "call_function"
        if method and node.target in ("contiguous", "clone"):
            self.spread[node.name] = self.spread[x.name]
            return self.info[x.name]
        if method and node.target in ("view", "reshape", "flatten") or function and node.target in (torch.reshape, torch.flatten):
            return self.reshaped(x, out_shape)
        if method and node.target in ("permute", "transpose") or function and node.target in (torch.permute, torch.transpose):
            moved = self.permuted(x, node.target if method else node.target.__name__, node.args[1:], node.kwargs)
            if moved is None and self.tiled(x):  # timm's RadixSoftmax: [B, 1, radix, C] -> [B, radix, 1, C]
                return self.rule(node, out_shape)
            return moved
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
        if cdim in dims:  # a statistic over the channels (RMSNorm's mean of squares): the same whatever their order
            return FIXED, 0
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
