"""Channel labels: a union-find over the hidden-unit permutations of a graph, with the structure of each.

A label names the permutation a tensor's channel axis is in. Labels are tied (``union``) where two tensors must
move together, and fixed where something the rules do not understand touches them: an unknown op costs a
permutation, never correctness. Structure that a plain permutation cannot express is kept as such (see
matching.spec): a label may move in groups (grouped convolutions, GroupNorm, attention heads), or be derived from
others: segments (``torch.cat``, slices), an expansion (a ``C x H x W`` map flattened into a Linear layer), or a
reindexing (a channel shuffle). ``resolve_spec`` turns the labels that survived into a PermutationSpec.
"""

from __future__ import annotations

from matching.spec import PermutationSpec

FIXED = "<fixed>"


class LabelSet:
    """Union-find over channel labels, with the structure of each (groups, segments, expansion, reindexing)."""

    def __init__(self):
        self.parent: dict[str, str] = {FIXED: FIXED}
        self.order: dict[str, int] = {FIXED: -1}
        self.groups: dict[str, tuple[int, str]] = {}  # root label -> (number of groups, group-permutation label)
        # label -> ("segments", [(label, size)]) | ("expand", label, per_unit) | ("reindex", label, index)
        self.derived: dict[str, tuple] = {}
        self.param_axes: dict[str, list[str | None]] = {}  # state key -> label of each axis
        self.grouped: list[tuple[str, str]] = []  # (output, input) labels of grouped convolutions
        self.left_out: dict[str, str] = {}  # symmetries the rules leave out on purpose: kind -> why
        # state key -> [(other key, its axis, its ndim)]: parameters that move with the key's axis 0 (a standardised
        # weight's gain, see matching.infer_params)
        self.companions: dict[str, list[tuple[str, int, int]]] = {}

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
        if root in self.groups:  # units that stay in place keep their groups in place: what moves them cannot
            self.fix(self.groups[root][1])
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
        if (ra in self.derived) != (rb in self.derived) and FIXED not in (ra, rb):
            # a free label tied to a derived one (an SE gate's expand conv multiplying a concatenation) is that
            # derived permutation: it carries no structure of its own that could disagree
            derived, free = (ra, rb) if ra in self.derived else (rb, ra)
            if free not in self.groups and not self.made_of(derived, free):
                self.parent[free] = derived
                return derived
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

    def made_of(self, root, label):
        """Whether ``label``'s root is one of the parts ``root`` is derived from, at any depth."""
        kind = self.derived.get(root)
        if kind is None:
            return False
        parts = [lab for lab, _ in kind[1]] if kind[0] == "segments" else [kind[1]]
        return any(self.find(part) == self.find(label) or self.made_of(self.find(part), label) for part in parts)

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

    def set_axes(self, key, labels):
        if key in self.param_axes:  # a tensor used twice: tie what it sees
            labels = [self.union(a, b) if a and b else (a or b) for a, b in zip(self.param_axes[key], labels)]
        self.param_axes[key] = list(labels)
        for other, axis, ndim in self.companions.get(key, ()):
            self.set_axes(other, [labels[0] if d == axis else None for d in range(ndim)])


def resolve_spec(labels: LabelSet, state: dict) -> PermutationSpec:
    """Named permutations and their structure from the labels that were not fixed."""
    perms: dict[str, dict] = {}
    changed = True
    while changed:  # a grouped conv's input groups are located through its output's
        changed = False
        for out, inp in labels.grouped:
            if labels.find(out) == FIXED and labels.find(inp) != FIXED:
                labels.fix(inp)
                changed = True
        for label, (_, group_label) in list(labels.groups.items()):  # units that cannot move: nor can their groups
            if labels.find(label) == FIXED and labels.find(group_label) != FIXED:
                labels.fix(group_label)
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
    return PermutationSpec(axes_to_perm, {p: v for p, v in perms.items() if p in reachable},
                           tuple(labels.left_out[kind] for kind in sorted(labels.left_out)))
