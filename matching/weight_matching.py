"""Weight matching (the paper's Algorithm 1) and the linear assignment solver it uses."""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Collection

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from matching.spec import PermutationSpec, identity_perms, matching_view, perm_sizes

try:  # lapjv is a dependency; scipy stays the fallback (and the solver of ``solver="scipy"``)
    from lapjv import lapjv as _lapjv
except ImportError:  # pragma: no cover
    _lapjv = None


# Stopping rule: the paper's (stop at zero gain) by default. Measured (benchmarks/README.md): rel_tol=1e-5 saves
# 3 of 20 sweeps on torchvision-init ResNet-50 for 1.2e-5 of the objective, but on a trained VGG11 it stopped
# after 15 of 35 sweeps and gave up 1.2e-4, whose tail gains ~1e-5 per sweep for 20 sweeps.
REL_TOL = 0.0

# Buffers that are permuted with their channels but are not learned, left out of the objective by default (as in
# the paper's code, where Flax keeps batch statistics outside the matched parameters). Measured on trained pairs
# (benchmarks/README.md, "Parameters only"): ResNet20-BN on digits, BN-reset held-out barrier 0.81 -> 0.11 and
# 0.97 -> 0.19 for two seed pairs; VGG11-BN 1.42 -> 1.29 and 0.95 -> 1.23, within the spread of its local optima.
STATISTICS_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def statistics_keys(keys) -> set[str]:
    """The keys named like BatchNorm running statistics (the default ``unmatched`` without a model at hand)."""
    return {k for k in keys if k.rsplit(".", 1)[-1] in STATISTICS_SUFFIXES}


def solve_lap(cost: torch.Tensor, solver: str = "auto") -> torch.Tensor:
    """argmax_perm sum_i cost[i, perm[i]] as an index tensor (on cost's device).

    "lapjv" is the ``lapjv`` package (Jonker-Volgenant, float32, vectorised), "scipy" scipy's (float64);
    "auto" is lapjv when it is installed. Same optima (tests/test_matching_speed.py). On the cost matrices of
    torchvision-init ResNet-50 (benchmarks/README.md): n=2048 0.25 s per solve against lapx's lapjvs 0.63 s
    and scipy's 4.0 s; n=512 0.006 s against 0.021 s and 0.054 s.

    lapjv is given each row's shortfall from its best entry (max_j cost[i, j] - cost[i, j] >= 0: the same
    optimum, since a row's constant does not change which columns win): it works in float32, and -cost
    carries each row's offset. On trained models' cost matrices that took 3.4x (ResNet20 x4) and 7x (VGG11)
    less time, 4% more on torchvision-init ResNet-50's (python -m benchmarks.bench_lap), and it is exact
    where lapjv on -cost fell short (rows offset by 1e6).
    """
    if _lapjv is not None and solver in ("auto", "lapjv"):
        shortfall = cost.detach().float()
        shortfall = shortfall.amax(1, keepdim=True) - shortfall
        cols = _lapjv(np.ascontiguousarray(shortfall.cpu().numpy()))[0]
    else:
        _, cols = linear_sum_assignment(cost.detach().to("cpu", torch.float64).numpy(), maximize=True)
    return torch.as_tensor(np.asarray(cols, dtype=np.int64), device=cost.device)


def solve_blocks(cost: torch.Tensor, groups: int, group_perm: torch.Tensor, solver: str = "auto") -> torch.Tensor:
    """argmax of sum_i cost[i, perm[i]] over block-structured permutations whose group j takes group
    group_perm[j]: independent LAPs, one per block (exact; the blocks do not interact)."""
    n = len(cost)
    k = n // groups
    if k == 1:
        return group_perm.to(cost.device).clone()
    out = torch.empty(n, dtype=torch.long, device=cost.device)
    for j, l in enumerate(group_perm.tolist()):
        out[j * k:(j + 1) * k] = l * k + solve_lap(cost[j * k:(j + 1) * k, l * k:(l + 1) * k], solver)
    return out


def two_level_values(cost: torch.Tensor, groups: int) -> torch.Tensor:
    """[G, G]: the best value of assigning group j's units to group l's, sum_i cost[j*k + i, l*k + tau(i)]."""
    k = len(cost) // groups
    if k == 1:
        return cost.double()
    blocks = cost.reshape(groups, k, groups, k).permute(0, 2, 1, 3).detach().cpu().double().numpy()
    values = torch.zeros(groups, groups, dtype=torch.float64)
    for j in range(groups):
        for l in range(groups):
            rows, cols = linear_sum_assignment(blocks[j, l], maximize=True)
            values[j, l] = float(blocks[j, l][rows, cols].sum())
    return values.to(cost.device)


def group_step(spec: PermutationSpec, perms: dict, group_perm: str, a: dict, b: dict, solver: str = "auto"):
    """One coordinate step for a group permutation S and the block-structured permutations that share it.

    Two candidates, the better one (by the exact change of the objective) is taken:
    - groups move with the units inside them: every P sharing S is P[j*k + i] = T[S[j]*k + i] with T (the
      within-group parts, attached to the old groups) fixed; the objective is sum_j D[j, S[j]] with
      D[j, l] = <A_j, B~_l> (B~: B with T and every other permutation applied), so S is one LAP of size G;
    - S and the within-group parts at once, from each member's cost matrix without the terms that couple two
      members (the grouped weight between them): D[j, l] = sum over members of the LAP value of block (j, l),
      S = LAP(D), then one LAP per block. Exact when the members do not interact; a candidate otherwise.
    Returns (gain, S, {perm: new index}), or None when no candidate improves."""
    members = [p for p, e in spec.perms.items() if e.get("group_perm") == group_perm and p in perms]
    sigma = perms[group_perm]
    groups = len(sigma)
    # tensors with an axis in the family, including per-group ones that S permutes directly (a bias table per head)
    keys = [k for k, axes in spec.axes_to_perm.items() if any(p in members or p == group_perm for p in axes)]

    def family_objective(trial):
        return sum(key_objective(spec, trial, k, a, b) for k in keys)

    candidates = []
    inverse = torch.empty_like(sigma)
    inverse[sigma] = torch.arange(groups, device=sigma.device)
    travel = {p: perms[p].reshape(groups, -1)[inverse].reshape(-1) for p in members}  # T
    d = torch.zeros(groups, groups, device=sigma.device)
    direct = torch.zeros(groups, groups, device=sigma.device)  # the terms of the tensors that only S permutes
    linear = True
    for key in keys:
        axes = spec.axes_to_perm[key]
        family = [ax for ax, p in enumerate(axes) if p in travel or p == group_perm]
        tb = b[key]
        for ax, p in enumerate(axes):
            if p is not None and p != group_perm:
                tb = torch.index_select(tb, ax, travel[p] if p in travel else perms[p])
        ta, tb = (_groups_first(t, family, groups) for t in (a[key], tb))
        if len(family) > 1:
            eye = torch.eye(groups, dtype=torch.bool, device=ta.device)
            if len(family) != 2 or ta[~eye].abs().sum() > 0:
                linear = False
                break
            ta, tb = ta.diagonal(0, 0, 1).movedim(-1, 0), tb.diagonal(0, 0, 1).movedim(-1, 0)
        d.addmm_(ta.reshape(groups, -1), tb.reshape(groups, -1).T)
        if not any(p in travel for p in axes):
            direct.addmm_(ta.reshape(groups, -1), tb.reshape(groups, -1).T)
    if linear:
        new_sigma = solve_lap(d, solver)
        candidates.append((new_sigma, {p: t.reshape(groups, -1)[new_sigma].reshape(-1) for p, t in travel.items()}))
    costs = {}
    for p in members:
        cost = torch.zeros(len(perms[p]), len(perms[p]), device=sigma.device)
        for key, axis in spec.perm_to_axes.get(p, []):
            if any(q in members for ax, q in enumerate(spec.axes_to_perm[key]) if ax != axis):
                continue
            b_other = _as_matrix(permuted_except(spec, perms, key, b[key], axis), axis)
            cost.addmm_(_as_matrix(a[key], axis), b_other.T)
        costs[p] = cost
    joint_sigma = solve_lap(sum(two_level_values(cost, groups) for cost in costs.values()) + direct.double(), solver)
    candidates.append((joint_sigma, {p: solve_blocks(cost, groups, joint_sigma, solver) for p, cost in costs.items()}))
    before = family_objective(perms)
    best = None
    for new_sigma, new in candidates:
        gain = family_objective({**perms, **new}) - before
        if gain > 1e-7 * max(abs(before), 1.0) and (best is None or gain > best[0]):
            best = (gain, new_sigma, new)
    return best


def _groups_first(t: torch.Tensor, axes: list[int], groups: int) -> torch.Tensor:
    """Split each of ``axes`` into (group, within) and bring the group axes to the front."""
    shape = []
    for ax, n in enumerate(t.shape):
        shape += [groups, n // groups] if ax in axes else [n]
    return t.reshape(shape).movedim([ax + i for i, ax in enumerate(axes)], list(range(len(axes))))


def _as_matrix(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)


def permuted_except(spec: PermutationSpec, perms, key: str, tensor: torch.Tensor, skip_axis: int) -> torch.Tensor:
    for axis, perm in enumerate(spec.axes_to_perm[key]):
        if perm is not None and axis != skip_axis:
            tensor = torch.index_select(tensor, axis, perms[perm])
    return tensor


def key_objective(spec: PermutationSpec, perms, key: str, state_a, state_b) -> float:
    """<W_A, pi(W_B)> for one tensor (a float32 dot); perms=None: the identity, nothing gathered."""
    b = state_b[key].float() if perms is None else permuted_except(spec, perms, key, state_b[key].float(), -1)
    return torch.dot(state_a[key].float().reshape(-1), b.reshape(-1)).item()


def objective(spec: PermutationSpec, perms, state_a, state_b) -> float:
    """sum over permuted tensors of <W_A, pi(W_B)> (float32 dot per tensor, summed in float64)."""
    if spec.perms:
        spec, (state_a, state_b) = matching_view(spec, [state_a, state_b])
    return sum(key_objective(spec, perms, key, state_a, state_b) for key, axes in spec.axes_to_perm.items() if any(axes))


def _term_layout(tensor: torch.Tensor, axis: int, other_axis: int) -> tuple[torch.Tensor, int]:
    """``tensor`` as three dims with other_axis at the returned dim: [axis, other_axis, rest] (a view) when the
    two lead it, else [other_axis, rest, axis] (a contiguous copy). Either way gathering units of other_axis
    is one index_select and the cost term one matmul of ``_unit_rows`` (BLAS takes a transposed operand as
    it is). The copy is made once per tensor and axis; of the view, only B's gathers are copied."""
    if (axis, other_axis) == (0, 1):
        return tensor.reshape(tensor.shape[0], tensor.shape[1], -1), 1
    rest = [d for d in range(tensor.dim()) if d not in (axis, other_axis)]
    t = tensor.permute(other_axis, *rest, axis).contiguous()
    return t.reshape(t.shape[0], -1, t.shape[-1]), 0


def _unit_rows(layout: torch.Tensor, other_dim: int, n: int) -> torch.Tensor:
    """A ``_term_layout`` as [n units of its axis, everything else]."""
    return layout.reshape(n, -1) if other_dim == 1 else layout.reshape(-1, n).T


class Float32(Mapping):
    """A state's tensors in float32 on ``device``, converted one at a time when read: a half-precision or
    memory-mapped checkpoint is never copied whole."""

    def __init__(self, state: Mapping, device):
        self.state, self.device = state, device

    def __getitem__(self, key):
        return self.state[key].to(self.device, torch.float32)

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)


class BoundedCache:
    """Entries whose sizes (bytes) add up to at most ``budget`` (None: unbounded); once it is full, new entries
    are not kept (entries already in are replaced). Weight matching visits the same entries in a cycle, where
    evicting the oldest (LRU) would miss every time; this keeps a budget's worth of them hitting."""

    def __init__(self, budget: int | None):
        self.budget, self.used, self.entries = budget, 0, {}
        self.hits = self.misses = 0

    def get(self, key):
        if key in self.entries:
            self.hits += 1
            return self.entries[key][0]
        self.misses += 1
        return None

    def put(self, key, value, nbytes: int) -> None:
        old = self.entries.pop(key, (None, 0))[1]
        self.used -= old
        if self.budget is None or self.used + nbytes <= self.budget:
            self.entries[key] = (value, nbytes)
            self.used += nbytes


def _new_bytes(tensors, sources) -> int:
    """Bytes of ``tensors`` that do not share memory with any of ``sources`` (what caching them holds)."""
    shared = {s.untyped_storage().data_ptr() for s in sources}
    return sum(t.untyped_storage().nbytes() for t in tensors if t.untyped_storage().data_ptr() not in shared)


def weight_matching(spec: PermutationSpec, state_a: Mapping, state_b: Mapping, *, max_iter: int = 100, seed: int = 0,
                    init_perms: dict | None = None, device: str | torch.device = "cpu", solver: str = "auto",
                    rel_tol: float = REL_TOL, tick: Callable[[int, int, str], None] | None = None,
                    propagate: bool = True, fixed: Collection[str] = (),
                    unmatched: Collection[str] | None = None, cache_bytes: int | None = None) -> tuple[dict, dict]:
    """Coordinate descent over permutations maximising sum <W_A, pi(W_B)> (Algorithm 1).

    Returns ({perm name: index tensor on cpu}, {objective_initial, objective_final, iterations, seconds,
    trajectory (objective before the first and after each pass), seconds_lap (waiting for LAP solves that
    were not hidden behind cost updates), seconds_cost_updates}).
    Stops after a pass over all permutations that raised the objective by no more than ``rel_tol`` relative
    to it (the paper: 0), or after ``max_iter`` passes.

    Permutations named in ``fixed`` keep their ``init_perms`` value (identity without one): the others are
    matched given them. Tensors named in ``unmatched`` (a model's buffers; None: those named like BatchNorm
    running statistics, ``statistics_keys``) are left out of the objective: the objective is over learned
    parameters, and the buffers are permuted all the same when the result is applied. ``unmatched=()`` matches
    every permuted tensor.

    Without ``init_perms``, the first pass propagates from the input: permutations in the network's forward
    order (as they first appear in the spec, i.e. the checkpoint's key order), each cost built only from the
    terms whose other permutations were already visited, so each layer is solved after the one feeding it and
    a permuted copy is aligned in one pass. Later passes go in a random order from ``seed``
    (``propagate=False``: random from the start, as the paper). From a random order, mobilenet_v3_large
    (squeeze-excitation gates) stopped in a poor local optimum (objective 28685 against the planted 48678).

    Nothing is recomputed whose inputs did not change: a permutation whose neighbours (permutations sharing
    a tensor with it) did not move since it was last solved is not solved again (same cost, same optimum);
    otherwise its cached cost matrix is updated only by the slices of the neighbours' permutations that
    moved (cost = sum_k A[:, k] B[:, q(k)]^T, so changing q on K changes only |K| of those products).
    Late passes move few units, so they cost a small fraction of a full recomputation. A LAP is solved in a
    thread while the next permutation's cost is updated and its LAP started, unless that one depends on it:
    the same result as one after the other, with both cores busy.

    ``cache_bytes`` (None: unbounded, everything in float32 on ``device`` up front): streaming. The states may
    be memory-mapped or lazy mappings; each tensor is read and converted to float32 when a cost term needs it,
    and the cost matrices and the reshaped tensor copies (``_term_layout``) are kept as long as they fit
    ``cache_bytes`` (``BoundedCache``); a cost matrix that was not kept is rebuilt in full when it is needed again.
    """
    start = time.perf_counter()
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in state_a.items()})
    unmatched = statistics_keys(state_a) if unmatched is None else set(unmatched)
    keys = [k for k, axes in spec.axes_to_perm.items() if any(axes) and k not in unmatched]
    # float32 on the job's device: half-precision checkpoints would overflow/round in the cost sums
    streaming = cache_bytes is not None
    a, b = ({k: s[k] if streaming else s[k].to(device, torch.float32) for k in keys} for s in (state_a, state_b))
    # block structure (segments, expansions, grouped weights) as plain axes; groups are kept in spec.perms
    spec, (a, b) = matching_view(spec, [a, b])
    stored = (a, b)  # streaming: what a and b convert from when read
    if streaming:
        a, b = Float32(a, device), Float32(b, device)
    perms = identity_perms(sizes, device)
    if init_perms:
        perms.update({p: torch.as_tensor(v, device=device) for p, v in init_perms.items() if p in perms})
    group_perms = {e["group_perm"] for e in spec.perms.values() if e.get("group_perm")}
    # the terms of each permutation's cost matrix: (key, axis, [(other perm, its axis), ...])
    terms = {p: [(k, ax, [(q, qax) for qax, q in enumerate(spec.axes_to_perm[k]) if q is not None and qax != ax])
                 for k, ax in spec.perm_to_axes.get(p, [])] for p in sizes if p not in group_perms}
    # a block-structured permutation is re-solved when its group permutation moved
    neighbours = {p: sorted({q for _, _, others in terms[p] for q, _ in others}
                            | ({spec.perms[p]["group_perm"]} if spec.perms.get(p, {}).get("group_perm") else set()))
                  for p in terms}
    # (key, axis) -> (A, B, dim of the other permuted axis), see _term_layout; p -> cost matrix (see below)
    cache = BoundedCache(cache_bytes)

    def term_layout(key, axis, other_axis):
        layout = cache.get((key, axis))
        if layout is None:
            (a3, d), (b3, _) = _term_layout(a[key], axis, other_axis), _term_layout(b[key], axis, other_axis)
            layout = (a3, b3, d)
            cache.put((key, axis), layout, _new_bytes((a3, b3), (stored[0][key], stored[1][key])))
        return layout

    def add_term(cost, key, axis, others, with_perms, alpha=1.0):
        """cost += alpha * A_(axis) B_(axis)^T, B's other axes permuted by with_perms."""
        if len(others) == 1:
            (q, qax), = others
            a3, b3, d = term_layout(key, axis, qax)
            n = len(cost)
            cost.addmm_(_unit_rows(a3, d, n), _unit_rows(b3.index_select(d, with_perms[q]), d, n).T, alpha=alpha)
        else:
            b_other = _as_matrix(permuted_except(spec, with_perms, key, b[key], axis), axis)
            cost.addmm_(_as_matrix(a[key], axis), b_other.T, alpha=alpha)

    def full_cost(p, unseen=frozenset()):
        cost = torch.zeros(sizes[p], sizes[p], device=device)
        for key, axis, others in terms[p]:
            if not any(q in unseen for q, _ in others):
                add_term(cost, key, axis, others, perms)
        return cost

    def update_cost(p, cost, used):
        """``cost`` was built with the neighbours' permutations ``used`` (None: an unvisited one, whose terms it
        lacks); bring it to the current ones."""
        for key, axis, others in terms[p]:
            moved = [(q, qax) for q, qax in others if used[q] is not perms[q]]
            if not moved:
                continue
            if any(used[q] is None for q, _ in others):  # left out while propagating
                add_term(cost, key, axis, others, perms)
            elif len(others) == 1:  # the usual case (a weight between two permuted layers): update moved slices
                q, qax = others[0]
                changed = (used[q] != perms[q]).nonzero().squeeze(1)
                if len(changed) == 0:
                    continue
                a3, b3, d = term_layout(key, axis, qax)
                n = sizes[p]
                delta_b = b3.index_select(d, perms[q][changed]) - b3.index_select(d, used[q][changed])
                cost.addmm_(_unit_rows(a3.index_select(d, changed), d, n), _unit_rows(delta_b, d, n).T)
            else:  # several other permuted axes: swap the old term for the new one
                add_term(cost, key, axis, others, {**perms, **{q: used[q] for q, _ in others}}, alpha=-1.0)
                add_term(cost, key, axis, others, perms)
        return cost

    built_with: dict[str, dict] = {}  # p -> the neighbour perms its (cached) cost matrix was built with
    # each tensor's <A, pi(B)>, measured again only where a permutation on it moved since
    values = {k: key_objective(spec, perms if init_perms else None, k, a, b) for k, axes in spec.axes_to_perm.items() if any(axes)}
    values_initial, measured = dict(values), dict(perms)

    def measure() -> float:
        for k in values:
            if any(q is not None and perms[q] is not measured[q] for q in spec.axes_to_perm[k]):
                values[k] = key_objective(spec, perms, k, a, b)
        measured.update(perms)
        return sum(values.values())

    current = objective_initial = sum(values.values())
    trajectory = [objective_initial]
    seconds_cost = 0.0
    gen = torch.Generator().manual_seed(seed)
    names = sorted(p for p in sizes if p not in fixed)
    # Without a warm start, the first pass propagates from the fixed input: permutations in state-dict order, each
    # cost built only from the terms whose other permutations were already visited (an unvisited one is an
    # identity guess, noise between unrelated models). Otherwise a permutation that every block shares (a
    # transformer's residual stream), visited late, is outvoted by blocks aligned to its identity guess and the
    # descent stops there: a planted permutation of a two-block DeiT was recovered for 3 of 6 seeds, 6 of 6 with it.
    unseen = set(names) if propagate and not init_perms else set()
    # the network's forward order: permutations as they first appear in the spec (the checkpoint's key order)
    forward = list(dict.fromkeys(q for axes in spec.axes_to_perm.values() for q in axes if q in sizes))
    forward = [q for q in forward if q not in fixed] + [q for q in names if q not in forward]
    pending = None  # (perm, cost, future of its LAP solve), solved in a thread while the next cost is updated
    seconds_lap = 0.0

    def finish(solving):
        """Wait for a LAP solve and take its answer; returns the gain."""
        nonlocal seconds_lap
        if solving is None:
            return 0.0
        p, cost, future = solving
        t0 = time.perf_counter()
        new = future.result()
        seconds_lap += time.perf_counter() - t0
        old_value = cost.gather(1, perms[p][:, None]).sum().item()
        new_value = cost.gather(1, new[:, None]).sum().item()
        # the objective changes by exactly this: every term involving p is in its cost matrix. Like the
        # paper, take the solver's answer also on ties (it is optimal for this cost), but count only gains.
        if new_value >= old_value and not torch.equal(new, perms[p]):
            perms[p] = new
            return new_value - old_value
        return 0.0

    pool = ThreadPoolExecutor(max_workers=2)  # LAP solvers release the GIL: two can run, beside a cost update
    iterations = 0
    for iteration in range(max_iter):
        iterations = iteration + 1
        gain = 0.0
        propagating = bool(unseen)
        order = forward if propagating else [names[i] for i in torch.randperm(len(names), generator=gen).tolist()]
        for p in order:
            unseen.discard(p)
            if p in group_perms:
                gain += finish(pending)
                pending = None
                step = group_step(spec, perms, p, a, b, solver)
                if step is not None:
                    gain += step[0]
                    perms[p] = step[1]
                    perms.update(step[2])
                continue
            if pending is not None and pending[0] in neighbours[p]:
                gain += finish(pending)  # p's cost depends on the permutation being solved
                pending = None
            if p in built_with and all(built_with[p][q] is perms[q] for q in neighbours[p]):
                continue  # nothing it depends on moved: same cost, same optimum
            t0 = time.perf_counter()
            if propagating:  # partial costs (see above), completed by update_cost in the next pass
                cost = full_cost(p, unseen)
                built_with[p] = {q: None if q in unseen else perms[q] for q in neighbours[p]}
            else:
                cached = cache.get(p)
                cost = update_cost(p, cached, built_with[p]) if cached is not None else full_cost(p)
                built_with[p] = {q: perms[q] for q in neighbours[p]}
            cache.put(p, cost, cost.numel() * cost.element_size())
            seconds_cost += time.perf_counter() - t0
            structure = spec.perms.get(p, {})
            if structure.get("groups", 1) > 1:
                group_perm = perms[structure["group_perm"]] if structure["group_perm"] else torch.arange(structure["groups"])
                future = pool.submit(solve_blocks, cost, structure["groups"], group_perm, solver)
            else:
                future = pool.submit(solve_lap, cost, solver)
            # the previous LAP ran beside this cost update; p does not depend on it, so the result is the
            # same as solving one after the other
            gain += finish(pending)
            pending = (p, cost, future)
            if tick is not None:
                tick(iteration, max_iter, f"iteration {iteration + 1}: {p}")
        gain += finish(pending)
        pending = None
        if propagating:  # the partial costs did not see every change: measure, and keep the start if it was better
            before, current = current, measure()
            if current < before:
                perms, current = identity_perms(sizes, device), before
                values, measured = dict(values_initial), dict(perms)
            gain = current - before
        else:
            current += gain
        trajectory.append(current)
        if not propagating and gain <= rel_tol * max(abs(current), 1e-12):
            break
    pool.shutdown()
    info = {"objective_initial": objective_initial, "objective_final": measure(),
            "iterations": iterations, "seconds": time.perf_counter() - start, "trajectory": trajectory,
            "seconds_lap": seconds_lap, "seconds_cost_updates": seconds_cost}
    if streaming:
        info["cache"] = {"budget_bytes": cache_bytes, "hits": cache.hits, "misses": cache.misses}
    return {p: v.cpu() for p, v in perms.items()}, info
