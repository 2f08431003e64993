"""Weight matching (the paper's Algorithm 1) and the linear assignment solver it uses."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from matching.spec import PermutationSpec, identity_perms, perm_sizes

try:  # optional: lapx's Jonker-Volgenant is faster on the structured cost matrices of trained models
    import lap as _lapx
except ImportError:  # pragma: no cover - scipy fallback
    _lapx = None


def solve_lap(cost: torch.Tensor, solver: str = "auto") -> torch.Tensor:
    """argmax_perm sum_i cost[i, perm[i]] as an index tensor (on cost's device)."""
    c = cost.detach().to("cpu", torch.float64).numpy()
    if solver == "lapx" or (solver == "auto" and _lapx is not None):
        _, cols, _ = _lapx.lapjv(-c, extend_cost=False)
    else:
        _, cols = linear_sum_assignment(c, maximize=True)
    return torch.as_tensor(np.asarray(cols, dtype=np.int64), device=cost.device)


def _as_matrix(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)


def permuted_except(spec: PermutationSpec, perms, key: str, tensor: torch.Tensor, skip_axis: int) -> torch.Tensor:
    for axis, perm in enumerate(spec.axes_to_perm[key]):
        if perm is not None and axis != skip_axis:
            tensor = torch.index_select(tensor, axis, perms[perm])
    return tensor


def objective(spec: PermutationSpec, perms, state_a, state_b) -> float:
    """sum over permuted tensors of <W_A, pi(W_B)> (float32 dot per tensor, summed in float64)."""
    total = 0.0
    for key, axes in spec.axes_to_perm.items():
        if any(axes):
            b = permuted_except(spec, perms, key, state_b[key].float(), -1)
            total += torch.dot(state_a[key].float().reshape(-1), b.reshape(-1)).item()
    return total


def weight_matching(spec: PermutationSpec, state_a: dict, state_b: dict, *, max_iter: int = 100, seed: int = 0,
                    init_perms: dict | None = None, device: str | torch.device = "cpu", solver: str = "auto",
                    rel_tol: float = 1e-6, tick: Callable[[int, int, str], None] | None = None) -> tuple[dict, dict]:
    """Coordinate descent over permutations maximising sum <W_A, pi(W_B)> (Algorithm 1).

    Returns ({perm name: index tensor on cpu}, {objective_initial, objective_final, iterations, seconds}).
    A permutation is re-solved only when a permutation sharing a tensor with it changed since it was last
    solved: otherwise its cost matrix, and so its optimum, is the same.
    """
    start = time.perf_counter()
    keys = [k for k, axes in spec.axes_to_perm.items() if any(axes)]
    # float32 on the job's device: half-precision checkpoints would overflow/round in the cost sums
    a = {k: state_a[k].to(device, torch.float32) for k in keys}
    b = {k: state_b[k].to(device, torch.float32) for k in keys}
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in state_a.items()})
    perms = identity_perms(sizes, device)
    if init_perms:
        perms.update({p: torch.as_tensor(v, device=device) for p, v in init_perms.items() if p in perms})
    a_mats = {(k, ax): _as_matrix(a[k], ax) for p in sizes for k, ax in spec.perm_to_axes[p]}
    neighbours = {p: sorted({q for k, _ in spec.perm_to_axes[p] for q in spec.axes_to_perm[k] if q and q != p})
                  for p in sizes}
    version = dict.fromkeys(sizes, 0)
    solved_at: dict[str, tuple] = {}
    objective_initial = objective(spec, perms, a, b)
    gen = torch.Generator().manual_seed(seed)
    names = sorted(sizes)
    iterations = 0
    for iteration in range(max_iter):
        iterations = iteration + 1
        improved = False
        order = torch.randperm(len(names), generator=gen).tolist()
        for step, i in enumerate(order):
            p = names[i]
            seen = tuple(version[q] for q in neighbours[p])
            if solved_at.get(p) == seen:
                continue
            cost = None
            for key, axis in spec.perm_to_axes[p]:
                b_other = _as_matrix(permuted_except(spec, perms, key, b[key], axis), axis)
                if cost is None:
                    cost = a_mats[(key, axis)] @ b_other.T
                else:
                    cost.addmm_(a_mats[(key, axis)], b_other.T)
            new = solve_lap(cost, solver)
            old_value = cost.gather(1, perms[p][:, None]).sum().item()
            new_value = cost.gather(1, new[:, None]).sum().item()
            solved_at[p] = seen
            if new_value > old_value + rel_tol * max(abs(old_value), 1e-12):
                perms[p] = new
                version[p] += 1
                improved = True
            if tick is not None:
                tick(iteration, max_iter, f"iteration {iteration + 1}: {p}")
        if not improved:
            break
    info = {"objective_initial": objective_initial, "objective_final": objective(spec, perms, a, b),
            "iterations": iterations, "seconds": time.perf_counter() - start}
    return {p: v.cpu() for p, v in perms.items()}, info
