"""Straight-through estimator matching (the paper's Algorithm 2)."""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from matching.evaluate import IGNORE_INDEX, has_batchnorm, model_input, output_logits
from matching.spec import PermutationSpec, apply_permutation
from matching.weight_matching import objective, weight_matching


def ste_matching(spec: PermutationSpec, model: nn.Module, state_a: dict, state_b: dict, train, *, steps: int = 200,
                 learning_rate: float = 1e-3, batch_size: int = 256, seed: int = 0, max_iter: int = 100,
                 device="cpu", tick=None) -> tuple[dict, dict]:
    """Learn B~ (initialised at A); each step project it onto the permutations of B by warm-started weight
    matching, take the loss at the midpoint of A and the projection, and step B~ with the gradient taken
    straight through the projection. Keeps the permutation with the lowest midpoint loss on a fixed
    selection batch of the training data (weight matching's own result included)."""
    start = time.perf_counter()
    model = model.to(device)
    params = {k for k, _ in model.named_parameters()}
    a = {k: v.to(device, torch.float32) if v.is_floating_point() else v.to(device) for k, v in state_a.items()}
    b = {k: v.to(device, torch.float32) if v.is_floating_point() else v.to(device) for k, v in state_b.items()}
    tilde = {k: a[k].clone().requires_grad_(True) for k in params}
    optimizer = torch.optim.Adam(tilde.values(), lr=learning_rate)
    # BN layers use batch statistics at the midpoint: interpolated running stats describe no model
    model.train(has_batchnorm(model))
    gen = torch.Generator().manual_seed(seed)
    inputs, targets = model_input(train.inputs, device), train.targets.to(device)
    select = torch.randperm(len(inputs), generator=gen)[:2048]
    x_sel, y_sel = inputs[select], targets[select]

    def midpoint(projected, straight_through):
        mid = {}
        for k, v in a.items():
            if k in tilde and straight_through:  # value of the projection, gradient of B~
                mid[k] = 0.5 * (v + tilde[k] + (projected[k] - tilde[k]).detach())
            elif v.is_floating_point():
                mid[k] = 0.5 * (v + projected[k])
            else:
                mid[k] = v
        return mid

    def selection_loss(perms):
        with torch.no_grad():
            mid = midpoint(apply_permutation(spec, perms, b), False)
            mid = {k: v.clone() for k, v in mid.items()}  # BN in train mode writes its buffers
            logits = output_logits(functional_call(model, mid, (x_sel,)))
            return F.cross_entropy(logits.flatten(0, -2), y_sel.flatten(), ignore_index=IGNORE_INDEX).item()

    perms, wm_info = weight_matching(spec, a, b, max_iter=max_iter, seed=seed, device=device)
    best_perms, best_loss = perms, selection_loss(perms)
    initial_loss = best_loss
    order = torch.randperm(len(inputs), generator=gen).to(device)
    cursor = 0
    check_every = max(1, steps // 25)
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(inputs), generator=gen).to(device), 0
        batch = order[cursor:cursor + batch_size]
        cursor += batch_size
        if step > 0:
            detached = {k: (tilde[k].detach() if k in tilde else v) for k, v in a.items()}
            perms, _ = weight_matching(spec, detached, b, max_iter=max_iter, seed=seed + step, init_perms=perms,
                                       device=device)
        projected = apply_permutation(spec, perms, b)
        mid = midpoint(projected, True)
        mid = {k: (v if v.requires_grad else v.clone()) for k, v in mid.items()}
        logits = output_logits(functional_call(model, mid, (inputs[batch],)))
        loss = F.cross_entropy(logits.flatten(0, -2), targets[batch].flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % check_every == 0 or step + 1 == steps:
            current = selection_loss(perms)
            if current < best_loss:
                best_perms, best_loss = perms, current
        if tick is not None:
            tick(step + 1, steps, f"step {step + 1}/{steps} midpoint loss {loss.item():.4f}")
    model.eval()
    info = {"objective_initial": wm_info["objective_initial"], "objective_final": objective(spec, best_perms, a, b),
            "iterations": steps, "seconds": time.perf_counter() - start,
            "objective": "sum over permuted tensors of <W_A, pi(W_B)> (STE minimises the midpoint loss instead)",
            "midpoint_loss_weight_matching": initial_loss, "midpoint_loss_final": best_loss}
    return {p: v.cpu() for p, v in best_perms.items()}, info
