"""ZipIt! (Stoica, Bolya, Bjorner, Ramesh, Hearn, Hoffman, ICLR 2024): merge two models feature by feature,
within each model as well as across the two, and fold the merge into the weights.

Per permutation P of the spec (a hidden layer's units, a residual stream), of width n:
- Features: the activations of both models at P's points (post-nonlinearity where there is one, as activation
  matching takes them), run on the original models in one streaming pass. Their joint correlation matrix
  C [2n, 2n] over [f_A; f_B] is kept, the within-model blocks included (a residual stream sums its points).
- Matching (the paper's greedy algorithm): n times, merge the two clusters of highest correlation; a merged
  cluster's correlation to any other is the minimum of its members' times ``alpha`` (alpha = 0: every feature is
  merged once at most). Merges of two clusters of one model are limited to ``beta`` times half the merges, per
  model (beta = 0: none). Cluster c's merged feature is the average of its members: the merge matrix M [n, 2n],
  merged = M [f_A; f_B]; the unmerge U [2n, n] copies it back to every member, [f_A; f_B] ~ U merged.
- Folding: each tensor's output axis (axis 0, P_out) takes the merge and its input axis (axis 1, P_in) the
  unmerge, W = M_A W_A U_A + M_B W_B U_B (M = [M_A, M_B], U = [U_A; U_B]); an axis no permutation acts on is
  interpolated at ``merge_lambda``. Shapes are unchanged. A permutation is the special case M_A = I/2,
  M_B = P^T/2, U_A = I, U_B = P (``permutation_merge``), and its fold is the usual interpolation of A with
  aligned B.
- Partial merge (``trunk``: the state keys of the layers up to the cut): only the permutations on the trunk's
  output axes are merged. The trunk comes back merged; every other tensor stays its own model's (a head each),
  with U_m folded into the input axes that the trunk feeds (the first layers after the cut), so head m reads
  the merged features in model m's own basis.

Spec features handled: free permutations on axis 0 (output) and axis 1 (input) of any tensor (Linear, Conv of
any dimension, BatchNorm/GroupNorm/LayerNorm vectors and running statistics), residual streams (one permutation
shared by several layers' outputs). Refused (MatchingError): block-structured permutations (``perms``: groups or
attention heads, segments, expansions, reindexing), a permuted axis beyond the input axis, and a cut that splits
a residual stream (a merged permutation that a layer after the cut also writes: cut at a stage boundary).
BatchNorm: its vectors are merged like any others (running statistics averaged); a full merge then re-estimates
them on the inputs (``reset_bn``), a partial merge leaves that to the caller's zipped model.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from matching.activation_matching import _capturing
from matching.errors import MatchingError
from matching.evaluate import has_batchnorm, model_input, reset_batchnorm
from matching.infer_capture import graph_args
from matching.spec import PermutationSpec

# Defaults by measurement: two MLPs [64, 128, 128, 10] trained on digits 0-4 and 5-9, full-merge joint accuracy over
# alpha in {0, .3, .5, 1} x beta in {0, .125, .5, 1}: alpha 0, beta 0.5 best (0.876; the paper code's a=.3, b=.125: 0.689;
# weight matching 0.576, ensemble 0.898). ResNet20x2 (BN), alpha 0: beta 0 0.427, beta 0.5 0.624 (weight matching 0.429);
# cut after layer1 / layer2 (beta 0.5): 0.918 / 0.842 against weight matching's 0.807 / 0.704 (ensemble 0.940).
# Those figures took the arg max over raw logits; with joint accuracy over each head's probabilities
# (matching.zipped.joint_predictions, benchmarks/bench_zip.py --grid) the MLP's grid gives alpha 0: beta 0.5 0.856,
# beta 1 0.873; alpha 1, beta 1 0.889 (ensemble 0.893): the defaults are not re-chosen yet.
ALPHA_DEFAULT = 0.0
BETA_DEFAULT = 0.5
EPS = 1e-7
# layers whose weights are [out, in, ...] and whose other permuted tensors are per-output-channel vectors
KNOWN_LAYOUTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass
class ZipResult:
    merged: dict[str, torch.Tensor]  # full merge: every key; partial: the trunk's keys, merged
    heads: list[dict[str, torch.Tensor]] = field(default_factory=list)  # partial: [A's, B's] non-trunk keys
    merges: dict[str, torch.Tensor] = field(default_factory=dict)  # perm -> M [n, 2n]
    unmerges: dict[str, torch.Tensor] = field(default_factory=dict)  # perm -> U [2n, n]
    info: dict = field(default_factory=dict)


def zipit_merge(spec: PermutationSpec, model: nn.Module, state_a: dict, state_b: dict, inputs: torch.Tensor, *,
                alpha: float = ALPHA_DEFAULT, beta: float = BETA_DEFAULT, trunk: Collection[str] | None = None,
                merge_lambda: float = 0.5, reset_bn: bool = True, batch_size: int = 256, device="cpu",
                tick=None, correlations: dict[str, torch.Tensor] | None = None) -> ZipResult:
    """ZipIt! merge of models A and B (one architecture, ``model``) on ``inputs`` (see the module docstring).
    ``trunk``: the state keys merged (a partial merge); None merges everything. ``correlations``: what
    ``feature_correlations`` returned for these models and inputs (a sweep over cuts computes them once)."""
    start = time.perf_counter()
    if not (0.0 <= alpha <= 1.0 and 0.0 <= beta <= 1.0 and 0.0 <= merge_lambda <= 1.0):
        raise MatchingError(f"zip: alpha, beta and merge_lambda must be in [0, 1] (got {alpha}, {beta}, {merge_lambda})")
    check_zip_spec(spec, model)
    merged_perms = merged_permutations(spec, trunk)
    if correlations is None or not merged_perms <= set(correlations):
        correlations = feature_correlations(spec, model, state_a, state_b, inputs, merged_perms,
                                            batch_size=batch_size, device=device, tick=tick)
    merges, unmerges, counts = {}, {}, {}
    for perm in sorted(merged_perms):
        merges[perm], unmerges[perm], counts[perm] = zip_features(correlations[perm], alpha, beta, merge_lambda)
    merged, heads = fold_weights(spec, state_a, state_b, merges, unmerges, trunk=trunk, merge_lambda=merge_lambda)
    bn_reset = False
    if trunk is None and reset_bn and has_batchnorm(model):
        model = model.to(device)
        model.load_state_dict(merged)
        reset_batchnorm(model, model_input(inputs, device))
        merged = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bn_reset = True
    info = {"alpha": alpha, "beta": beta, "merge_lambda": merge_lambda, "partial": trunk is not None,
            "merged_permutations": sorted(merged_perms), "merges": counts, "bn_reset": bn_reset,
            "num_examples": len(inputs), "iterations": 1, "seconds": time.perf_counter() - start,
            "objective": "ZipIt!: greedy merges of the most correlated features, across and within the models"}
    return ZipResult(merged, heads, merges, unmerges, info)


def check_zip_spec(spec: PermutationSpec, model: nn.Module | None = None) -> None:
    """Refuse what the fold does not cover (see the module docstring). With the model: every permuted tensor must
    belong to a layer whose layout is known to be [out, in, ...] (or a per-channel vector)."""
    if spec.perms:
        kinds = sorted({next(iter(e)) for e in spec.perms.values()})
        raise MatchingError(f"zip merges free permutations only; this spec has block-structured ones ({', '.join(kinds)}: "
                            f"e.g. {sorted(spec.perms)[:3]}): use weight_matching or activation_matching")
    for key, axes in spec.axes_to_perm.items():
        beyond = [axis for axis, perm in enumerate(axes) if perm is not None and axis > 1]
        if beyond:
            raise MatchingError(f"zip folds merges into a tensor's output axis (0) and input axis (1) only; {key!r} "
                                f"has permutation {axes[beyond[0]]!r} on axis {beyond[0]}")
    if model is None:
        return
    modules = dict(model.named_modules())
    for key, axes in spec.axes_to_perm.items():
        owner = modules.get(key.rpartition(".")[0])
        if any(axes) and not isinstance(owner, KNOWN_LAYOUTS):
            raise MatchingError(f"zip knows the layout ([out, in, ...]) of Linear, convolution and normalisation layers; "
                                f"{key!r} belongs to {type(owner).__name__ if owner is not None else 'no module'}")


def merged_permutations(spec: PermutationSpec, trunk: Collection[str] | None) -> set[str]:
    """The permutations merged: all, or (partial) those on the trunk's output axes; refuses cuts whose trunk
    reads an unmerged permutation or whose heads write a merged one (a residual stream across the cut)."""
    if trunk is None:
        return {p for axes in spec.axes_to_perm.values() for p in axes if p is not None}
    trunk = set(trunk)
    unknown = sorted(trunk - set(spec.axes_to_perm))
    if unknown:
        raise MatchingError(f"zip: the trunk names tensors the checkpoint does not have: {unknown[:5]}")
    merged = {spec.axes_to_perm[k][0] for k in trunk if spec.axes_to_perm[k] and spec.axes_to_perm[k][0]}
    for key, axes in spec.axes_to_perm.items():
        if key in trunk and len(axes) > 1 and axes[1] is not None and axes[1] not in merged:
            raise MatchingError(f"zip: trunk tensor {key!r} reads units ({axes[1]!r}) that no trunk layer writes; "
                                "the trunk must be the layers up to the cut")
        if key not in trunk and axes and axes[0] in merged:
            writers = sorted(k for k in trunk if spec.axes_to_perm[k] and spec.axes_to_perm[k][0] == axes[0])
            raise MatchingError(f"zip: the cut splits {axes[0]!r}: {key!r} after the cut writes the same units as "
                                f"{writers[0]!r} before it (a residual stream); cut where the stream ends (a stage boundary)")
    return merged


@torch.no_grad()
def feature_correlations(spec: PermutationSpec, model: nn.Module, state_a: dict, state_b: dict, inputs: torch.Tensor,
                         perms: Collection[str], *, batch_size: int = 256, device="cpu", tick=None) -> dict[str, torch.Tensor]:
    """{perm: C [2n, 2n]}: Pearson correlation of the features [f_A; f_B] at the permutation's activation points
    (summed over its points), streamed: sums of z and z z^T per point, float64."""
    example = model_input(inputs[:2], device)
    model = model.to(device)
    net_a, points = _capturing(model, state_a, example, spec)
    net_b, _ = _capturing(model, state_b, example, spec)
    missing = sorted(p for p in perms if not points.get(p))
    if missing:
        raise MatchingError(f"zip: no activation carries permutation(s) {missing[:5]} (units inside a fused module); "
                            "zip needs each merged layer's outputs")
    stats: dict[tuple, list] = {}
    batches = max(1, -(-len(inputs) // batch_size))
    for i, begin in enumerate(range(0, len(inputs), batch_size)):
        x = model_input(inputs[begin:begin + batch_size], device)
        acts_a, acts_b = net_a(*graph_args(net_a, model, x)), net_b(*graph_args(net_b, model, x))
        for perm in perms:
            for name, axis, offset, size in points[perm]:
                z = torch.cat([acts[name].narrow(axis, offset, size).movedim(axis, -1).reshape(-1, size)
                               for acts in (acts_a, acts_b)], 1).double()
                s = stats.setdefault((perm, name, offset), [0, 0.0, 0.0])
                s[0] += z.shape[0]
                s[1] += z.sum(0)
                s[2] += z.T @ z
        if tick is not None:
            tick(i + 1, batches, f"batch {i + 1}/{batches}")
    out = {}
    for perm in perms:
        corr = 0.0
        for name, _, offset, _ in points[perm]:
            count, total, outer = stats[(perm, name, offset)]
            mean = total / count
            cov = outer / count - torch.outer(mean, mean)
            std = cov.diagonal().clamp_min(0).sqrt()
            corr = corr + cov / torch.outer(std, std).clamp_min(EPS)  # a dead unit correlates 0 with everything
        out[perm] = (corr / len(points[perm])).cpu()
    return out


def zip_features(corr: torch.Tensor, alpha: float, beta: float, merge_lambda: float = 0.5):
    """ZipIt!'s greedy matching of 2n features (A's n, then B's n) into n. Returns (M [n, 2n], U [2n, n],
    {"across": merges of an A and a B cluster, "within_a", "within_b"})."""
    two_n = corr.shape[0]
    n = two_n // 2
    origin = torch.arange(two_n) >= n  # False: A's feature, True: B's; a cluster has its first member's origin
    sims = corr.double().clone()
    sims.fill_diagonal_(-torch.inf)
    budget = [int(n // 2 * beta), int(n // 2 * beta)]  # within-model merges left, per model
    for m in (0, 1):
        if budget[m] <= 0:
            _close_within(sims, origin, m, torch.ones(two_n, dtype=torch.bool))
    members = torch.eye(two_n, dtype=torch.double)  # column c: the members of cluster c
    active = torch.ones(two_n, dtype=torch.bool)
    counts = {"across": 0, "within_a": 0, "within_b": 0}
    for _ in range(two_n - n):
        best = int(sims.argmax())
        i, j = sorted(divmod(best, two_n))
        if sims[i, j] == -torch.inf:  # every allowed pair is used up: merge the most correlated remaining ones
            i, j = _fallback_pair(corr, active)
        within = bool(origin[i] == origin[j])
        members[:, i] += members[:, j]
        members[:, j] = 0
        merged_row = torch.minimum(sims[i], sims[j]) * alpha if alpha > 0 else torch.full((two_n,), -torch.inf, dtype=sims.dtype)
        sims[i], sims[:, i] = merged_row, merged_row
        sims[j], sims[:, j] = -torch.inf, -torch.inf
        sims[i, i] = -torch.inf
        active[j] = False
        if within:
            m = int(origin[i])
            counts["within_b" if m else "within_a"] += 1
            budget[m] -= 1
            if budget[m] <= 0:
                _close_within(sims, origin, m, active)
        else:
            counts["across"] += 1
    clusters = members[:, active]  # [2n, n], 0/1
    weights = torch.where(origin, merge_lambda, 1 - merge_lambda).double()[:, None] * clusters
    merge = (weights / weights.sum(0, keepdim=True).clamp_min(EPS)).T
    if merge_lambda in (0.0, 1.0):  # a cluster of the other model only is still its average
        empty = weights.sum(0) == 0
        merge[empty] = (clusters[:, empty] / clusters[:, empty].sum(0)).T
    return merge.float(), clusters.float(), counts


def _close_within(sims: torch.Tensor, origin: torch.Tensor, model: int, active: torch.Tensor) -> None:
    """No more merges of two clusters of ``model``."""
    rows = (origin == bool(model)) & active
    sims[rows[:, None] & rows[None, :]] = -torch.inf


def _fallback_pair(corr: torch.Tensor, active: torch.Tensor) -> tuple[int, int]:
    sims = corr.double().clone()
    sims.fill_diagonal_(-torch.inf)
    sims[~active] = -torch.inf
    sims[:, ~active] = -torch.inf
    return tuple(sorted(divmod(int(sims.argmax()), len(sims))))


def clusters(unmerge: torch.Tensor) -> list[list[list[int]]]:
    """Each merged unit's members as [[A's units], [B's units]] (for permutation.json)."""
    n = unmerge.shape[1]
    return [[torch.nonzero(unmerge[:n, c]).flatten().tolist(), torch.nonzero(unmerge[n:, c]).flatten().tolist()]
            for c in range(n)]


def permutation_merge(perm: torch.Tensor, merge_lambda: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """A permutation of B (``new[i] = old[perm[i]]``) as a merge and unmerge: merged[i] = (1 - lambda) a[i] +
    lambda b[perm[i]]; a ~ merged, b[perm[i]] ~ merged[i]."""
    n = len(perm)
    eye = torch.eye(n)
    p = eye[:, perm.cpu()]  # p[perm[i], i] = 1: column i picks b[perm[i]]
    return torch.cat([(1 - merge_lambda) * eye, merge_lambda * p.T], 1), torch.cat([eye, p], 0)


def fold_weights(spec: PermutationSpec, state_a: dict, state_b: dict, merges: dict, unmerges: dict, *,
                 trunk: Collection[str] | None = None, merge_lambda: float = 0.5):
    """Fold merges (output axes) and unmerges (input axes) into the weights: returns (merged, heads). Full
    merge (trunk None): every tensor merged, heads []. Partial: the trunk's tensors merged; heads = [A's, B's]
    other tensors, each with its model's unmerge on the input axes of merged permutations."""
    check_zip_spec(spec)
    lambdas = (1 - merge_lambda, merge_lambda)
    trunk = None if trunk is None else set(trunk)
    merged, heads = {}, [{}, {}]
    for key, a in state_a.items():
        axes = spec.axes_to_perm.get(key, ())
        tensors = (a, state_b[key])
        if trunk is None or key in trunk:
            if not a.is_floating_point():
                merged[key] = a
                continue
            total = 0.0
            for m, t in enumerate(tensors):
                t = t.float()
                if axes and axes[0] is not None:
                    n = t.shape[0]
                    t = _apply_left(merges[axes[0]][:, m * n:(m + 1) * n].to(t.device), t)
                else:
                    t = lambdas[m] * t
                if len(axes) > 1 and axes[1] is not None:
                    t = _apply_input(t, _unmerge_of(unmerges[axes[1]], m).to(t.device))
                total = total + t
            merged[key] = total.to(a.dtype)
        else:
            for m, t in enumerate(tensors):
                if len(axes) > 1 and axes[1] in merges and t.is_floating_point():
                    t = _apply_input(t.float(), _unmerge_of(unmerges[axes[1]], m).to(t.device)).to(t.dtype)
                heads[m][key] = t
    return merged, (heads if trunk is not None else [])


def _unmerge_of(unmerge: torch.Tensor, model: int) -> torch.Tensor:
    n = unmerge.shape[1]
    return unmerge[model * n:(model + 1) * n]


def _apply_left(matrix: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """matrix [k, n] applied to axis 0 of t [n, ...]."""
    return (matrix @ t.reshape(t.shape[0], -1)).reshape(matrix.shape[0], *t.shape[1:])


def _apply_input(t: torch.Tensor, unmerge: torch.Tensor) -> torch.Tensor:
    """W U on axis 1: new[:, k] = sum_j t[:, j] U[j, k] (U [n_in, n_merged])."""
    return (t.movedim(1, -1) @ unmerge).movedim(-1, 1)
