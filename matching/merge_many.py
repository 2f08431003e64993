"""MergeMany (the paper's Algorithm 3, started from every model's star)."""

from __future__ import annotations

import time

import torch

from matching.spec import PermutationSpec, apply_permutation, identity_perms, perm_sizes
from matching.weight_matching import statistics_keys, weight_matching


def _mean(states):
    return {k: torch.stack([s[k].float() for s in states]).mean(0) for k, v in states[0].items() if v.is_floating_point()}


def _objective(spec, states, perms):
    """sum_i <mean of the others, pi_i(W_i)> over the permuted parameters (buffers left out, as weight matching)."""
    keys = [k for k, axes in spec.axes_to_perm.items() if any(axes) and k in states[0]]
    keys = [k for k in keys if k not in statistics_keys(keys) and states[0][k].is_floating_point()]
    aligned = [apply_permutation(spec, p, {k: s[k] for k in keys}) for p, s in zip(perms, states)]
    total = {k: sum(a[k].float() for a in aligned) for k in keys}
    return sum(float((a[k].float() * (total[k] - a[k].float())).sum()) for a in aligned for k in keys) / (len(states) - 1)


def merge_many(method, spec: PermutationSpec, model, states, train, opts, device, tick, align_pair):
    """Weight matching: every other model aligned to model 0 (weight matching, a star), then Algorithm 3 from
    there: each model, in a random order, aligned to the mean of the others as aligned, until no permutation
    changes. Activation/STE matching are defined for pairs: the star alone, with that method.

    Why the star start (issue 23; 3 MLPs 40-512x3-10 on MNIST-1D, Adam 20 epochs; seeds 100-102, 200-202, and
    100-102 trained on 2 threads; objective: the pairwise sum of <pi_i(W_i), pi_j(W_j)>; 3-4 sweep seeds each): from
    the identity, Algorithm 3 first aligns a model to an average of unaligned ones, objective 1628-1642 /
    1608-1663 / 1614 (training-split loss of the merged model 0.46-0.53 / 0.43-0.64 / 0.47-0.49); from the
    star 1638-1641 / 1662-1665 / 1612-1617 (0.50-0.51 / 0.46-0.51 / 0.48-0.53): the low outliers are gone.
    Held-out loss (repair none), sweep seed 0: 1.206 -> 1.207, 1.178 -> 1.127, 1.114 -> 1.167 against the
    inputs' mean 1.286 / 1.425 / 1.245 (REPAIR 1.471 / 1.471 / 1.410: lower training loss, higher held-out
    loss on these overfit inputs); at width 1024 0.832 / 0.834 against 1.460 / 1.311. Not kept: one start per
    reference model, best objective (1641.4 / 1664.7 / 1617.9; held-out 1.186 / 1.127 / 1.188), n times the work
    for at most 0.4% more objective. Aligning to the mean including the model itself never leaves the identity
    (a model is its own best match)."""
    start = time.perf_counter()
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in states[0].items()})
    n = len(states)
    perms = [identity_perms(sizes) for _ in states]
    objective_initial = _objective(spec, states, perms) if method == "weight_matching" else None
    for i in range(1, n):
        perms[i], _ = align_pair(method, spec, model, states[0], states[i], train, opts, device, tick)
    if method != "weight_matching":
        return perms, {"objective_initial": None, "objective_final": None, "iterations": 1,
                       "seconds": time.perf_counter() - start, "merge_many": f"each model aligned to model 0 by {method}"}
    gen = torch.Generator().manual_seed(opts["seed"])
    iterations = 0
    for iteration in range(opts["max_iter"]):
        iterations = iteration + 1
        changed = False
        for step, i in enumerate(torch.randperm(n, generator=gen).tolist()):
            others = _mean([apply_permutation(spec, perms[j], states[j]) for j in range(n) if j != i])
            new, _ = weight_matching(spec, others, states[i], max_iter=opts["max_iter"], seed=opts["seed"] + iteration,
                                     init_perms=perms[i], device=device)
            changed |= any(not torch.equal(new[p], perms[i][p].cpu()) for p in new)
            perms[i] = new
            tick("merge_many", iteration * n + step + 1, opts["max_iter"] * n, f"round {iteration + 1}: model {i}")
        if not changed:
            break
    return perms, {"objective_initial": objective_initial, "objective_final": _objective(spec, states, perms),
                   "iterations": iterations, "seconds": time.perf_counter() - start,
                   "objective": "sum over models of <mean of the others, pi_i(W_i)> (initial: unaligned)"}
