"""Partial merges of models trained on different classes: joint accuracy and FLOPs per cut point.

    python -m benchmarks.bench_partial            # MLPs 64-128x3-10 on digits 0-4 / 5-9 (about a minute)
    python -m benchmarks.bench_partial --width 512 --methods weight_matching,zip

Model A is trained on digits' classes 0-4, model B on 5-9, from different seeds (as tests/test_partial_merge.py
trains them). Every row is ``matching.merge_checkpoints`` with ``options.merge_until: "sweep"`` and
``label_sets`` (what a job runs), the job's default correction (REPAIR for these networks; none for zip). Joint accuracy
(matching.zipped.JOINT_DEFINITION): on the held-out split, each head's softmax over its own classes, the prediction
is the most probable of all ten (a single model: its output split the same way).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import matching
from cli import demo

LABEL_SETS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def half_models(width: int, depth: int = 3, epochs: int = 30) -> tuple[dict, dict]:
    x, y, _, _ = demo.digits()
    sizes = [64, *[width] * depth, 10]
    states = []
    for seed, classes in ((1, LABEL_SETS[0]), (2, LABEL_SETS[1])):
        keep = torch.isin(y, torch.tensor(classes))
        states.append(demo.train("mlp", {"sizes": sizes}, x[keep], y[keep], seed, epochs=epochs, weight_decay=5e-4))
    return tuple(states)


def sweep(states, method: str, data: Path) -> dict:
    outcome = matching.merge_checkpoints(list(states), method=method, architecture={"name": "mlp"}, dataset=data,
                                         eval_dataset=data, options={"merge_until": "sweep", "label_sets": LABEL_SETS,
                                                                     "lambdas": 3})
    return outcome.report


def table(reports: dict[str, dict]) -> str:
    """One row per method: ensemble, every cut (joint accuracy, FLOPs / two models), full merge."""
    first = next(iter(reports.values()))
    cuts = [c["module"] for c in first["partial"]["cuts"]]
    head = ["method", "ensemble (FLOPs 1.00)", *[f"merged up to {c} (FLOPs {k['flops_fraction']:.2f})"
                                                for c, k in zip(cuts, first["partial"]["cuts"])],
            f"full merge (FLOPs {first['partial']['flops']['merged'] / first['partial']['flops']['two_models']:.2f})"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, report in reports.items():
        joint = report["joint_accuracy"]
        cells = [joint["ensemble"], *[c.get("joint_accuracy", float("nan")) for c in report["partial"]["cuts"]], joint["full_merge"]]
        rows.append(f"| {method} | " + " | ".join(f"{100 * v:.1f}%" for v in cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--methods", default="weight_matching,activation_matching,zip")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, xe, ye = demo.digits()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "digits.safetensors"
        save_file({"inputs": x, "targets": y, "eval_inputs": xe, "eval_targets": ye}, str(data))
        states = half_models(args.width)
        print(table({method: sweep(states, method, data) for method in args.methods.split(",")}))


if __name__ == "__main__":
    main()
