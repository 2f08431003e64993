"""LAP solvers on the cost matrices that weight matching actually solves.

    python -m benchmarks.bench_lap [--cases trained-r20x4,trained-vgg11,tv-r50] [--repeats 3]

For each case (bench_matching's pairs, pair 0/1), one weight_matching run records every cost matrix it hands to
the solver; each matrix is then solved by each solver alone (best of --repeats), and the seconds are summed by
matrix size. Solvers: ``lapjv`` as solve_lap calls it (each row's shortfall from its best entry), ``lapjv -cost``
(the package on the negated matrix, as before), ``scipy``. Every solver's optimum is checked against the best.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections import defaultdict

import numpy as np
import torch
from lapjv import lapjv

from matching.weight_matching import solve_lap

SOLVERS = {
    "lapjv": lambda cost: solve_lap(cost, "lapjv"),
    "lapjv -cost": lambda cost: torch.as_tensor(np.asarray(lapjv(np.ascontiguousarray(-cost.numpy()))[0], dtype=np.int64)),
    "scipy": lambda cost: solve_lap(cost, "scipy"),
}
SCIPY_UP_TO = 1024  # scipy takes seconds a solve above this


def recorded_costs(case: str) -> list[torch.Tensor]:
    import matching
    from benchmarks.bench_matching import CASES, _models
    from matching.architectures import example_input

    module = importlib.import_module("matching.weight_matching")  # the package's name is the function's
    model_a, model_b = _models(case, 0), _models(case, 1)
    spec = matching.infer_spec(model_a, example_input(CASES[case][1], model_a, batch=2))
    costs, solve = [], module.solve_lap

    def recording(cost, solver="auto"):
        costs.append(cost.detach().cpu().clone())
        return solve(cost, solver)

    module.solve_lap = recording
    try:
        matching.weight_matching(spec, model_a.state_dict(), model_b.state_dict(), seed=0)
    finally:
        module.solve_lap = solve
    return costs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="trained-r20x4,trained-vgg11,tv-r50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"{'case':16} {'n':>5} {'solves':>6} " + " ".join(f"{name + ' s':>13}" for name in SOLVERS))
    for case in args.cases.split(","):
        seconds = defaultdict(lambda: defaultdict(float))
        counts = defaultdict(int)
        for cost in recorded_costs(case):
            n = len(cost)
            counts[n] += 1
            values = {}
            for name, solve in SOLVERS.items():
                if name == "scipy" and n > SCIPY_UP_TO:
                    continue
                best = float("inf")
                for _ in range(args.repeats if n < 1024 else 1):
                    start = time.perf_counter()
                    cols = solve(cost)
                    best = min(best, time.perf_counter() - start)
                seconds[n][name] += best
                values[name] = cost.double()[torch.arange(n), cols].sum().item()
            top = max(values.values())
            wrong = [name for name, v in values.items() if v < top - 1e-6 * max(abs(top), 1.0)]
            assert not wrong, f"{case}, n={n}: {wrong} short of the optimum"
        for n in sorted(counts):
            print(f"{case:16} {n:5d} {counts[n]:6d} " + " ".join(
                f"{seconds[n][name]:13.4f}" if name in seconds[n] else f"{'-':>13}" for name in SOLVERS))
        # a solver skipped at some size has no total
        totals = {name: sum(seconds[n][name] for n in counts) for name in SOLVERS if all(name in seconds[n] for n in counts)}
        print(f"{case:16} {'all':>5} {sum(counts.values()):6d} " + " ".join(
            f"{totals[name]:13.4f}" if name in totals else f"{'-':>13}" for name in SOLVERS), flush=True)


if __name__ == "__main__":
    main()
