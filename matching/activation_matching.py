"""Activation matching (Section 3.1): one streaming pass, cross-correlation per permutation, one LAP each."""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

from matching.evaluate import model_input
from matching.infer import activation_points
from matching.infer_capture import graph_args
from matching.spec import PermutationSpec, perm_sizes
from matching.weight_matching import solve_blocks, solve_lap, two_level_values, weight_matching


def _capturing(model: nn.Module, state: dict, example: torch.Tensor, spec: PermutationSpec):
    """A traced copy of ``model`` loaded with ``state`` whose output is {node: activation} at every
    permutation point; also returns {perm: [(node, channel axis)]}."""
    model = copy.deepcopy(model)
    model.load_state_dict(state)
    for m in model.modules():  # in-place ops would overwrite captured pre-activation values
        if hasattr(m, "inplace"):
            m.inplace = False
    points, gm = activation_points(model, example, spec)
    nodes = {n.name: n for n in gm.graph.nodes}
    wanted = sorted({point[0] for where in points.values() for point in where})
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ({name: nodes[name] for name in wanted},)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.eval(), points


@torch.no_grad()
def activation_matching(spec: PermutationSpec, model: nn.Module, state_a: dict, state_b: dict, inputs: torch.Tensor,
                        *, batch_size: int = 256, device="cpu", tick=None) -> tuple[dict, dict]:
    """Permutations of B maximising the summed Pearson correlation of matched units' activations.

    Statistics are streamed: per permutation of width n we keep sums of a, b, a^2, b^2 (n each) and a b^T
    (n x n), so memory is O(width^2) whatever the number of examples."""
    start = time.perf_counter()
    example = model_input(inputs[:2], device)
    model = model.to(device)
    net_a, points = _capturing(model, state_a, example, spec)
    net_b, _ = _capturing(model, state_b, example, spec)
    stats: dict[str, list] = {}
    batches = max(1, -(-len(inputs) // batch_size))
    for i, begin in enumerate(range(0, len(inputs), batch_size)):
        x = model_input(inputs[begin:begin + batch_size], device)
        acts_a, acts_b = net_a(*graph_args(net_a, model, x)), net_b(*graph_args(net_b, model, x))
        for perm, where in points.items():
            for name, axis, offset, size in where:  # a segment of a concatenation holds the slice it permutes
                a = acts_a[name].narrow(axis, offset, size).movedim(axis, -1).reshape(-1, size).double()
                b = acts_b[name].narrow(axis, offset, size).movedim(axis, -1).reshape(-1, size).double()
                s = stats.setdefault((perm, name, offset), [0, 0.0, 0.0, 0.0, 0.0, 0.0])
                s[0] += a.shape[0]
                s[1] += a.sum(0); s[2] += b.sum(0); s[3] += (a * a).sum(0); s[4] += (b * b).sum(0); s[5] += a.T @ b
        if tick is not None:
            tick(i + 1, batches + 1, f"batch {i + 1}/{batches}")
    perms, objective_initial, objective_final = {}, 0.0, 0.0
    correlations = {}
    for perm, where in points.items():
        if not where:
            continue
        corr = 0.0
        for name, _, offset, _ in where:
            count, sa, sb, saa, sbb, sab = stats[(perm, name, offset)]
            mean_a, mean_b = sa / count, sb / count
            std_a = (saa / count - mean_a ** 2).clamp_min(0).sqrt()
            std_b = (sbb / count - mean_b ** 2).clamp_min(0).sqrt()
            cov = sab / count - mean_a[:, None] * mean_b[None, :]
            corr = corr + cov / (std_a[:, None] * std_b[None, :] + 1e-12)
        correlations[perm] = corr
    for perm, corr in correlations.items():
        if perm not in perms:
            perms.update(solve_structured(spec, correlations, perm))
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in state_a.items()})
    unseen = [p for p in sizes if p not in perms]
    if unseen:  # no activation carries them (inside a fused module, e.g. nn.MultiheadAttention's heads and
        # their dimensions): matched by their weights, given the permutations the activations set
        found, _ = weight_matching(spec, state_a, state_b, init_perms=perms, fixed=set(perms), device=device)
        perms.update({p: found[p] for p in unseen})
    for perm, corr in correlations.items():
        objective_initial += corr.diagonal().sum().item()
        objective_final += corr.gather(1, perms[perm].to(corr.device)[:, None]).sum().item()
    if tick is not None:
        tick(batches + 1, batches + 1, "solved")
    info = {"objective_initial": objective_initial, "objective_final": objective_final, "iterations": 1,
            "seconds": time.perf_counter() - start,
            "objective": "sum over permutations of the Pearson correlation of matched units' activations",
            "weight_matched": sorted(unseen)}
    return perms, info


def solve_structured(spec: PermutationSpec, costs: dict[str, torch.Tensor], perm: str) -> dict[str, torch.Tensor]:
    """argmax of sum_i cost[i, perm[i]] for ``perm``; a block-structured one jointly with every permutation that
    shares its group permutation S (the objective is separable, so this is exact): D[j, l] = sum over them of
    the best within-block assignment of group j to group l, S = LAP(D), then one LAP per block."""
    entry = spec.perms.get(perm, {})
    if entry.get("groups", 1) == 1:
        return {perm: solve_lap(costs[perm]).cpu()}
    groups, group_perm = entry["groups"], entry["group_perm"]
    members = [p for p, e in spec.perms.items() if p in costs and e.get("groups") == groups
               and e.get("group_perm") == group_perm and (group_perm is not None or p == perm)]
    if group_perm is None:
        sigma = torch.arange(groups)
    else:
        sigma = solve_lap(sum(two_level_values(costs[p], groups) for p in members)).cpu()
    out = {p: solve_blocks(costs[p].cpu(), groups, sigma).cpu() for p in members}
    if group_perm is not None:
        out[group_perm] = sigma
    return out
