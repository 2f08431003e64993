"""Permutation specs as plain data (the paper's ``axes_to_perm`` form, PyTorch layout).

A spec maps every state-dict key to one entry per tensor axis: the name of the
permutation acting on that axis, or ``None``. Weights are ``[out, in, ...]``,
so a hidden unit ``P`` of a Linear layer appears as ``["P", None]`` on its own
weight and ``[None, "P"]`` on the next layer's weight. BatchNorm running
statistics are listed like any other tensor, which is what keeps an aligned BN
model the same function.

Block-structured symmetries are described in ``perms`` (optional; a name not in it is a free permutation):

- ``{"groups": G, "group_perm": "S"}``: the ``n = G * k`` units form G contiguous groups of k; a unit moves
  only within its group, and whole groups move by the permutation ``S`` (size G), which every permutation
  naming it shares. Grouped convolutions: a ``[out, in / G, ...]`` weight lists its input permutation on the
  ``in / G`` axis; that axis is permuted, group by group, by the within-group part of the permutation.
  ``"group_perm": null`` means the groups stay in place. Attention heads fit the same form: heads = groups (``S`` permutes heads), dimensions within a head move
  within it (queries and keys share one such permutation, values another).
- ``{"segments": [["P_a", 64], [null, 3], ["P_b", 32]]}``: a derived permutation, the direct sum of its
  segments in order (``torch.cat`` along the channel axis); ``null`` is a segment that is not permuted.
- ``{"expand": "P_c", "per_unit": 49}``: a derived permutation where each unit of ``P_c`` spans ``per_unit``
  consecutive entries (a ``C x H x W`` map flattened into a Linear layer).
- ``{"reindex": "P_d", "index": [0, 4, 1, 5, ...]}``: a derived permutation acting on ``P_d``'s units in a
  fixed order: entry ``i`` of the axis is unit ``index[i]`` of ``P_d`` (ShuffleNet's channel shuffle; the
  units of ``P_d`` move as ``P_d`` says, wherever the shuffle put them).

Results are index lists per free and group permutation: ``new[..., i, ...] = old[..., perm[i], ...]``; a
block-structured permutation's list satisfies ``perm[j*k:(j+1)*k] // k == S[j]``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from matching.errors import MatchingError


@dataclass(frozen=True)
class PermutationSpec:
    axes_to_perm: dict[str, tuple[str | None, ...]]
    perms: dict[str, dict] = field(default_factory=dict)
    # symmetries the model has that the spec does not use, each with its reason (informative only)
    left_out: tuple[str, ...] = field(default=(), compare=False)
    # derived: permutation name -> [(key, axis), ...], filled in __post_init__
    perm_to_axes: dict[str, list[tuple[str, int]]] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        perm_to_axes: dict[str, list[tuple[str, int]]] = {}
        for key, axes in self.axes_to_perm.items():
            for axis, perm in enumerate(axes):
                if perm is not None:
                    perm_to_axes.setdefault(perm, []).append((key, axis))
        object.__setattr__(self, "perm_to_axes", perm_to_axes)

    def parts(self, name: str) -> list[str]:
        """Permutations a derived one is made of (itself if free)."""
        entry = self.perms.get(name, {})
        if "segments" in entry:
            return [p for seg, _ in entry["segments"] if seg is not None for p in self.parts(seg)]
        if "expand" in entry or "reindex" in entry:
            return self.parts(entry.get("expand") or entry["reindex"])
        return [name]

    @property
    def free_perms(self) -> list[str]:
        """The permutations that are solved for: named on axes or in derived ones, and group permutations."""
        names = {p for name in self.perm_to_axes for p in self.parts(name)}
        names |= {self.perms[p]["group_perm"] for p in names if self.perms.get(p, {}).get("group_perm")}
        return sorted(names)


def spec_to_json(spec: PermutationSpec) -> dict:
    out = {"axes_to_perm": {k: list(v) for k, v in spec.axes_to_perm.items()}}
    if spec.perms:
        out["perms"] = {k: dict(v) for k, v in spec.perms.items()}
    if spec.left_out:
        out["left_out"] = list(spec.left_out)
    return out


def spec_from_json(obj) -> PermutationSpec:
    """Parse ``{"axes_to_perm": {name: [perm or null, ...]}, "perms": {...optional structure...}, "left_out":
    [optional notes on symmetries the spec does not use]}``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("axes_to_perm"), dict):
        raise MatchingError('permutation_spec must be an object {"axes_to_perm": {"<param name>": ["P_0", null, ...]}}')
    axes_to_perm = {}
    for key, axes in obj["axes_to_perm"].items():
        if not isinstance(axes, list) or not all(a is None or (isinstance(a, str) and a) for a in axes):
            raise MatchingError(f"permutation_spec entry {key!r} must be a list of permutation names or null, one per axis")
        axes_to_perm[key] = tuple(axes)
    perms = obj.get("perms") or {}
    if not isinstance(perms, dict):
        raise MatchingError("permutation_spec 'perms' must be an object {name: structure}")
    clean = {}
    for name, entry in perms.items():
        clean[name] = _check_structure(name, entry)
    left_out = obj.get("left_out") or []
    if not isinstance(left_out, list) or not all(isinstance(n, str) for n in left_out):
        raise MatchingError("permutation_spec 'left_out' must be a list of strings (symmetries not used, and why)")
    spec = PermutationSpec(axes_to_perm, clean, tuple(left_out))
    for name in spec.perm_to_axes:
        _resolve(spec, name, set())
    return spec


def _check_structure(name, entry) -> dict:
    bad = MatchingError(f"permutation_spec perms[{name!r}] must be {{\"groups\": G, \"group_perm\": name}}, "
                        "{\"segments\": [[name or null, size], ...]}, {\"expand\": name, \"per_unit\": n} or "
                        "{\"reindex\": name, \"index\": [a permutation of 0..n-1]}")
    if not isinstance(entry, dict):
        raise bad
    if set(entry) == {"groups", "group_perm"}:
        if not _positive_int(entry["groups"]) or not (entry["group_perm"] is None or isinstance(entry["group_perm"], str) and entry["group_perm"]):
            raise bad
        return {"groups": int(entry["groups"]), "group_perm": entry["group_perm"]}
    if set(entry) == {"segments"} and isinstance(entry["segments"], list) and entry["segments"]:
        segments = []
        for seg in entry["segments"]:
            if not (isinstance(seg, list) and len(seg) == 2 and (seg[0] is None or isinstance(seg[0], str))
                    and _positive_int(seg[1])):
                raise bad
            segments.append([seg[0], int(seg[1])])
        return {"segments": segments}
    if set(entry) == {"expand", "per_unit"} and isinstance(entry["expand"], str) and _positive_int(entry["per_unit"]):
        return {"expand": entry["expand"], "per_unit": int(entry["per_unit"])}
    if set(entry) == {"reindex", "index"} and isinstance(entry["reindex"], str) and isinstance(entry["index"], list) \
            and all(isinstance(i, int) and not isinstance(i, bool) for i in entry["index"]) \
            and sorted(entry["index"]) == list(range(len(entry["index"]))) and entry["index"]:
        return {"reindex": entry["reindex"], "index": list(entry["index"])}
    raise bad


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _resolve(spec: PermutationSpec, name: str, seen: set) -> None:
    if name in seen:
        raise MatchingError(f"permutation_spec perms: {name!r} is defined in terms of itself")
    entry = spec.perms.get(name, {})
    for part in ([s for s, _ in entry.get("segments", []) if s] + [entry[k] for k in ("expand", "reindex") if k in entry]):
        _resolve(spec, part, seen | {name})


def perm_sizes(spec: PermutationSpec, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Size of each free (and group) permutation, checking that the spec fits the state dict shapes."""
    missing = sorted(set(spec.axes_to_perm) - set(shapes))
    extra = sorted(set(shapes) - set(spec.axes_to_perm))
    if missing:
        raise MatchingError(f"permutation_spec names tensors the checkpoint does not have: {missing[:5]}")
    if extra:
        raise MatchingError(f"permutation_spec has no entry for checkpoint tensors: {extra[:5]} (list every tensor; use null for unpermuted axes)")
    for key, axes in spec.axes_to_perm.items():
        shape = tuple(shapes[key])
        if len(axes) != len(shape):
            raise MatchingError(f"permutation_spec entry {key!r} has {len(axes)} axes but the tensor has shape {list(shape)}")
    found: dict[str, dict] = {}  # free permutation -> {(key, axis or segment): size}

    def note(name, where, size):
        entry = spec.perms.get(name, {})
        if "segments" in entry:
            total = sum(n for _, n in entry["segments"])
            if total != size:
                raise MatchingError(f"permutation {name!r} has segments of {total} units in all but acts on {where} of size {size}")
            for i, (seg, n) in enumerate(entry["segments"]):
                if seg is not None:
                    note(seg, f"{where} segment {i}", n)
        elif "expand" in entry:
            if size % entry["per_unit"]:
                raise MatchingError(f"permutation {name!r} expands units by {entry['per_unit']} but acts on {where} of size {size}")
            note(entry["expand"], f"{where} (expanded)", size // entry["per_unit"])
        elif "reindex" in entry:
            if len(entry["index"]) != size:
                raise MatchingError(f"permutation {name!r} reindexes {len(entry['index'])} units but acts on {where} of size {size}")
            note(entry["reindex"], f"{where} (reindexed)", size)
        else:
            found.setdefault(name, {})[where] = size

    candidates = _within_candidates(spec)
    for key, axes in spec.axes_to_perm.items():
        for axis, perm in enumerate(axes):
            if perm is not None and (key, axis) not in candidates:
                note(perm, f"{key}[axis {axis}]", shapes[key][axis])
    sizes: dict[str, int] = {}
    for perm, where in found.items():
        if len(set(where.values())) != 1:
            detail = ", ".join(f"{w}={n}" for w, n in list(where.items())[:6])
            raise MatchingError(f"permutation {perm!r} acts on axes of different sizes: {detail}")
        sizes[perm] = next(iter(where.values()))
    for perm in list(sizes):
        entry = spec.perms.get(perm, {})
        if "groups" in entry:
            groups, group_perm = entry["groups"], entry["group_perm"]
            if sizes[perm] % groups:
                raise MatchingError(f"permutation {perm!r} of size {sizes[perm]} cannot form {groups} equal groups")
            if group_perm is not None and sizes.setdefault(group_perm, groups) != groups:
                raise MatchingError(f"group permutation {group_perm!r} is used with different numbers of groups")
    for key, axis in sorted(candidates):
        perm, size = spec.axes_to_perm[key][axis], shapes[key][axis]
        if perm not in sizes:
            raise MatchingError(f"{key}[axis {axis}]: permutation {perm!r} acts on no full-size axis")
        if size != sizes[perm] and size * spec.perms[perm]["groups"] != sizes[perm]:
            raise MatchingError(f"{key}[axis {axis}] has size {size}, neither permutation {perm!r}'s "
                                f"{sizes[perm]} units nor one of its {spec.perms[perm]['groups']} groups")
    return sizes


def _within_candidates(spec: PermutationSpec) -> set[tuple[str, int]]:
    """Axes that may hold one group of a block-structured permutation (a grouped conv's ``in / G`` axis): a
    later axis of a tensor whose earlier axis carries the same group permutation."""
    out = set()
    for key, axes in spec.axes_to_perm.items():
        seen = set()
        for axis, perm in enumerate(axes):
            entry = spec.perms.get(perm, {}) if perm is not None else {}
            if entry.get("groups", 1) > 1:
                if entry["group_perm"] in seen:
                    out.add((key, axis))
                seen.add(entry["group_perm"])
    return out


def within_axes(spec: PermutationSpec, shapes, sizes: dict[str, int]) -> dict[tuple[str, int], int]:
    """{(key, axis): its group axis} for every axis that holds one group of its permutation."""
    out = {}
    for key, axis in _within_candidates(spec):
        perm = spec.axes_to_perm[key][axis]
        if key in shapes and shapes[key][axis] != sizes[perm]:
            group_perm = spec.perms[perm]["group_perm"]
            out[(key, axis)] = next(a for a, p in enumerate(spec.axes_to_perm[key])
                                    if p is not None and spec.perms.get(p, {}).get("group_perm") == group_perm)
    return out


def full_index(spec: PermutationSpec, perms: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The index list of any permutation named on an axis (free, or derived from segments/expansion)."""
    entry = spec.perms.get(name, {})
    if "segments" in entry:
        parts, offset = [], 0
        for seg, n in entry["segments"]:
            device = next(iter(perms.values())).device if perms else "cpu"
            parts.append((full_index(spec, perms, seg) if seg is not None else torch.arange(n, device=device)) + offset)
            offset += n
        return torch.cat(parts)
    if "expand" in entry:
        inner = full_index(spec, perms, entry["expand"])
        s = entry["per_unit"]
        return (inner[:, None] * s + torch.arange(s, device=inner.device)).reshape(-1)
    if "reindex" in entry:  # conjugate: position i holds unit index[i], which moves to where P_d puts it
        inner = full_index(spec, perms, entry["reindex"])
        index = torch.tensor(entry["index"], device=inner.device)
        return invert(index)[inner[index]]
    return perms[name]


def within_group_index(perm: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups, k]: for each new group j, the within-group part of ``perm`` (perm[j*k + i] - S[j]*k)."""
    blocks = perm.reshape(groups, -1)
    k = blocks.shape[1]
    return blocks - (blocks[:, :1] // k) * k


def apply_permutation(spec: PermutationSpec, perms: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                      except_perm: str | None = None) -> dict[str, torch.Tensor]:
    """Return ``state`` with every axis permuted: new[..., i, ...] = old[..., perm[i], ...]. The state dict's
    ``_metadata`` (module versions, as ``nn.Module.state_dict`` records them) goes with it: torchvision's MNASNet
    refuses a state dict without its version."""
    shapes = {k: tuple(v.shape) for k, v in state.items() if k in spec.axes_to_perm}
    within = within_axes(spec, shapes, {p: len(v) for p, v in perms.items()}) if spec.perms else {}
    out = OrderedDict()
    if hasattr(state, "_metadata"):
        out._metadata = state._metadata
    for key, tensor in state.items():
        out[key] = permute_tensor(spec, perms, key, tensor, within, except_perm)
    return out


def permute_tensor(spec: PermutationSpec, perms: dict[str, torch.Tensor], key: str, tensor: torch.Tensor,
                   within: dict[tuple[str, int], int], except_perm: str | None = None) -> torch.Tensor:
    """One tensor of ``apply_permutation`` (``within``: its ``within_axes``), for outputs written one at a time."""
    for axis, perm in enumerate(spec.axes_to_perm.get(key, ())):
        if perm is None or perm == except_perm or (key, axis) in within:
            continue
        tensor = torch.index_select(tensor, axis, full_index(spec, perms, perm).to(tensor.device))
    for (k, axis), group_axis in within.items():
        perm = spec.axes_to_perm[k][axis]
        if k == key and perm != except_perm:
            tensor = permute_within(tensor, axis, group_axis, perms[perm].to(tensor.device), spec.perms[perm]["groups"])
    return tensor


def permute_within(tensor: torch.Tensor, axis: int, group_axis: int, perm: torch.Tensor, groups: int) -> torch.Tensor:
    """Permute ``axis`` (one group's worth of units) by the within-group part of ``perm`` for the group that
    each position of ``group_axis`` (already permuted, in groups) belongs to."""
    t = tensor.movedim((group_axis, axis), (0, 1))
    shape = t.shape
    t = t.reshape(groups, shape[0] // groups, shape[1], -1)
    index = within_group_index(perm, groups)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
    t = torch.gather(t, 2, index).reshape(shape)
    return t.movedim((0, 1), (group_axis, axis))


def identity_perms(sizes: dict[str, int], device="cpu") -> dict[str, torch.Tensor]:
    return {p: torch.arange(n, device=device) for p, n in sizes.items()}


def random_perms(sizes: dict[str, int], generator: torch.Generator, spec: PermutationSpec | None = None) -> dict[str, torch.Tensor]:
    """Uniformly random permutations; block-structured ones (``spec.perms`` groups) respect their groups and
    share their group permutation."""
    out = {p: torch.randperm(n, generator=generator) for p, n in sorted(sizes.items())}
    for p, entry in sorted((spec.perms if spec is not None else {}).items()):
        if "groups" in entry and p in out:
            group_perm = out[entry["group_perm"]] if entry["group_perm"] else torch.arange(entry["groups"])
            k = sizes[p] // entry["groups"]
            within = torch.stack([torch.randperm(k, generator=generator) for _ in range(entry["groups"])])
            out[p] = (group_perm[:, None] * k + within).reshape(-1)
    return out


def invert(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return inverse


def matching_view(spec: PermutationSpec, states: list[dict[str, torch.Tensor]]):
    """The spec and states rewritten so that every permuted axis carries one free permutation over its full
    size: segments become slices of their own, an expanded axis becomes (units, per_unit), and an axis holding
    one group of a block-structured permutation becomes its dense block-diagonal form. What weight matching
    computes on this view equals what it would compute on the original (the zeros add nothing)."""
    shapes = {k: tuple(v.shape) for k, v in states[0].items() if k in spec.axes_to_perm}
    sizes = perm_sizes(PermutationSpec({k: v for k, v in spec.axes_to_perm.items() if k in shapes}, spec.perms), shapes)
    within = within_axes(spec, shapes, sizes)
    axes_out: dict[str, tuple] = {}
    tensors_out: list[dict] = [{} for _ in states]

    def emit(key, axes, tensors):
        for axis, perm in enumerate(axes):
            entry = spec.perms.get(perm, {}) if perm is not None else {}
            if "segments" in entry:
                start = 0
                for i, (seg, n) in enumerate(entry["segments"]):
                    emit(f"{key}#{axis}.{i}", axes[:axis] + (seg,) + axes[axis + 1:],
                         [t.narrow(axis, start, n) for t in tensors])
                    start += n
                return
            if "expand" in entry:
                s = entry["per_unit"]
                emit(key, axes[:axis] + (entry["expand"], None) + axes[axis + 1:],
                     [t.reshape(*t.shape[:axis], t.shape[axis] // s, s, *t.shape[axis + 1:]) for t in tensors])
                return
            if "reindex" in entry:  # the axis back in the inner permutation's order
                order = invert(torch.tensor(entry["index"], device=tensors[0].device))
                emit(key, axes[:axis] + (entry["reindex"],) + axes[axis + 1:], [t.index_select(axis, order) for t in tensors])
                return
        if any(axes):
            axes_out[key] = axes
            for out, t in zip(tensors_out, tensors):
                out[key] = t

    for key, axes in spec.axes_to_perm.items():
        if key not in shapes or not any(axes):
            continue
        tensors = [s[key] for s in states]
        for (k, axis), group_axis in within.items():
            if k == key:
                groups = spec.perms[axes[axis]]["groups"]
                tensors = [_block_diagonal(t, group_axis, axis, groups) for t in tensors]
        emit(key, tuple(axes), tensors)
    return PermutationSpec(axes_out, {p: e for p, e in spec.perms.items() if "groups" in e}), tensors_out


def _block_diagonal(tensor: torch.Tensor, group_axis: int, axis: int, groups: int) -> torch.Tensor:
    """[G*k_out, k_in, ...] (rows in groups) -> [G*k_out, G*k_in, ...] with group j's rows in column block j."""
    t = tensor.movedim((group_axis, axis), (0, 1))
    k_out, k_in = t.shape[0] // groups, t.shape[1]
    blocks = t.reshape(groups, k_out, k_in, *t.shape[2:])
    dense = blocks.new_zeros(groups, k_out, groups, k_in, *t.shape[2:])
    index = torch.arange(groups, device=t.device)
    dense[index, :, index] = blocks
    return dense.reshape(groups * k_out, groups * k_in, *t.shape[2:]).movedim((0, 1), (group_axis, axis))


def fix_group_perms(spec: PermutationSpec) -> PermutationSpec:
    """The same spec with every group permutation held in place (``"group_perm": null``; axes it permuted on
    their own, such as a per-head bias table, left alone): units still move within their groups. For attention,
    matching with the heads fixed, the baseline that head-aware matching is measured against."""
    held = {e["group_perm"] for e in spec.perms.values() if e.get("group_perm")}
    # whole heads expanded over their dimensions (queries and keys under rotary embeddings) are held too
    held |= {p for p, e in spec.perms.items() if e.get("expand") in held}
    axes = {k: tuple(None if p in held else p for p in v) for k, v in spec.axes_to_perm.items()}
    perms = {p: {**e, "group_perm": None} if "groups" in e else
             {"segments": [[None if s in held else s, n] for s, n in e["segments"]]} if "segments" in e else e
             for p, e in spec.perms.items() if p not in held}
    return PermutationSpec(axes, perms, spec.left_out)
