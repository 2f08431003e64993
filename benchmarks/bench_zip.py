"""ZipIt! (matching.zipit) against weight matching on models trained on different classes: joint accuracy of the
full merge and of partial merges (a shared trunk, two heads), beside the two-model ensemble.

    python -m benchmarks.bench_zip                  # MLP 64-128-128-10 (about a minute)
    python -m benchmarks.bench_zip --arch resnet20  # ResNet20x2 with BatchNorm, 8x8 digits (several minutes)
    python -m benchmarks.bench_zip --grid           # the MLP's alpha x beta grid behind the defaults

A is trained on digits 0-4 (seed 0), B on 5-9 (seed 1), 10-way heads each (cli.demo.train: SGD, momentum 0.9).
Joint accuracy, held-out split (matching.zipped.joint_predictions): each head (of the ensemble, of a partial merge)
gives the softmax over its own classes, the prediction is the most probable of the union; one model is scored the
same way, its output split by label set. BN networks: statistics
re-estimated on the training inputs for every merged model. Weight matching's partial merge: its merged trunk,
A's head and aligned B's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

from cli import demo  # noqa: E402
from matching.architectures import build_model, example_input  # noqa: E402
from matching.evaluate import has_batchnorm, interpolate, reset_batchnorm  # noqa: E402
from matching.infer import infer_spec  # noqa: E402
from matching.spec import apply_permutation  # noqa: E402
from matching.weight_matching import weight_matching  # noqa: E402
from matching.zipit import feature_correlations, zipit_merge  # noqa: E402
from matching.zipped import joint_predictions  # noqa: E402

CASES = {"mlp": ({"sizes": [64, 128, 128, 10]}, 20, ["layers.0", "layers.1"]),
         "resnet20": ({"width": 2, "in_channels": 1}, 10, ["layer1", "layer2"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(CASES), default="mlp")
    parser.add_argument("--grid", action="store_true", help="alpha x beta grid of the full merge")
    args = parser.parse_args()
    options, epochs, cuts = CASES[args.arch]
    x, y, xe, ye = demo.digits(args.arch != "mlp")
    states = []
    for seed, classes in ((0, range(5)), (1, range(5, 10))):
        keep = torch.isin(y, torch.tensor(list(classes)))
        states.append(demo.train(args.arch, options, x[keep], y[keep], seed, epochs=epochs, lr=0.05))
    model = build_model(args.arch, **options).eval()
    spec = infer_spec(model, example_input(args.arch, model))

    def logits(state):
        model.load_state_dict(state)
        if has_batchnorm(model) and state is not states[0] and state is not states[1]:
            reset_batchnorm(model, x)
        model.eval()
        with torch.no_grad():
            return model(xe)

    def joint(state_a, state_b=None):
        la = logits(state_a)
        heads = [la, la if state_b is None else logits(state_b)]
        return (joint_predictions(heads, [list(range(5)), list(range(5, 10))]) == ye).float().mean().item()

    perms, _ = weight_matching(spec, *states, unmatched={k for k, _ in model.named_buffers()})
    aligned = apply_permutation(spec, perms, states[1])
    matched = interpolate(states[0], aligned, 0.5)
    correlations = feature_correlations(spec, model, *states, x, spec.free_perms)
    print(f"{args.arch} {options}: ensemble {joint(*states):.3f}")
    if args.grid:
        for alpha in (0.0, 0.3, 0.5, 1.0):
            row = [f"{joint(zipit_merge(spec, model, *states, x, alpha=alpha, beta=beta, correlations=correlations).merged):.3f}"
                   for beta in (0.0, 0.125, 0.5, 1.0)]
            print(f"full merge, alpha {alpha}: beta 0 / 0.125 / 0.5 / 1: {' / '.join(row)}")
        return
    print(f"{'merged up to':14}{'weight matching':>16}{'zip':>8}")
    for cut in cuts:
        keys = [k for k in states[0] if k.startswith(tuple(f"{m}." for m in _modules_up_to(args.arch, cut)))]
        shared = {k: matched[k] for k in keys}
        zipped = zipit_merge(spec, model, *states, x, trunk=keys, correlations=correlations)
        print(f"{cut:14}{joint({**states[0], **shared}, {**aligned, **shared}):16.3f}"
              f"{joint({**zipped.merged, **zipped.heads[0]}, {**zipped.merged, **zipped.heads[1]}):8.3f}")
    full = zipit_merge(spec, model, *states, x, correlations=correlations).merged
    print(f"{'full merge':14}{joint(matched):16.3f}{joint(full):8.3f}")


def _modules_up_to(arch: str, cut: str) -> list[str]:
    if arch == "mlp":
        return [f"layers.{i}" for i in range(int(cut.rsplit(".", 1)[1]) + 1)]
    return ["conv1", "bn1", *(f"layer{i}" for i in range(1, int(cut[-1]) + 1))]


if __name__ == "__main__":
    main()
