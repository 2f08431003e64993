"""Activation matching (Section 3.1): one streaming pass, cross-correlation per permutation, one LAP each."""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

from matching.infer import activation_points
from matching.spec import PermutationSpec
from matching.weight_matching import solve_lap


def _capturing(model: nn.Module, state: dict, example: torch.Tensor, spec: PermutationSpec):
    """A traced copy of ``model`` loaded with ``state`` whose output is {node: activation} at every
    permutation point; also returns {perm: [(node, channel axis)]}."""
    model = copy.deepcopy(model)
    model.load_state_dict(state)
    for m in model.modules():  # in-place ops would overwrite captured pre-activation values
        if hasattr(m, "inplace"):
            m.inplace = False
    points, info, gm = activation_points(model, example, spec)
    nodes = {n.name: n for n in gm.graph.nodes}
    wanted = sorted({name for names in points.values() for name in names})
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ({name: nodes[name] for name in wanted},)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.eval(), {p: [(name, info[name][1]) for name in names] for p, names in points.items()}


@torch.no_grad()
def activation_matching(spec: PermutationSpec, model: nn.Module, state_a: dict, state_b: dict, inputs: torch.Tensor,
                        *, batch_size: int = 256, device="cpu", tick=None) -> tuple[dict, dict]:
    """Permutations of B maximising the summed Pearson correlation of matched units' activations.

    Statistics are streamed: per permutation of width n we keep sums of a, b, a^2, b^2 (n each) and a b^T
    (n x n), so memory is O(width^2) whatever the number of examples."""
    start = time.perf_counter()
    example = inputs[:2].to(device, torch.float32)
    model = model.to(device)
    net_a, points = _capturing(model, state_a, example, spec)
    net_b, _ = _capturing(model, state_b, example, spec)
    stats: dict[str, list] = {}
    batches = max(1, -(-len(inputs) // batch_size))
    for i, begin in enumerate(range(0, len(inputs), batch_size)):
        x = inputs[begin:begin + batch_size].to(device, torch.float32)
        acts_a, acts_b = net_a(x), net_b(x)
        for perm, where in points.items():
            for name, axis in where:
                a = acts_a[name].movedim(axis, -1).reshape(-1, acts_a[name].shape[axis]).double()
                b = acts_b[name].movedim(axis, -1).reshape(-1, acts_b[name].shape[axis]).double()
                s = stats.setdefault((perm, name), [0, 0.0, 0.0, 0.0, 0.0, 0.0])
                s[0] += a.shape[0]
                s[1] += a.sum(0); s[2] += b.sum(0); s[3] += (a * a).sum(0); s[4] += (b * b).sum(0); s[5] += a.T @ b
        if tick is not None:
            tick(i + 1, batches + 1, f"batch {i + 1}/{batches}")
    perms, objective_initial, objective_final = {}, 0.0, 0.0
    for perm, where in points.items():
        corr = 0.0
        for name, _ in where:
            count, sa, sb, saa, sbb, sab = stats[(perm, name)]
            mean_a, mean_b = sa / count, sb / count
            std_a = (saa / count - mean_a ** 2).clamp_min(0).sqrt()
            std_b = (sbb / count - mean_b ** 2).clamp_min(0).sqrt()
            cov = sab / count - mean_a[:, None] * mean_b[None, :]
            corr = corr + cov / (std_a[:, None] * std_b[None, :] + 1e-12)
        perms[perm] = solve_lap(corr).cpu()
        objective_initial += corr.diagonal().sum().item()
        objective_final += corr.gather(1, perms[perm].to(corr.device)[:, None]).sum().item()
    if tick is not None:
        tick(batches + 1, batches + 1, "solved")
    info = {"objective_initial": objective_initial, "objective_final": objective_final, "iterations": 1,
            "seconds": time.perf_counter() - start,
            "objective": "sum over permutations of the Pearson correlation of matched units' activations"}
    return perms, info
