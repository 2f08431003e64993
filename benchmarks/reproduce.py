"""Reproduce the claims of Git Re-Basin (Ainsworth et al., ICLR 2023) and REPAIR (Jordan et al., ICLR 2023)
through the library, exactly as a job runs them (``matching.merge_checkpoints``), on data made offline:
scikit-learn's bundled digits and MNIST-1D (the ``mnist1d`` package generates it in code).

    python benchmarks/reproduce.py [--quick] [--out DIR]

Writes DIR/report.md (tables stating for each claim whether the measurement agrees), DIR/*.png and
DIR/results.json. --quick (CI): digits only, one or two seed pairs, a few epochs; the full run adds MNIST-1D
and more seeds, widths and epochs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matching  # noqa: E402
from cli.demo import fit, train as sgd_train  # noqa: E402
from matching.evaluate import barrier, interpolation_curves, reset_batchnorm  # noqa: E402

SETTINGS = {
    "quick": {"mlp_data": "digits", "pairs": 1, "mlp_width": 64, "mlp_epochs": 10, "widths": [8, 16, 32, 64],
              "width_epochs": 10, "epoch_grid": [1, 3, 10], "ste_steps": 30, "conv_epochs": 3, "conv_lr": 0.05,
              "conv_lambdas": 3, "conv_methods": ["weight", "activation"], "vgg_width": 0.25, "resnet_width": 1,
              "vgg_side": 8, "vgg_bn_lr": 0.05, "resnet_side": 8, "many": [3], "many_widths": [64], "lambdas": 3,
              "disjoint_width": 128, "disjoint_epochs": 20},
    "full": {"mlp_data": "mnist1d", "pairs": 2, "mlp_width": 128, "mlp_epochs": 20, "widths": [16, 32, 64, 128, 256],
             "width_epochs": 20, "epoch_grid": [1, 3, 10, 30], "ste_steps": 100,
             "conv_epochs": 6, "conv_lr": 0.05, "conv_lambdas": 5, "conv_methods": ["weight", "activation"],
             "vgg_width": 0.25, "resnet_width": 1, "resnet_wide": 4, "vgg_side": 32, "vgg_bn_lr": 0.01, "vgg_augment": 8,
             "resnet_side": 8,
             "many": [3, 5],
             "many_widths": [128, 256], "many_wide": [512, 1024],
             "lambdas": 11, "disjoint_width": 512, "disjoint_epochs": 5},
}


# ---------------------------------------------------------------------------------------------- data and training
def digits(side: int | None = None):
    """Digits (1797 8x8 images), the tests' fixed 1347/450 split, inputs in [0, 1]; images upscaled to side x side."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    if side is not None:
        x = x.reshape(-1, 1, 8, 8)
        if side != 8:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[:1347]], y[order[:1347]], x[order[1347:]], y[order[1347:]]


def mnist1d():
    """MNIST-1D with the package's default arguments (4000 train / 1000 test, length 40, seed 42)."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)
    return as_x(data["x"]), as_y(data["y"]), as_x(data["x_test"]), as_y(data["y_test"])


def write_dataset(path: Path, data) -> Path:
    x, y, xe, ye = data
    save_file({"inputs": x.contiguous(), "targets": y, "eval_inputs": xe.contiguous(), "eval_targets": ye}, str(path))
    return path


def train(name: str, options: dict, data, seed: int, epochs: int, lr: float = 1e-3) -> dict:
    """Adam, batch 64, fixed seed (initialisation and batch order)."""
    torch.manual_seed(seed)
    model = matching.build_model(name, **options)
    fit(model, data[0], data[1], torch.optim.Adam(model.parameters(), lr=lr), epochs, seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def shifted_copies(images: torch.Tensor, targets: torch.Tensor, copies: int, seed: int):
    """CIFAR's training augmentation (zero-pad 4 pixels, crop back at a random offset) as ``copies`` shifted copies
    of the training split, drawn once from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    side = images.shape[-1]
    padded = F.pad(images, (4, 4, 4, 4))
    out = []
    for _ in range(copies):
        dx, dy = (torch.randint(0, 9, (len(images),), generator=gen) for _ in range(2))
        out.append(torch.stack([p[:, y:y + side, x:x + side] for p, x, y in zip(padded, dx.tolist(), dy.tolist())]))
    return torch.cat(out), targets.repeat(copies)


def train_conv(name: str, options: dict, data, seed: int, epochs: int, lr: float, augment: int = 0) -> dict:
    """BN nets: SGD (momentum 0.9), then their running statistics computed exactly on the training split: after a
    high learning rate the EMA ones lag the weights, which made the eval-mode endpoints worse than the nets are and
    their barrier (measured against those endpoints) meaninglessly small. GroupNorm nets: Adam (SGD at these rates
    leaves VGG11-LN at chance on digits, and Adam 1e-3 one of its two seeds). ``augment``: an epoch is that many
    shifted copies of the training split (``shifted_copies``)."""
    x, y = shifted_copies(data[0], data[1], augment, seed) if augment else data[:2]
    if options["norm"] != "batch":
        return train(name, options, (x, y), seed, epochs, lr)
    state = sgd_train(name, options, x, y, seed, epochs, lr)
    model = matching.build_model(name, **options)
    model.load_state_dict(state)
    reset_batchnorm(model, data[0])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def merge(states, name, data_file, method="weight_matching", **options):
    return matching.merge_checkpoints(states, method=method, architecture={"name": name}, dataset=data_file,
                                      options=options)


def mean_sd(values):
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values, digits=3):
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def verdict(ok: bool) -> str:
    return "**agrees**" if ok else "**disagrees**"


# ---------------------------------------------------------------------------------------------- experiments
def methods_experiment(cfg, mlp_data, data_file, seeds):
    """Figure 2: naive vs weight vs activation vs STE matching, MLP, several seed pairs."""
    sizes = [mlp_data[0].shape[1], *[cfg["mlp_width"]] * 3, 10]
    rows = {m: {"held_out": [], "train": []} for m in ("naive", "weight", "activation", "ste")}
    curves = {}
    for a_seed, b_seed in seeds:
        states = [train("mlp", {"sizes": sizes}, mlp_data, s, cfg["mlp_epochs"]) for s in (a_seed, b_seed)]
        for method, extra in (("weight", {}), ("activation", {}),
                              ("ste", {"steps": cfg["ste_steps"], "learning_rate": 1e-3, "batch_size": 128})):
            report = matching.merge_checkpoints(states, method=f"{method}_matching", architecture={"name": "mlp"},
                                                dataset=data_file, options={"lambdas": cfg["lambdas"], "repair": "none",
                                                                            "seed": a_seed, **extra}).report
            if method == "weight":
                rows["naive"]["held_out"].append(report["barrier"]["naive"]["loss"])
                rows["naive"]["train"].append(report["barrier_train"]["naive"]["loss"])
                curves["naive"] = report["curves"]["naive"]["loss"]
            rows[method]["held_out"].append(report["barrier"]["aligned"]["loss"])
            rows[method]["train"].append(report["barrier_train"]["aligned"]["loss"])
            curves[method] = report["curves"]["aligned"]["loss"]
            curves["lambdas"] = report["curves"]["lambdas"]
    return {"sizes": sizes, "barriers": rows, "last_pair_curves": curves}


def width_experiment(cfg, mlp_data, data_file, seeds):
    out = {}
    for width in cfg["widths"]:
        sizes = [mlp_data[0].shape[1], width, width, width, 10]
        row = {f"{k}{split}": [] for k in ("naive", "aligned", "aligned_repair") for split in ("", "_train", "_acc")}
        for a_seed, b_seed in seeds:
            states = [train("mlp", {"sizes": sizes}, mlp_data, s, cfg["width_epochs"]) for s in (a_seed, b_seed)]
            report = merge(states, "mlp", data_file, lambdas=cfg["lambdas"], repair="repair").report
            for k in ("naive", "aligned", "aligned_repair"):
                row[k].append(report["barrier"][k]["loss"])
                row[f"{k}_train"].append(report["barrier_train"][k]["loss"])
                row[f"{k}_acc"].append(report["barrier"][k]["accuracy"])
        out[width] = row
    return out


def epochs_experiment(cfg, mlp_data, data_file, seeds):
    sizes = [mlp_data[0].shape[1], *[cfg["mlp_width"]] * 3, 10]
    out = {}
    for epochs in cfg["epoch_grid"]:
        naive, aligned = [], []
        for a_seed, b_seed in seeds:
            states = [train("mlp", {"sizes": sizes}, mlp_data, s, epochs) for s in (a_seed, b_seed)]
            report = merge(states, "mlp", data_file, lambdas=cfg["lambdas"], repair="none").report
            naive.append(report["barrier"]["naive"]["loss"])
            aligned.append(report["barrier"]["aligned"]["loss"])
        out[epochs] = {"naive": naive, "aligned": aligned}
    return out


def conv_models(cfg) -> dict:
    """{title: (architecture, options, learning rate, input side)}. BN nets: SGD; GroupNorm ("LN") nets: Adam (see
    train_conv). Digits are upscaled to the side: VGG11 pools five times, so at 8x8 its last four convs see 1x1 maps
    (the paper's VGG runs are on CIFAR-10, 32x32); ResNet20 pools twice and keeps the cheaper side. VGG11-BN's
    learning rate: at 32x32, SGD 0.05 for 6 epochs leaves its endpoints at 0.34-0.68 training-split accuracy
    (seeds 0-3), 0.02 at 0.70-1.00, 0.01 at 0.94-1.00 (chosen on the training split, not on any merge). Full runs
    train VGG11 with CIFAR's shifted crops (``vgg_augment`` copies of the training split an epoch), as the papers'
    CIFAR-10 runs do: without them weight matching + BN reset cut VGG11-BN's barrier 23-34% (docs/merge-quality.md)."""
    vgg, resnet = {"config": "vgg11", "width": cfg["vgg_width"]}, {"width": cfg["resnet_width"]}
    return {"VGG11-BN": ("vgg", {**vgg, "norm": "batch"}, cfg["vgg_bn_lr"], cfg["vgg_side"]),
            "VGG11-LN": ("vgg", {**vgg, "norm": "layer"}, 3e-4, cfg["vgg_side"]),
            "ResNet20-BN": ("resnet20", {**resnet, "norm": "batch"}, cfg["conv_lr"], cfg["resnet_side"]),
            "ResNet20-LN": ("resnet20", {**resnet, "norm": "layer"}, 1e-3, cfg["resnet_side"]),
            # Issue 23: the corrected midpoint of a wide ResNet20-BN is within 10 points of its endpoints.
            **({f"ResNet20-BN x{cfg['resnet_wide']}": ("resnet20", {"width": cfg["resnet_wide"], "norm": "batch"},
                                                       cfg["conv_lr"], cfg["resnet_side"])} if "resnet_wide" in cfg else {})}


def conv_label(cfg, title: str) -> str:
    """The model's title with its input side, e.g. 'VGG11-BN (32x32)': rows of different sides are not comparable."""
    side = conv_models(cfg)[title][3]
    return f"{title} ({side}x{side})"


def conv_experiment(cfg, image_data, data_file, seeds, title):
    """One of conv_models, BatchNorm or LayerNorm: naive; then for each matching method, aligned, and aligned + the
    correction the job applies (BN nets: BN reset; LN nets: REPAIR), with the corrected midpoint's accuracy (chance
    is 0.1: a midpoint at chance puts any barrier near ln 10 minus the endpoints' loss, whatever the model, which is
    what two BN nets both showing 1.96 meant in an earlier run)."""
    name, options, lr, _ = conv_models(cfg)[title]  # image_data: digits at that side
    options = {**options, "num_classes": 10, "in_channels": 1}
    x, y, xe, ye = image_data
    lambdas = [i / (cfg["conv_lambdas"] - 1) for i in range(cfg["conv_lambdas"])]
    mid = len(lambdas) // 2
    bn = "BN" in title
    rows = {"endpoint_acc": [], "naive": []}
    rows.update({f"{m}_{k}": [] for m in cfg["conv_methods"]
                 for k in ("aligned", "corrected", "corrected_train", "midpoint_acc")})
    for a_seed, b_seed in seeds:
        augment = cfg.get("vgg_augment", 0) if name == "vgg" else 0
        states = [train_conv(name, options, image_data, s, cfg["conv_epochs"], lr, augment) for s in (a_seed, b_seed)]
        model = matching.build_model(name, **options)
        # Without any statistics correction (a BN job's own naive/aligned curves include the reset).
        plain = lambda b: barrier(interpolation_curves(model, states[0], b, lambdas,
                                                       {"held_out": (xe, ye)})["held_out"]["loss"], lambdas)
        for method in cfg["conv_methods"]:
            outcome = merge(states, name, data_file, method=f"{method}_matching", lambdas=cfg["conv_lambdas"],
                            repair="reset" if bn else "repair")
            report = outcome.report
            corrected = "aligned" if bn else "aligned_repair"
            if method == cfg["conv_methods"][0]:
                rows["naive"].append(plain(states[1]) if bn else report["barrier"]["naive"]["loss"])
                rows["endpoint_acc"].append(statistics.fmean(report["curves"]["aligned"]["accuracy"][i] for i in (0, -1)))
            rows[f"{method}_aligned"].append(plain(outcome.aligned[0]) if bn else report["barrier"]["aligned"]["loss"])
            rows[f"{method}_corrected"].append(report["barrier"][corrected]["loss"])
            rows[f"{method}_corrected_train"].append(report["barrier_train"][corrected]["loss"])
            rows[f"{method}_midpoint_acc"].append(report["curves"][corrected]["accuracy"][mid])
    return rows


def merge_many_experiment(cfg, mlp_data, data_file, seeds_flat, width):
    """MergeMany of the first 3 (5) of the models, repair none and repair (the default for MLPs)."""
    sizes = [mlp_data[0].shape[1], *[width] * 3, 10]
    states = [train("mlp", {"sizes": sizes}, mlp_data, s, cfg["mlp_epochs"]) for s in seeds_flat[:max(cfg["many"])]]
    out = {}
    for n in cfg["many"]:
        row = {}
        for mode in ("none", "repair"):
            report = merge(states[:n], "mlp", data_file, lambdas=2, repair=mode).report
            many = report["merge_many"]
            row[mode] = {"merged": many["merged"], "naive_average": many["naive_average"], "inputs": many["inputs"]}
        out[n] = row
    return out


def biased_split(targets: torch.Tensor, seed: int = 0, share: float = 0.2):
    """Indices of the training examples for A and B (the paper's Figure 5 split, 10 classes instead of 100): A takes
    ``share`` of the examples of classes 0-4 and 1 - ``share`` of classes 5-9, B the rest; disjoint, together all."""
    gen = torch.Generator().manual_seed(seed)
    a, b = [], []
    for label in range(10):
        idx = (targets == label).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = round(len(idx) * (share if label < 5 else 1 - share))
        a.append(idx[:cut])
        b.append(idx[cut:])
    return torch.cat(a).sort().values, torch.cat(b).sort().values


def disjoint_experiment(cfg, data, data_file, seeds):
    """Git Re-Basin's Figure 5 (the claim issue 24 cites): two MLPs trained on biased halves of the training split
    (A: 20% of classes 0-4, 80% of 5-9; B the reverse), merged by weight matching as a job merges them (the
    job's dataset: the whole training split for the statistics, the held-out split on all 10 classes for the
    report), at lambda 0.5, without correction (the paper's) and with the MLP default (REPAIR). Held-out loss on
    the combined data of A, B, the merged model, the naive average (midpoint of the naive curve) and the
    two-model ensemble (mean of the softmax outputs)."""
    sizes = [data[0].shape[1], *[cfg["disjoint_width"]] * 3, 10]
    halves = biased_split(data[1])
    model = matching.build_model("mlp", sizes=sizes)
    out = {"sizes": sizes, "train_examples": [len(h) for h in halves], "pairs": []}
    for a_seed, b_seed in seeds:
        states = [train("mlp", {"sizes": sizes}, (data[0][h], data[1][h]), s, cfg["disjoint_epochs"])
                  for h, s in zip(halves, (a_seed, b_seed))]
        probs = 0
        for state in states:
            model.load_state_dict(state)
            with torch.no_grad():
                probs = probs + model.eval()(data[2]).softmax(-1) / 2
        row = {"ensemble": {"loss": F.nll_loss(probs.log(), data[3]).item(),
                            "accuracy": (probs.argmax(-1) == data[3]).float().mean().item()}}
        for mode in ("none", "repair"):
            report = merge(states, "mlp", data_file, lambdas=3, repair=mode).report
            curve = report["curves"]["naive"]
            row[mode] = {"merged": report["merged"],
                         "a": {"loss": curve["loss"][0], "accuracy": curve["accuracy"][0]},
                         "b": {"loss": curve["loss"][-1], "accuracy": curve["accuracy"][-1]},
                         "naive": {"loss": curve["loss"][1], "accuracy": curve["accuracy"][1]}}
        out["pairs"].append(row)
    return out


# ---------------------------------------------------------------------------------------------- report
def plot(out_dir: Path, results: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    files = []
    curves = results["methods"]["last_pair_curves"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name in ("naive", "weight", "activation", "ste"):
        ax.plot(curves["lambdas"], curves[name], marker=".", label=name)
    ax.set(xlabel="lambda", ylabel="held-out loss", title="MLP interpolation by matching method (last seed pair)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "methods.png", dpi=90)
    files.append("methods.png")

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    widths = sorted(results["width"], key=int)
    for key in ("naive", "aligned", "aligned_repair"):
        ax.errorbar([int(w) for w in widths], [mean_sd(results["width"][w][key])[0] for w in widths],
                    yerr=[mean_sd(results["width"][w][key])[1] for w in widths], marker="o", label=key, capsize=3)
    ax.set(xscale="log", xlabel="hidden width", ylabel="held-out loss barrier", title="Barrier against width (MLP)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "width.png", dpi=90)
    files.append("width.png")

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    grid = sorted(results["epochs"], key=int)
    for key in ("naive", "aligned"):
        ax.errorbar([int(e) for e in grid], [mean_sd(results["epochs"][e][key])[0] for e in grid],
                    yerr=[mean_sd(results["epochs"][e][key])[1] for e in grid], marker="o", label=key, capsize=3)
    ax.set(xscale="log", xlabel="training epochs", ylabel="held-out loss barrier", title="Barrier against training time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "epochs.png", dpi=90)
    files.append("epochs.png")

    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    titles = list(results["conv"])
    methods = results["settings"]["conv_methods"]
    keys = ["naive", *[f"{m}_{k}" for m in methods for k in ("aligned", "corrected")]]
    step = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar([t + (i - (len(keys) - 1) / 2) * step for t in range(len(titles))],
               [mean_sd(results["conv"][t][key])[0] for t in titles], step, label=key.replace("_aligned", ": aligned").replace("_corrected", ": + reset/REPAIR"))
    ax.set_xticks(range(len(titles)), [conv_label(results["settings"], t) for t in titles])
    ax.set(ylabel="held-out loss barrier", title="Conv nets on digits (BN nets: reset; LN nets: REPAIR)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_dir / "conv.png", dpi=90)
    files.append("conv.png")
    return files


def report_markdown(results: dict, cfg: dict, mode: str, seconds: float) -> str:
    seeds = results["seeds"]
    pair_text = ", ".join(f"({a}, {b})" for a, b in seeds)
    m = results["methods"]["barriers"]
    held = {k: mean_sd(v["held_out"])[0] for k, v in m.items()}
    lines = [f"# Reproduction of Git Re-Basin and REPAIR claims ({mode} run)", "",
             f"`python benchmarks/reproduce.py{' --quick' if mode == 'quick' else ''}`: {seconds / 60:.1f} min, "
             f"{results['jobs']} process(es) of {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPU(s), load "
             f"average {results['load'][0]:.1f} at the start and {results['load'][1]:.1f} at the end; torch "
             f"{torch.__version__}, mnist1d {importlib.metadata.version('mnist1d')}, numpy {numpy.__version__}. "
             "Every merge is "
             "`matching.merge_checkpoints` (what a job runs). Barrier = Definition 2.2 on the loss, "
             "max over lambda of L(lambda) - ((1-lambda) L(0) + lambda L(1)), on the held-out split unless "
             f"named otherwise; mean ± sd over seed pairs {pair_text}. MLP data: {results['mlp_data']}.", ""]

    claims = []
    tol = max(0.02, 0.3 * held["weight"])
    ok = held["ste"] <= min(held["weight"], held["activation"]) + tol and abs(held["weight"] - held["activation"]) <= tol \
        and max(held["weight"], held["activation"], held["ste"]) < 0.5 * held["naive"]
    claims.append(("Fig. 2: STE <= activation ~ weight << naive (MLP)",
                   f"naive {held['naive']:.3f}, weight {held['weight']:.3f}, activation {held['activation']:.3f}, "
                   f"STE {held['ste']:.3f} (tolerance {tol:.3f}; '<<': below half of naive)", ok))
    widths = sorted(results["width"], key=int)
    pairs = [(i, j) for i in range(len(widths)) for j in range(i + 1, len(widths))]
    for key, split in (("aligned", "held-out"), ("aligned_train", "train")):
        aligned_w = [mean_sd(results["width"][w][key])[0] for w in widths]
        falling = sum(aligned_w[j] <= aligned_w[i] for i, j in pairs) / len(pairs)
        claims.append((f"Width: wider models, lower barrier after matching ({split} loss)",
                       "aligned barrier by width " + ", ".join(f"{w}: {b:.3f}" for w, b in zip(widths, aligned_w))
                       + f"; {falling:.0%} of width pairs ordered", falling >= 0.8 and aligned_w[-1] < aligned_w[0]))
    lower = {name: sum(mean_sd(results["width"][w][f"aligned_repair{key}"])[0] < mean_sd(results["width"][w][f"aligned{key}"])[0]
                       for w in widths) for key, name in (("", "held-out loss"), ("_train", "train loss"), ("_acc", "held-out accuracy"))}
    claims.append(("MLP (no norm): REPAIR lowers the aligned barrier at every width",
                   "widths where it is lower: " + ", ".join(f"{name} {n}/{len(widths)}" for name, n in lower.items()),
                   lower["held-out loss"] == lower["train loss"] == len(widths)))
    grid = sorted(results["epochs"], key=int)
    aligned_e = [mean_sd(results["epochs"][e]["aligned"])[0] for e in grid]
    naive_e = [mean_sd(results["epochs"][e]["naive"])[0] for e in grid]
    claims.append(("Training time: after matching the barrier stays far below naive at every training length (where "
                   "there is a naive barrier, >= 0.1)",
                   "epochs: aligned / naive " + ", ".join(f"{e}: {a:.3f} / {n:.3f}" for e, a, n in zip(grid, aligned_e, naive_e)),
                   all(a < 0.5 * n or n < 0.1 for a, n in zip(aligned_e, naive_e))))
    for title, rows in results["conv"].items():
        for method in cfg["conv_methods"]:
            base, fixed = mean_sd(rows[f"{method}_aligned"])[0], mean_sd(rows[f"{method}_corrected"])[0]
            midpoint = mean_sd(rows[f"{method}_midpoint_acc"])[0]
            cut = (base - fixed) / base if base > 0 else 0.0
            fix = "BN reset" if "BN" in title else "REPAIR"
            chance = "; the corrected midpoint is at chance (a ceiling, not a measurement of the fix)" if midpoint < 0.2 else ""
            claims.append((f"{conv_label(cfg, title)}, {method} matching: {fix} cuts the aligned barrier by 60-100%",
                           f"aligned {base:.3f} -> + {fix} {fixed:.3f} ({cut:.0%} lower); corrected midpoint accuracy "
                           f"{midpoint:.3f}{chance}", (cut >= 0.6 or fixed < 0.05) and midpoint >= 0.2))
            if " x" in title and method == "weight":
                ends = mean_sd(rows["endpoint_acc"])[0]
                claims.append((f"{conv_label(cfg, title)}, weight matching + BN reset: the corrected midpoint's accuracy "
                               "within 10 points of the endpoints' mean",
                               f"midpoint {midpoint:.3f}, endpoints' mean {ends:.3f} ({100 * abs(ends - midpoint):.1f} points "
                               f"{'below' if midpoint < ends else 'above'})", midpoint >= ends - 0.10))
    for width, rows in results["merge_many"].items():
        for n, row in rows.items():
            for mode_name, r in row.items():
                inputs = [i["loss"] for i in r["inputs"]]
                mean_in, best_in = statistics.fmean(inputs), min(inputs)
                claims.append((f"MergeMany of {n}, width {width} (repair={mode_name}): merged loss at or below its inputs' mean",
                               f"merged {r['merged']['loss']:.3f} (acc {r['merged']['accuracy']:.3f}); inputs' mean "
                               f"{mean_in:.3f}, best {best_in:.3f} (acc {max(i['accuracy'] for i in r['inputs']):.3f}); "
                               f"naive average {r['naive_average']['loss']:.3f}", r["merged"]["loss"] <= mean_in))

    disjoint = results["disjoint"]["pairs"]
    for mode_name in ("none", "repair"):
        got = {k: mean_sd([p[mode_name][k]["loss"] for p in disjoint])[0] for k in ("a", "b", "merged", "naive")}
        ensemble = mean_sd([p["ensemble"]["loss"] for p in disjoint])[0]
        below_both = all(p[mode_name]["merged"]["loss"] < min(p[mode_name]["a"]["loss"], p[mode_name]["b"]["loss"])
                         for p in disjoint)
        claims.append((f"Fig. 5, disjoint data (A: 20% of classes 0-4 + 80% of 5-9, B the reverse; repair={mode_name}): "
                       "the merged model's held-out loss on all classes is below both inputs' and far below naive",
                       f"merged {got['merged']:.3f}; A {got['a']:.3f}, B {got['b']:.3f}; naive average "
                       f"{got['naive']:.3f}; ensemble {ensemble:.3f} ('far below': the merge closes more than half "
                       "of the gap from the naive average to the ensemble)",
                       below_both and got["naive"] - got["merged"] > 0.5 * (got["naive"] - ensemble)))

    lines += ["## Claims", "", "| claim | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {c} | {meas} | {verdict(ok)} |" for c, meas, ok in claims]

    lines += ["", "## Matching methods (Figure 2)", "", f"MLP {results['methods']['sizes']}, "
              f"{cfg['mlp_epochs']} epochs, Adam 1e-3. Loss barrier, held-out and train.", "",
              "| method | held-out barrier | train barrier |", "| --- | --- | --- |"]
    lines += [f"| {k} | {fmt(v['held_out'])} | {fmt(v['train'])} |" for k, v in m.items()]
    lines += ["", "![methods](methods.png)", "", "## Width", "",
              f"MLP, 3 hidden layers of the given width, {cfg['width_epochs']} epochs, weight matching; loss barriers "
              "(held-out, then train), then held-out accuracy barriers.", "",
              "| width | naive | aligned | aligned + REPAIR | train: naive | train: aligned | train: aligned + REPAIR | "
              "accuracy: aligned | accuracy: aligned + REPAIR |", "| --- |" + " --- |" * 8]
    lines += [f"| {w} | " + " | ".join(fmt(r[k]) for k in ("naive", "aligned", "aligned_repair", "naive_train", "aligned_train",
                                                          "aligned_repair_train", "aligned_acc", "aligned_repair_acc")) + " |"
              for w, r in sorted(results["width"].items(), key=lambda kv: int(kv[0]))]
    lines += ["", "![width](width.png)", "", "## Training time", "",
              f"MLP width {cfg['mlp_width']}, weight matching.", "", "| epochs | naive | aligned |", "| --- | --- | --- |"]
    lines += [f"| {e} | {fmt(r['naive'])} | {fmt(r['aligned'])} |"
              for e, r in sorted(results["epochs"].items(), key=lambda kv: int(kv[0]))]
    methods = cfg["conv_methods"]
    lines += ["", "![epochs](epochs.png)", "", f"## VGG11 and ResNet20 on digits (VGG11 {cfg['vgg_side']}x{cfg['vgg_side']}, ResNet20 "
              f"{cfg['resnet_side']}x{cfg['resnet_side']})", "",
              f"VGG11 width {cfg['vgg_width']} on the 8x8 digits upscaled (bilinear) to {cfg['vgg_side']}x{cfg['vgg_side']}"
              + (f" with CIFAR's augmentation (an epoch: {cfg['vgg_augment']} copies of the training split, each image "
                 "shifted by up to 4 pixels)" if cfg.get("vgg_augment") else "") + ", "
              f"ResNet20 width {cfg['resnet_width']}"
              + (f" (and {cfg['resnet_wide']}: x{cfg['resnet_wide']})" if "resnet_wide" in cfg else "")
              + f" at {cfg['resnet_side']}x{cfg['resnet_side']} (VGG11 pools five times: at "
              "8x8 its last four convs see 1x1 maps), "
              f"{cfg['conv_epochs']} epochs, batch 64: "
              "BN nets SGD (momentum 0.9) and then exact BN statistics, LN nets Adam; learning rates "
              + ", ".join(f"{t} {lr:g}" for t, (_, _, lr, _) in conv_models(cfg).items()) + "; "
              f"{cfg['conv_lambdas']} lambdas. 'aligned': "
              "without any statistics correction; '+ fix': what the job applies, BN reset at every lambda for BN nets "
              "(REPAIR is the reset there), REPAIR at every lambda for LN nets; held-out loss barrier unless named "
              "train; 'mid acc': the corrected midpoint's held-out accuracy (chance 0.1).", "",
              "| model | endpoint acc | naive | " + " | ".join(f"{m}: aligned | {m}: + fix | {m}: + fix (train) | "
                                                              f"{m}: mid acc" for m in methods) + " |",
              "| --- | --- | --- |" + " --- | --- | --- | --- |" * len(methods)]
    for title, r in results["conv"].items():
        lines.append(f"| {conv_label(cfg, title)} | {fmt(r['endpoint_acc'])} | {fmt(r['naive'])} | " + " | ".join(
            f"{fmt(r[f'{m}_aligned'])} | {fmt(r[f'{m}_corrected'])} | {fmt(r[f'{m}_corrected_train'])} | "
            f"{fmt(r[f'{m}_midpoint_acc'])}" for m in methods) + " |")
    lines += ["", "![conv](conv.png)", "", "## MergeMany", "",
              f"MLPs (3 hidden layers) of the given width, {cfg['mlp_epochs']} epochs, models from seeds "
              f"{results['many_seeds']}, weight matching (Algorithm 3), held-out split.", "",
              "| width | models | repair | merged loss | merged acc | inputs' mean loss | best input loss | inputs' mean acc "
              "| naive average loss |", "| --- |" + " --- |" * 8]
    for width, rows in results["merge_many"].items():
        for n, row in rows.items():
            for mode_name, r in row.items():
                inputs = r["inputs"]
                lines.append(f"| {width} | {n} | {mode_name} | {r['merged']['loss']:.3f} | {r['merged']['accuracy']:.3f} | "
                             f"{statistics.fmean(i['loss'] for i in inputs):.3f} | {min(i['loss'] for i in inputs):.3f} | "
                             f"{statistics.fmean(i['accuracy'] for i in inputs):.3f} | {r['naive_average']['loss']:.3f} |")
    d = results["disjoint"]
    lines += ["", "## Disjoint data (Figure 5)", "",
              f"MLP {d['sizes']}, {cfg['disjoint_epochs']} epochs, Adam 1e-3, on biased halves of the "
              f"{results['mlp_data']} training split: A sees 20% of the examples of classes 0-4 and 80% of classes "
              f"5-9, B the rest ({d['train_examples'][0]} and {d['train_examples'][1]} examples); weight matching, "
              "merged at lambda 0.5 by `matching.merge_checkpoints` with the whole training split as the job's "
              "dataset; held-out loss (accuracy) on all 10 classes; naive: the plain average; ensemble: the mean "
              "of the two models' softmax outputs.", "",
              "| repair | A | B | naive average | merged | ensemble |", "| --- | --- | --- | --- | --- | --- |"]
    cell = lambda rows: f"{fmt([r['loss'] for r in rows])} ({fmt([r['accuracy'] for r in rows])})"
    for mode_name in ("none", "repair"):
        lines.append(f"| {mode_name} | " + " | ".join(cell([p[mode_name][k] for p in d["pairs"]])
                                                     for k in ("a", "b", "naive", "merged"))
                     + f" | {cell([p['ensemble'] for p in d['pairs']])} |")
    return "\n".join(lines) + "\n"


def timed(function, *args):
    started = time.perf_counter()
    return function(*args), time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits only, few seeds and epochs (CI, < 3 minutes)")
    parser.add_argument("--out", type=Path, default=Path("reproduction"), help="output folder (default ./reproduction)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (default 1: for these tiny models more threads are slower)")
    parser.add_argument("--jobs", type=int, default=2, help="experiments run in this many processes (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    cfg = SETTINGS[mode]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = [(2 * i, 2 * i + 1) for i in range(cfg["pairs"])]
    many_seeds = list(range(100, 100 + max(cfg["many"])))
    with tempfile.TemporaryDirectory() as tmp:
        mlp_data = mnist1d() if cfg["mlp_data"] == "mnist1d" else digits()
        mlp_file = write_dataset(Path(tmp) / "mlp.safetensors", mlp_data)
        sides = {side for *_, side in conv_models(cfg).values()}
        image_data = {side: digits(side) for side in sides}
        image_file = {side: write_dataset(Path(tmp) / f"images{side}.safetensors", image_data[side]) for side in sides}
        results = {"mode": mode, "mlp_data": cfg["mlp_data"], "seeds": seeds, "settings": cfg, "many_seeds": many_seeds,
                   "jobs": args.jobs, "load": [os.getloadavg()[0]]}
        # Independent experiments (each trains its own models from fixed seeds): the same numbers in any order.
        tasks = {("conv", title, str(pair)): (conv_experiment, cfg, image_data[side], image_file[side], [pair], title)
                 for title, (*_, side) in conv_models(cfg).items() for pair in seeds}
        tasks.update({("methods",): (methods_experiment, cfg, mlp_data, mlp_file, seeds),
                      **{("width", str(w)): (width_experiment, {**cfg, "widths": [w]}, mlp_data, mlp_file, seeds)
                         for w in cfg["widths"]},
                      **{("epochs", str(e)): (epochs_experiment, {**cfg, "epoch_grid": [e]}, mlp_data, mlp_file, seeds)
                         for e in cfg["epoch_grid"]},
                      ("disjoint",): (disjoint_experiment, cfg, mlp_data, mlp_file, seeds),
                      **{("merge_many", str(w)): (merge_many_experiment, cfg, mlp_data, mlp_file, many_seeds, w)
                         for w in cfg["many_widths"]},
                      # Issue 23's target: 3 models of width >= 512 (5 of them would double the training).
                      **{("merge_many", str(w)): (merge_many_experiment, {**cfg, "many": [3]}, mlp_data, mlp_file,
                                                  many_seeds, w) for w in cfg.get("many_wide", [])}})
        # Longest first, so that the last process to finish does not start late.
        heavy = {("width", str(max(cfg["widths"]))), ("epochs", str(max(cfg["epoch_grid"])))}
        tasks = dict(sorted(tasks.items(), key=lambda kv: not (kv[0][0] == "conv" or kv[0] in heavy)))
        with ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
            futures = {key: pool.submit(timed, *task) for key, task in tasks.items()}
            for key, future in futures.items():
                value, seconds = future.result()
                print(f"{' '.join(key)}: {seconds:.0f} s", file=sys.stderr, flush=True)
                if key[0] == "conv":  # one seed pair: its rows extend the model's
                    rows = results.setdefault("conv", {}).setdefault(key[1], {k: [] for k in value})
                    for k, v in value.items():
                        rows[k] += v
                elif key[0] in ("width", "epochs"):  # one width or epoch count: {value: row}
                    results.setdefault(key[0], {}).update({key[1]: row for row in value.values()})
                elif len(key) == 2:
                    results.setdefault(key[0], {})[key[1]] = value
                else:
                    results[key[0]] = value
    seconds = time.perf_counter() - started
    results["seconds"] = seconds
    results["load"].append(os.getloadavg()[0])
    plot(args.out, results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "report.md").write_text(report_markdown(results, cfg, mode, seconds))
    print(f"wrote {args.out / 'report.md'} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
