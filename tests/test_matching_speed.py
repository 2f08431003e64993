"""Weight matching's LAP solver, stopping rule and reported trajectory (speed itself: benchmarks/bench_matching.py)."""

import pytest
import torch

import matching
from matching.weight_matching import solve_lap


@pytest.mark.parametrize("n", [5, 64, 300])
def test_lapjv_and_scipy_reach_the_same_optimum(n):
    cost = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    rows = torch.arange(n)
    values = {}
    for solver in ("lapjv", "scipy"):
        perm = solve_lap(cost, solver)
        assert torch.equal(perm.sort().values, rows)  # a permutation
        values[solver] = cost[rows, perm].double().sum().item()
    assert values["lapjv"] == pytest.approx(values["scipy"], rel=1e-6)
    assert values["lapjv"] > cost.diagonal().double().sum().item()  # it maximises


def test_lapjv_is_exact_when_rows_carry_large_offsets():
    """A unit with a large norm adds a large constant to its row. lapjv works in float32: given -cost, its
    answer fell 1.7 short of the optimum with offsets of 1e6; given each row's shortfall from its best entry
    (what solve_lap passes), it is the optimum."""
    n = 128
    gen = torch.Generator().manual_seed(0)
    cost = 1e6 * torch.randn(n, 1, generator=gen) + torch.randn(n, n, generator=gen)
    rows = torch.arange(n)
    best = cost.double()[rows, solve_lap(cost, "scipy")].sum().item()
    assert cost.double()[rows, solve_lap(cost, "lapjv")].sum().item() == best


@pytest.fixture(scope="module")
def mlp_pair():
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(matching.build_model("mlp", sizes=[16, 96, 96, 96, 10]))
    spec = matching.infer_spec(models[0], torch.randn(2, 16))
    return spec, models[0].state_dict(), models[1].state_dict()


def test_trajectory_and_time_split_reported(mlp_pair):
    spec, a, b = mlp_pair
    _, info = matching.weight_matching(spec, a, b, seed=0)
    trajectory = info["trajectory"]
    assert len(trajectory) == info["iterations"] + 1
    assert trajectory[0] == info["objective_initial"]
    assert all(later >= earlier for earlier, later in zip(trajectory, trajectory[1:]))
    assert trajectory[-1] == pytest.approx(info["objective_final"], rel=1e-5)
    assert 0 < info["seconds_lap"] + info["seconds_cost_updates"] <= info["seconds"]


def test_stopping_rule_costs_under_1e_4_of_the_objective(mlp_pair):
    spec, a, b = mlp_pair
    # random passes only (the propagating first pass converges on this pair in 2 passes: nothing to stop early)
    _, paper = matching.weight_matching(spec, a, b, seed=0, propagate=False)  # the paper's rule: zero gain
    _, tol = matching.weight_matching(spec, a, b, seed=0, rel_tol=1e-5, propagate=False)
    assert tol["iterations"] <= paper["iterations"]
    assert tol["objective_final"] >= paper["objective_final"] * (1 - 1e-4)
    # a loose tolerance stops early, and the trajectory says how much that cost
    _, loose = matching.weight_matching(spec, a, b, seed=0, rel_tol=0.05, propagate=False)
    assert loose["iterations"] < paper["iterations"]
    assert loose["objective_final"] < paper["objective_final"]


def test_propagating_first_pass_aligns_a_permuted_copy_in_one_pass_and_restores_threads():
    from matching.spec import apply_permutation, invert, perm_sizes, random_perms

    torch.manual_seed(0)
    model = matching.build_model("mlp", sizes=[16, 96, 96, 96, 96, 10])
    spec = matching.infer_spec(model, torch.randn(2, 16))
    a = model.state_dict()
    planted = random_perms(perm_sizes(spec, {k: tuple(v.shape) for k, v in a.items()}), torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    # each layer solved after the one feeding it sees aligned inputs: one pass finds the planted permutation
    perms, _ = matching.weight_matching(spec, a, apply_permutation(spec, planted, a), seed=0, max_iter=1)
    assert all(torch.equal(perms[p], invert(q)) for p, q in planted.items())
    assert torch.get_num_threads() == threads  # torch gave the LAP thread a core only while matching
