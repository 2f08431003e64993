"""Weight matching speed and quality, side by side, and barrier-evaluation overhead.

    python -m benchmarks.bench_matching [--runs 3] [--cases mlp,r20x4,r20x16,r50] [--device cpu]

Implementations (same pairs of independently initialised models, same machine, each case in a fresh
subprocess so that peak memory is its own):
- ``ours``: matching.weight_matching (LAP: scipy, lapx for n <= 128 if installed); ``ours-lapx``: lapx for all;
- ``plain``: the paper's Algorithm 1 pseudocode written out below with torch + scipy, nothing cached;
- ``pypi-rebasin``: the ``rebasin`` package from PyPI, if importable (``pip install --no-deps --target
  .venv/pypi-rebasin rebasin torchview graphviz``: our own project is also called ``rebasin``).
Objective = sum over all float tensors of <W_A, W_B'> (B' = the aligned B), so that implementations with
different specs compare; ``same fn`` says whether B' still computes B's function (max abs output diff).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

CASES = {
    "mlp": ("MLP 784-512-512-512-10", "mlp", {"sizes": [784, 512, 512, 512, 10]}, 0.1),
    "r20x4": ("ResNet20 (LayerNorm) x4", "resnet20", {"width": 4, "norm": "layer"}, 0.2),
    "r20x16": ("ResNet20 (LayerNorm) x16", "resnet20", {"width": 16, "norm": "layer"}, 6.0),
    "r50": ("ResNet50, torchvision layout", "resnet50", {}, 20.0),
}
IMPLS = ["ours", "ours-lapx", "plain", "pypi-rebasin"]
PYPI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "pypi-rebasin")


def plain_weight_matching(spec, state_a, state_b, max_iter=100, seed=0):
    """Algorithm 1 as in the paper's pseudocode: random order, full cost matrix each time, scipy LAP."""
    from scipy.optimize import linear_sum_assignment

    sizes = {p: state_a[k].shape[ax] for p, axes in spec.perm_to_axes.items() for k, ax in axes[:1]}
    perm = {p: torch.arange(n) for p, n in sizes.items()}
    names = sorted(sizes)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        progress = False
        for i in torch.randperm(len(names), generator=gen).tolist():
            p, n = names[i], sizes[names[i]]
            cost = torch.zeros(n, n)
            for key, axis in spec.perm_to_axes[p]:
                w_b = state_b[key]
                for other_axis, q in enumerate(spec.axes_to_perm[key]):
                    if q is not None and other_axis != axis:
                        w_b = torch.index_select(w_b, other_axis, perm[q])
                w_a = torch.movedim(state_a[key], axis, 0).reshape(n, -1)
                w_b = torch.movedim(w_b, axis, 0).reshape(n, -1)
                cost += w_a @ w_b.T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            old = cost[torch.arange(n), perm[p]].sum()
            new = cost[torch.arange(n), torch.as_tensor(cols)].sum()
            progress = progress or bool(new > old + 1e-12)
            perm[p] = torch.as_tensor(cols)
        if not progress:
            break
    return perm


def _models(name, options, seed):
    import matching

    torch.manual_seed(seed)
    return matching.build_model(name, **options).eval()


def _full_objective(a, b):
    return sum(torch.dot(a[k].float().reshape(-1), b[k].float().reshape(-1)).item()
               for k in a if a[k].is_floating_point())


def worker(impl, case, runs, device):
    """One implementation on one case: times, objectives, function check, peak RSS."""
    import matching
    from matching.architectures import example_input
    from matching.spec import apply_permutation

    title, name, options, _ = CASES[case]
    pairs = [(_models(name, options, 2 * r), _models(name, options, 2 * r + 1)) for r in range(runs)]
    x = example_input(name, pairs[0][0], batch=2)
    spec = matching.infer_spec(pairs[0][0], x)
    if impl == "pypi-rebasin":
        sys.path.insert(0, PYPI_PATH)
        from rebasin import PermutationCoordinateDescent
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, objectives, diffs, iterations = [], [], [], []
    for r, (model_a, model_b) in enumerate(pairs):
        a, b = model_a.state_dict(), model_b.state_dict()
        with torch.no_grad():
            expected = model_b(x)
        start = time.perf_counter()
        if impl in ("ours", "ours-lapx"):
            perms, info = matching.weight_matching(spec, a, b, seed=r, device=device,
                                                   solver="lapx" if impl == "ours-lapx" else "auto")
            iterations.append(info["iterations"])
            aligned = apply_permutation(spec, perms, b)
        elif impl == "plain":
            aligned = apply_permutation(spec, plain_weight_matching(spec, a, b, seed=r), b)
        else:
            PermutationCoordinateDescent(model_a, model_b, x).rebasin()
            aligned = model_b.state_dict()
        times.append(time.perf_counter() - start)
        objectives.append(_full_objective(a, aligned))
        check = _models(name, options, 0)
        check.load_state_dict(aligned)
        with torch.no_grad():
            diffs.append((check(x) - expected).abs().max().item())
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"times": times, "objectives": objectives, "max_diff": max(diffs), "iterations": iterations,
            "peak_extra_mb": (rss_after - rss_before) / 1024, "peak_mb": rss_after / 1024}


def barrier_timing(device):
    """25-point interpolation curve vs 25 plain forward passes over the same data."""
    import matching
    from matching.evaluate import evaluate, interpolation_curve

    rows = []
    for title, name, options, shape in [("MLP 784-512-512-512-10, 2000 ex.", "mlp", CASES["mlp"][2], (2000, 784)),
                                        ("ResNet20-LN x1, 100 ex. 32x32", "resnet20", {"width": 1, "norm": "layer"}, (100, 3, 32, 32)),
                                        ("ResNet20-BN x1, 100 ex. 32x32, BN reset", "resnet20", {"width": 1, "norm": "batch"}, (100, 3, 32, 32))]:
        gen = torch.Generator().manual_seed(0)
        inputs, targets = torch.randn(shape, generator=gen), torch.randint(0, 10, (shape[0],), generator=gen)
        model_a, model_b = _models(name, options, 0).to(device), _models(name, options, 1).to(device)
        a, b = model_a.state_dict(), model_b.state_dict()
        lambdas = [i / 24 for i in range(25)]
        evaluate(model_a, inputs[:10], targets[:10])  # warm-up
        start = time.perf_counter()
        for _ in lambdas:
            evaluate(model_a, inputs, targets)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        interpolation_curve(model_a, a, b, lambdas, inputs, targets, bn_inputs=inputs)
        curve = time.perf_counter() - start
        rows.append((title, curve, plain))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per implementation and case")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.runs, args.device)))
        return
    try:
        import lap  # noqa: F401
        solver = "scipy (lapx for n <= 128)"
    except ImportError:
        solver = "scipy (lapx not installed)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, LAP solver for 'ours': {solver}, "
          f"medians of {args.runs} runs (pairs of independently initialised models, seeds 2r and 2r+1)\n")
    header = f"{'case':30} {'impl':13} {'median s':>9} {'target':>7} {'objective':>12} {'iters':>6} {'same fn':>8} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for case in args.cases.split(","):
        title, _, _, target = CASES[case]
        for impl in args.impls.split(","):
            try:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_matching", "--worker", impl, case,
                                       "--runs", str(args.runs), "--device", args.device],
                                      capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{title:30} {impl:13} {'>' + str(args.timeout):>9}  (timed out for {args.runs} runs)", flush=True)
                continue
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or ["failed"])[-1][:70]
                print(f"{title:30} {impl:13} {'n/a':>9}  ({reason})", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            its = statistics.median(r["iterations"]) if r["iterations"] else float("nan")
            same = "yes" if r["max_diff"] <= 1e-3 else f"NO {r['max_diff']:.1g}"
            print(f"{title:30} {impl:13} {statistics.median(r['times']):9.3f} {target:7.1f} "
                  f"{statistics.median(r['objectives']):12.2f} {its:6.0f} {same:>8} {r['peak_mb']:8.0f}", flush=True)
    print("\n25-point barrier evaluation (one interpolation curve) vs 25 plain forward passes over the same data")
    for title, curve, plain in barrier_timing(args.device):
        print(f"{title:36} curve {curve:7.2f} s   25 forwards {plain:7.2f} s   ratio {curve / plain:5.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
