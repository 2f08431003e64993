"""Permutation specs as plain data (the paper's ``axes_to_perm`` form, PyTorch layout).

A spec maps every state-dict key to one entry per tensor axis: the name of the
permutation acting on that axis, or ``None``. Weights are ``[out, in, ...]``,
so a hidden unit ``P`` of a Linear layer appears as ``["P", None]`` on its own
weight and ``[None, "P"]`` on the next layer's weight. BatchNorm running
statistics are listed like any other tensor, which is what keeps an aligned BN
model the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from matching.errors import MatchingError


@dataclass(frozen=True)
class PermutationSpec:
    axes_to_perm: dict[str, tuple[str | None, ...]]
    # derived: permutation name -> [(key, axis), ...], filled in __post_init__
    perm_to_axes: dict[str, list[tuple[str, int]]] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        perm_to_axes: dict[str, list[tuple[str, int]]] = {}
        for key, axes in self.axes_to_perm.items():
            for axis, perm in enumerate(axes):
                if perm is not None:
                    perm_to_axes.setdefault(perm, []).append((key, axis))
        object.__setattr__(self, "perm_to_axes", perm_to_axes)


def spec_to_json(spec: PermutationSpec) -> dict:
    return {"axes_to_perm": {k: list(v) for k, v in spec.axes_to_perm.items()}}


def spec_from_json(obj) -> PermutationSpec:
    """Parse the CONTRACT form ``{"axes_to_perm": {name: [perm or null, ...]}}``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("axes_to_perm"), dict):
        raise MatchingError('permutation_spec must be an object {"axes_to_perm": {"<param name>": ["P_0", null, ...]}}')
    axes_to_perm = {}
    for key, axes in obj["axes_to_perm"].items():
        if not isinstance(axes, list) or not all(a is None or (isinstance(a, str) and a) for a in axes):
            raise MatchingError(f"permutation_spec entry {key!r} must be a list of permutation names or null, one per axis")
        axes_to_perm[key] = tuple(axes)
    return PermutationSpec(axes_to_perm)


def perm_sizes(spec: PermutationSpec, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Size of each permutation, checking that the spec fits the state dict shapes."""
    missing = sorted(set(spec.axes_to_perm) - set(shapes))
    extra = sorted(set(shapes) - set(spec.axes_to_perm))
    if missing:
        raise MatchingError(f"permutation_spec names tensors the checkpoint does not have: {missing[:5]}")
    if extra:
        raise MatchingError(f"permutation_spec has no entry for checkpoint tensors: {extra[:5]} (list every tensor; use null for unpermuted axes)")
    sizes: dict[str, int] = {}
    for key, axes in spec.axes_to_perm.items():
        shape = tuple(shapes[key])
        if len(axes) != len(shape):
            raise MatchingError(f"permutation_spec entry {key!r} has {len(axes)} axes but the tensor has shape {list(shape)}")
    for perm, where in spec.perm_to_axes.items():
        found = {(k, a): shapes[k][a] for k, a in where}
        if len(set(found.values())) != 1:
            detail = ", ".join(f"{k}[axis {a}]={n}" for (k, a), n in list(found.items())[:6])
            raise MatchingError(f"permutation {perm!r} acts on axes of different sizes: {detail}")
        sizes[perm] = next(iter(found.values()))
    return sizes


def apply_permutation(spec: PermutationSpec, perms: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                      except_perm: str | None = None) -> dict[str, torch.Tensor]:
    """Return ``state`` with every axis permuted: new[..., i, ...] = old[..., perm[i], ...]."""
    out = {}
    for key, tensor in state.items():
        for axis, perm in enumerate(spec.axes_to_perm.get(key, ())):
            if perm is not None and perm != except_perm:
                tensor = torch.index_select(tensor, axis, perms[perm].to(tensor.device))
        out[key] = tensor
    return out


def identity_perms(sizes: dict[str, int], device="cpu") -> dict[str, torch.Tensor]:
    return {p: torch.arange(n, device=device) for p, n in sizes.items()}


def random_perms(sizes: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {p: torch.randperm(n, generator=generator) for p, n in sorted(sizes.items())}


def invert(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return inverse
