"""Merge quality on trained pairs: naive, weight matching and activation matching (and STE, auto on request),
each without and with the statistics correction a job applies, on held-out data.

    python -m benchmarks.bench_quality                       # the default cases, 1 seed pair (a few minutes)
    python -m benchmarks.bench_quality --cases all --pairs 2 --methods weight,activation,ste

Cases (trained here from fixed seeds, as ``benchmarks/reproduce.py`` trains them, offline data):

- ``mlp-digits-64``, ``mlp-mnist1d-W`` (W in 64, 128, 256, 512, 1024): 3 hidden layers, Adam 1e-3, 20 epochs;
- ``resnet20-bn-x1``, ``resnet20-bn-x4``, ``vgg11-bn`` (SGD, then exact BN statistics), ``resnet20-ln-x1``,
  ``resnet20-ln-x4`` (GroupNorm, Adam): digits 8x8, 6 epochs; ``vgg11-bn-32``: VGG11-BN as the reproduction
  suite's full run trains it (32x32, SGD 0.01, CIFAR's shifted crops);
- ``gpt``: the built-in decoder (2 blocks, width 32, 4 heads) on the generated copy task (``cli.demo.copy_tokens``;
  accuracies over next-token positions, the first half of each sequence is unpredictable), Adam 3e-3, 10 epochs.
  As ``tests/test_transformers_trained.py`` trains it;
- ``vit-tiny``: timm's ViT (``timm/vit_tiny_patch16_224`` built with ``img_size=8``, patches 4x4, 2 blocks of width
  32, 4 heads) on digits 8x8, SGD 0.05, 30 epochs, as that test trains it.

Every merge is ``matching.merge_checkpoints`` (what a job runs) with the job's default correction: BN networks
"reset" (BN statistics re-estimated at every lambda), others "repair" (REPAIR). Columns (held-out split): loss
barrier without correction ("plain") and with it ("+fix"), the cut (1 - fix/plain), the accuracy barrier with the
correction, the corrected midpoint's accuracy, the endpoints' mean accuracy and the two-model ensemble's (mean of
the softmax outputs). Barrier: max over lambda of L(lambda) - ((1-lambda) L(0) + lambda L(1)).

To compare with another tree's library, run this file with that tree first on PYTHONPATH (its ``matching`` and
``benchmarks.reproduce`` are imported from there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: a tree on PYTHONPATH comes first

import matching  # noqa: E402
from benchmarks.reproduce import SETTINGS, conv_models, digits, mnist1d, train, train_conv, write_dataset  # noqa: E402
from cli.demo import copy_tokens, fit  # noqa: E402
from cli.demo import train as sgd_train  # noqa: E402
from matching.evaluate import barrier, evaluate, interpolation_curves  # noqa: E402

DEFAULT_CASES = ["mlp-digits-64", "resnet20-bn-x1", "vgg11-bn", "resnet20-ln-x1"]
MLP_WIDTHS = [64, 128, 256, 512, 1024]
CONV = {"resnet20-bn-x1": ("ResNet20-BN", 1), "resnet20-bn-x4": ("ResNet20-BN", 4), "vgg11-bn": ("VGG11-BN", None),
        "resnet20-ln-x1": ("ResNet20-LN", 1), "resnet20-ln-x4": ("ResNet20-LN", 4)}
GPT = {"vocab_size": 16, "block_size": 15, "n_layer": 2, "n_head": 4, "n_embd": 32}
VIT = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2,
       "num_classes": 10}
ALL_CASES = ["mlp-digits-64", *[f"mlp-mnist1d-{w}" for w in MLP_WIDTHS], *CONV, "vgg11-bn-32", "gpt", "vit-tiny"]
CONV_EPOCHS, MLP_EPOCHS = 6, 20


def case_setup(case: str):
    """(architecture name, options, data, train(seed) -> state dict)."""
    if case.startswith("mlp-"):
        _, source, width = case.split("-")
        data = digits() if source == "digits" else mnist1d()
        options = {"sizes": [data[0].shape[1], *[int(width)] * 3, 10]}
        return "mlp", options, data, lambda seed: train("mlp", options, data, seed, MLP_EPOCHS)
    if case == "gpt":
        data = copy_tokens()

        def fit_gpt(seed):
            torch.manual_seed(seed)
            model = matching.build_model("gpt", **GPT)
            fit(model, data[0], data[1], torch.optim.Adam(model.parameters(), lr=3e-3), 10, seed)
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
        return "gpt", GPT, data, fit_gpt
    if case == "vit-tiny":
        data, name = digits(8), "timm/vit_tiny_patch16_224"
        return name, VIT, data, lambda seed: sgd_train(name, VIT, data[0], data[1], seed, 30, 0.05)
    if case == "vgg11-bn-32":  # the reproduction suite's VGG11-BN: 32x32, CIFAR's shifted crops
        name, options, lr, side = conv_models(SETTINGS["full"])["VGG11-BN"]
        options, data = {**options, "num_classes": 10, "in_channels": 1}, digits(side)
        augment = SETTINGS["full"]["vgg_augment"]
        return name, options, data, lambda seed: train_conv(name, options, data, seed, CONV_EPOCHS, lr, augment)
    title, width = CONV[case]
    name, options, lr, side = conv_models({"vgg_width": 0.25, "resnet_width": width, "conv_lr": 0.05,
                                           "vgg_side": 8, "vgg_bn_lr": 0.05, "resnet_side": 8})[title]
    options = {**options, "num_classes": 10, "in_channels": 1}
    data = digits(side)
    return name, options, data, lambda seed: train_conv(name, options, data, seed, CONV_EPOCHS, lr)


def ensemble_accuracy(model, states, inputs, targets) -> float:
    probs = 0
    for state in states:
        model.load_state_dict(state)
        with torch.no_grad():
            probs = probs + model.eval()(inputs).softmax(-1)  # [N, T, vocab] for a language model: per position
    return (probs.argmax(-1) == targets).float().mean().item()


def measure_pair(case, name, options, data, data_file, states, methods, lambdas, extra_options):
    """Rows {method: {...}} for one trained pair."""
    model = matching.build_model(name, **options)
    xe, ye = data[2], data[3]
    bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    grid = [i / (lambdas - 1) for i in range(lambdas)]
    mid = len(grid) // 2

    def plain(b_state):  # no statistics correction at all (a BN job's own curves include the reset)
        curve = interpolation_curves(model, states[0], b_state, grid, {"held_out": (xe, ye)})["held_out"]
        return barrier(curve["loss"], grid)

    ends = []
    for state in states:
        model.load_state_dict(state)
        ends.append(evaluate(model.eval(), xe, ye)["accuracy"])
    common = {"endpoints_acc": statistics.fmean(ends), "ensemble_acc": ensemble_accuracy(model, states, xe, ye)}
    rows = {}
    for method in methods:
        started = time.perf_counter()
        outcome = matching.merge_checkpoints(states, method=f"{method}_matching" if method != "auto" else "auto",
                                             architecture={"name": name, "options": options}, dataset=data_file,
                                             options={"lambdas": lambdas, **extra_options.get(method, {})})
        seconds = time.perf_counter() - started
        report = outcome.report
        fixed = "aligned" if bn or "aligned_repair" not in report["barrier"] else "aligned_repair"
        if not rows:  # naive, from the first merge's report
            naive_fixed = report["barrier"]["naive"]["loss"] if bn else None
            rows["naive"] = {"plain": plain(states[1]) if bn else report["barrier"]["naive"]["loss"],
                             "fixed": naive_fixed,
                             "acc_barrier": report["barrier"]["naive"]["accuracy"] if bn else None,
                             "mid_acc": report["curves"]["naive"]["accuracy"][mid] if bn else None, **common}
        row = {"plain": plain(outcome.aligned[0]) if bn else report["barrier"]["aligned"]["loss"],
               "fixed": report["barrier"][fixed]["loss"], "acc_barrier": report["barrier"][fixed]["accuracy"],
               "mid_acc": report["curves"][fixed]["accuracy"][mid], "seconds": seconds, **common}
        if method == "auto":
            row["chosen"] = report.get("auto", {}).get("chosen")
        rows[method] = row
    return rows


def fmt(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: dict) -> str:
    lines = ["| case | method | plain | +fix | cut | acc barrier +fix | mid acc +fix | endpoints acc | ensemble acc |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case, pairs in results.items():
        for method in pairs[0]:
            rows = [p[method] for p in pairs]
            cuts = [1 - r["fixed"] / r["plain"] if r["fixed"] is not None and r["plain"] > 0 else None for r in rows]
            label = method + (f" ({', '.join(str(r.get('chosen')) for r in rows)})" if method == "auto" else "")
            lines.append(f"| {case} | {label} | {fmt([r['plain'] for r in rows])} | {fmt([r['fixed'] for r in rows])} | "
                         f"{fmt(cuts, 2)} | {fmt([r['acc_barrier'] for r in rows])} | {fmt([r['mid_acc'] for r in rows])} | "
                         f"{fmt([r['endpoints_acc'] for r in rows])} | {fmt([r['ensemble_acc'] for r in rows])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated, or 'all' (default {','.join(DEFAULT_CASES)}; all: {','.join(ALL_CASES)})")
    parser.add_argument("--pairs", type=int, default=1, help="seed pairs (0, 1), (2, 3), ... (default 1)")
    parser.add_argument("--methods", default="weight,activation", help="weight, activation, ste, auto (default weight,activation)")
    parser.add_argument("--lambdas", type=int, default=5, help="points on the line (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = ALL_CASES if args.cases == "all" else args.cases.split(",")
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {ALL_CASES}")
    methods = args.methods.split(",")
    extra = {"ste": {"steps": 100, "batch_size": 128}}
    results = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            name, options, data, fit = case_setup(case)
            data_file = write_dataset(Path(tmp) / f"{case}.safetensors", data)
            results[case] = []
            for pair in range(args.pairs):
                states = [fit(seed) for seed in (2 * pair, 2 * pair + 1)]
                results[case].append(measure_pair(case, name, options, data, data_file, states, methods,
                                                  args.lambdas, extra))
                print(f"{case} pair {pair}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print(f"matching from {Path(matching.__file__).parent}; {args.lambdas} lambdas; seed pairs "
          f"{[(2 * p, 2 * p + 1) for p in range(args.pairs)]}; {time.perf_counter() - started:.0f} s\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
