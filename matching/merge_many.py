"""MergeMany (the paper's Algorithm 3)."""

from __future__ import annotations

import time

import torch

from matching.spec import PermutationSpec, apply_permutation, identity_perms, perm_sizes
from matching.weight_matching import weight_matching


def _mean(states):
    return {k: torch.stack([s[k].float() for s in states]).mean(0) for k, v in states[0].items() if v.is_floating_point()}


def merge_many(method, spec: PermutationSpec, model, states, train, opts, device, tick, align_pair):
    """Weight matching: repeatedly align each model to the mean of the others (aligned) until no
    permutation changes. Activation/STE matching are defined for pairs: every model is aligned to
    model 0 with that method (a star), then averaged."""
    start = time.perf_counter()
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in states[0].items()})
    perms = [identity_perms(sizes) for _ in states]
    if method != "weight_matching":
        for i in range(1, len(states)):
            perms[i], _ = align_pair(method, spec, model, states[0], states[i], train, opts, device, tick)
        return perms, {"objective_initial": None, "objective_final": None, "iterations": 1,
                       "seconds": time.perf_counter() - start, "merge_many": f"each model aligned to model 0 by {method}"}
    gen = torch.Generator().manual_seed(opts["seed"])
    objective_initial = objective_final = 0.0
    iterations = 0
    for iteration in range(opts["max_iter"]):
        iterations = iteration + 1
        changed = False
        objective_final = 0.0
        for step, i in enumerate(torch.randperm(len(states), generator=gen).tolist()):
            others = _mean([apply_permutation(spec, perms[j], states[j]) for j in range(len(states)) if j != i])
            new, info = weight_matching(spec, others, states[i], max_iter=opts["max_iter"], seed=opts["seed"] + iteration,
                                        init_perms=perms[i], device=device)
            if iteration == 0:
                objective_initial += info["objective_initial"]
            objective_final += info["objective_final"]
            changed |= any(not torch.equal(new[p], perms[i][p].cpu()) for p in new)
            perms[i] = new
            tick("merge_many", iteration * len(states) + step + 1, opts["max_iter"] * len(states),
                 f"round {iteration + 1}: model {i}")
        if not changed:
            break
    return perms, {"objective_initial": objective_initial, "objective_final": objective_final, "iterations": iterations,
                   "seconds": time.perf_counter() - start,
                   "objective": "sum over models of <mean of the others, pi_i(W_i)>"}
