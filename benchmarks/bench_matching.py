"""Weight matching speed and quality, side by side, and barrier-evaluation overhead.

    python -m benchmarks.bench_matching [--runs 3] [--cases mlp,r20x4,...] [--impls ours,plain] [--device cpu]

Cases: pairs from build_model's default init (mlp, r20x4, r20x16, r50); realistic pairs: torchvision's init
with random BN running statistics (tv-r50, tv-vgg16bn), and pairs trained on digits from different seeds
(trained-r20x4, trained-vgg11; trained once, cached under benchmarks/data, which git ignores).
Implementations (same pairs, same machine, each case in a fresh subprocess so that peak memory is its own):
- ``ours``: matching.weight_matching with its defaults; ``ours-scipy``: its settings before issue 13 (scipy
  LAP, random first sweep, stop at zero gain): today's objective;
- ``plain``: the paper's Algorithm 1 pseudocode written out below with torch + scipy, nothing cached;
- ``pypi-rebasin``: the ``rebasin`` package from PyPI, if importable (``pip install --no-deps --target
  .venv/pypi-rebasin rebasin torchview graphviz``: our own project is also called ``rebasin``).
Objective = sum over all float tensors of <W_A, W_B'> (B' = the aligned B), so that implementations with
different specs compare; ``same fn`` says whether B' still computes B's function (max abs output diff).
Columns: sweeps (passes over all permutations), s/sweep, time waiting for LAPs, in cost-matrix updates, and the rest;
below the table, each run-0 objective trajectory (relative gap to the final objective after each sweep).
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

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # trained pairs, git-ignored
# case: (title, architecture, options, target seconds, how the pair is made: "init" = build_model's default
# init, "torchvision" = torchvision's init with random BN running statistics, "trained" = trained on digits)
CASES = {
    "mlp": ("MLP 784-512-512-512-10", "mlp", {"sizes": [784, 512, 512, 512, 10]}, 0.1, "init"),
    "r20x4": ("ResNet20 (LayerNorm) x4", "resnet20", {"width": 4, "norm": "layer"}, 0.2, "init"),
    "r20x16": ("ResNet20 (LayerNorm) x16", "resnet20", {"width": 16, "norm": "layer"}, 6.0, "init"),
    "r50": ("ResNet50, torchvision layout", "resnet50", {}, 20.0, "init"),
    "tv-r50": ("ResNet50, torchvision init", "resnet50", {}, 10.0, "torchvision"),
    "tv-vgg16bn": ("VGG16-BN, torchvision init", "vgg", {"config": "vgg16", "norm": "batch"}, 10.0, "torchvision"),
    "trained-r20x4": ("ResNet20 (BN) x4, trained", "resnet20", {"width": 4, "norm": "batch", "in_channels": 1}, 1.0,
                      "trained"),
    "trained-vgg11": ("VGG11-BN, trained", "vgg", {"config": "vgg11", "norm": "batch", "in_channels": 1}, 1.0,
                      "trained"),
}
IMPLS = ["ours", "ours-scipy", "plain", "pypi-rebasin"]
PYPI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "pypi-rebasin")
TRAIN_EPOCHS, TRAIN_EXAMPLES = 2, 512  # enough to move the weights far from their init; 2 cores are shared


def plain_weight_matching(spec, state_a, state_b, max_iter=100, seed=0):
    """Algorithm 1 as in the paper's pseudocode: random order, full cost matrix each time, scipy LAP.

    Returns (perms, number of sweeps)."""
    from scipy.optimize import linear_sum_assignment

    sizes = {p: state_a[k].shape[ax] for p, axes in spec.perm_to_axes.items() for k, ax in axes[:1]}
    perm = {p: torch.arange(n) for p, n in sizes.items()}
    names = sorted(sizes)
    gen = torch.Generator().manual_seed(seed)
    for sweep in range(max_iter):
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
    return perm, sweep + 1


def _torchvision_init(model, name, seed):
    """torchvision's initialisation (ResNet/VGG: kaiming-normal fan-out convs, BN weight 1 bias 0, its Linear init)
    with BN running statistics drawn at random, as a trained checkpoint has them (not the 0/1 of a fresh model)."""
    import torchvision

    torch.manual_seed(seed)
    if name == "resnet50":  # the project's ResNet-50 has torchvision's key layout
        model.load_state_dict(torchvision.models.resnet50(weights=None).state_dict())
    else:  # the project's VGG16-BN has torchvision's features.{j} layout without conv biases (torchvision's are
        # initialised to 0, and BN follows each conv); its classifier is smaller
        reference = torchvision.models.vgg16_bn(weights=None).features.state_dict()
        model.features.load_state_dict({k: reference[k] for k in model.features.state_dict()})
        for layer in model.classifier:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, 0, 0.01)
                torch.nn.init.zeros_(layer.bias)
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen))
    return model


def _digits(side=16):
    """scikit-learn's bundled digits (no download), upscaled from 8x8 to side x side, one channel (16, not
    CIFAR's 32: a quarter of the training time on the shared 2-core machine)."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return F.interpolate(x, size=side, mode="bilinear", align_corners=False), torch.tensor(data.target)


def _trained(model, case, seed):
    """Train on TRAIN_EXAMPLES digits for TRAIN_EPOCHS epochs (SGD, momentum) from ``seed``; cached under
    benchmarks/data so that reruns load it."""
    from safetensors.torch import load_file, save_file

    from cli.demo import fit

    path = os.path.join(DATA, f"{case}-seed{seed}-{TRAIN_EXAMPLES}x{TRAIN_EPOCHS}-16px.safetensors")
    if os.path.exists(path):
        model.load_state_dict(load_file(path))
        return model
    x, y = (t[:TRAIN_EXAMPLES] for t in _digits())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    fit(model, x, y, optimizer, TRAIN_EPOCHS, seed)
    os.makedirs(DATA, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return model


def _models(case, seed):
    import matching

    _, name, options, _, kind = CASES[case]
    torch.manual_seed(seed)
    model = matching.build_model(name, **options)
    if kind == "torchvision":
        model = _torchvision_init(model, name, seed)
    elif kind == "trained":
        model = _trained(model, case, seed)
    return model.eval()


def _full_objective(a, b):
    return sum(torch.dot(a[k].float().reshape(-1), b[k].float().reshape(-1)).item()
               for k in a if a[k].is_floating_point())


def worker(impl, case, runs, device):
    """One implementation on one case: times, objectives, sweeps, time split, function check, peak RSS."""
    import matching
    from matching.architectures import example_input
    from matching.spec import apply_permutation

    _, name, options, _, _ = CASES[case]
    pairs = [(_models(case, 2 * r), _models(case, 2 * r + 1)) for r in range(runs)]
    x = example_input(name, pairs[0][0], batch=2)
    spec = matching.infer_spec(pairs[0][0], x)
    if impl == "pypi-rebasin":
        sys.path.insert(0, PYPI_PATH)
        from rebasin import PermutationCoordinateDescent
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = []
    for r, (model_a, model_b) in enumerate(pairs):
        a, b = model_a.state_dict(), model_b.state_dict()
        with torch.no_grad():
            expected = model_b(x)
        row = {}
        start = time.perf_counter()
        if impl in ("ours", "ours-scipy"):  # ours-scipy: today's (before issue 13) settings
            settings = {} if impl == "ours" else {"solver": "scipy", "rel_tol": 0.0, "propagate": False}
            perms, info = matching.weight_matching(spec, a, b, seed=r, device=device, **settings)
            row.update(sweeps=info["iterations"], lap=info["seconds_lap"], cost=info["seconds_cost_updates"],
                       trajectory=info["trajectory"])
            aligned = apply_permutation(spec, perms, b)
        elif impl == "plain":
            perms, row["sweeps"] = plain_weight_matching(spec, a, b, seed=r)
            aligned = apply_permutation(spec, perms, b)
        else:
            PermutationCoordinateDescent(model_a, model_b, x).rebasin()
            aligned = model_b.state_dict()
        row["time"] = time.perf_counter() - start
        row["objective"] = _full_objective(a, aligned)
        check = matching.build_model(name, **options).eval()
        check.load_state_dict(aligned)
        with torch.no_grad():
            row["max_diff"] = (check(x) - expected).abs().max().item()
        rows.append(row)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rows": rows, "peak_extra_mb": (rss_after - rss_before) / 1024, "peak_mb": rss_after / 1024}


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
        torch.manual_seed(0)
        model_a = matching.build_model(name, **options).eval().to(device)
        torch.manual_seed(1)
        model_b = matching.build_model(name, **options).eval().to(device)
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


def _median(rows, key):
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per implementation and case")
    parser.add_argument("--no-barrier", action="store_true", help="skip the barrier-evaluation timing")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.runs, args.device)))
        return
    try:
        import lapjv  # noqa: F401
        solver = "lapjv"
    except ImportError:
        solver = "scipy (lapjv not installed)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, LAP solver for 'ours': {solver}, "
          f"medians of {args.runs} runs (pairs from seeds 2r and 2r+1), load average at start {os.getloadavg()[0]:.1f}\n")
    header = (f"{'case':30} {'impl':12} {'median s':>9} {'target':>6} {'objective':>12} {'sweeps':>6} {'s/sweep':>7} "
              f"{'LAP s':>6} {'cost s':>6} {'rest s':>6} {'same fn':>8} {'peak MB':>7}")
    print(header)
    print("-" * len(header))
    trajectories, medians = [], {}
    for case in args.cases.split(","):
        title, _, _, target, _ = CASES[case]
        for impl in args.impls.split(","):
            try:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_matching", "--worker", impl, case,
                                       "--runs", str(args.runs), "--device", args.device],
                                      capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{title:30} {impl:12} {'>' + str(args.timeout):>9}  (timed out for {args.runs} runs)", flush=True)
                continue
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or ["failed"])[-1][:70]
                print(f"{title:30} {impl:12} {'n/a':>9}  ({reason})", flush=True)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows = result["rows"]
            seconds, sweeps, lap, cost = (_median(rows, k) for k in ("time", "sweeps", "lap", "cost"))
            medians[case, impl] = seconds
            max_diff = max(r["max_diff"] for r in rows)
            same = "yes" if max_diff <= 1e-3 else f"NO {max_diff:.1g}"
            print(f"{title:30} {impl:12} {seconds:9.3f} {target:6.1f} {_median(rows, 'objective'):12.2f} {sweeps:6.0f} "
                  f"{seconds / sweeps:7.3f} {lap:6.2f} {cost:6.2f} {seconds - lap - cost:6.2f} {same:>8} "
                  f"{result['peak_mb']:7.0f}", flush=True)
            if "trajectory" in rows[0]:
                trajectories.append((title, impl, rows[0]["trajectory"]))
        if (case, "plain") in medians:
            ratios = ", ".join(f"{impl} {medians[case, 'plain'] / medians[case, impl]:.1f}x"
                               for impl in args.impls.split(",") if (case, impl) in medians and impl != "plain")
            print(f"{'':30} speed-up over plain: {ratios}", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    print("\nObjective trajectories (run 0): objective after each sweep, as the relative gap to the final one")
    for title, impl, trajectory in trajectories:
        final = trajectory[-1]
        gaps = " ".join(f"{(final - v) / abs(final):.0e}" for v in trajectory[1:])
        print(f"{title:30} {impl:12} {trajectory[0]:.6g} -> {final:.8g}: {gaps}")
    if args.no_barrier:
        return
    print("\n25-point barrier evaluation (one interpolation curve) vs 25 plain forward passes over the same data")
    for title, curve, plain in barrier_timing(args.device):
        print(f"{title:36} curve {curve:7.2f} s   25 forwards {plain:7.2f} s   ratio {curve / plain:5.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
