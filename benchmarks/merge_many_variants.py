"""MergeMany variants against the paper's Algorithm 3, on 5 MLPs trained on digits (held-out loss).

    python benchmarks/merge_many_variants.py

- Algorithm 3 as written (matching.merge_checkpoints, 5 checkpoints): align each model to the mean of the
  others, in random order, until no permutation changes; then average. With repair=none and repair=repair.
- "mean of all": align each model to the mean of all models, itself included (a running-mean target).
"""

import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matching  # noqa: E402
from benchmarks.reproduce import digits, train, write_dataset  # noqa: E402
from matching.evaluate import evaluate  # noqa: E402
from matching.merge import _model_and_spec  # noqa: E402
from matching.merge_many import _mean  # noqa: E402
from matching.spec import apply_permutation, identity_perms, perm_sizes  # noqa: E402
from matching.weight_matching import weight_matching  # noqa: E402


def mean_of_all(spec, states, rounds=30):
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in states[0].items()})
    perms = [identity_perms(sizes) for _ in states]
    gen = torch.Generator().manual_seed(0)
    for iteration in range(rounds):
        changed = False
        for i in torch.randperm(len(states), generator=gen).tolist():
            target = _mean([apply_permutation(spec, perms[j], states[j]) for j in range(len(states))])
            new, _ = weight_matching(spec, target, states[i], init_perms=perms[i], seed=iteration)
            changed |= any(not torch.equal(new[p], perms[i][p]) for p in new)
            perms[i] = new
        if not changed:
            break
    return _mean([apply_permutation(spec, p, s) for p, s in zip(perms, states)]), iteration + 1


def main():
    torch.set_num_threads(1)
    data = digits()
    sizes = [64, 64, 64, 64, 10]
    print(f"{'epochs':>6} {'variant':<34} {'merged loss':>11} {'inputs mean':>11} {'best input':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        data_file = write_dataset(Path(tmp) / "digits.safetensors", data)
        for epochs in (10, 40):
            states = [train("mlp", {"sizes": sizes}, data, seed, epochs) for seed in range(100, 105)]
            model, spec, _ = _model_and_spec({"name": "mlp"}, {k: tuple(v.shape) for k, v in states[0].items()})

            def loss(state):
                model.load_state_dict(state)
                return evaluate(model, data[2], data[3])["loss"]

            inputs = [loss(s) for s in states]
            rows = []
            for mode in ("none", "repair"):
                report = matching.merge_checkpoints(states, architecture={"name": "mlp"}, dataset=data_file,
                                                    options={"lambdas": 2, "repair": mode}).report
                rows.append((f"Algorithm 3, repair={mode} ({report['matching']['iterations']} rounds)",
                             report["merged"]["loss"]))
            merged, rounds = mean_of_all(spec, states)
            rows.append((f"mean of all ({rounds} rounds)", loss(merged)))
            for name, value in rows:
                print(f"{epochs:>6} {name:<34} {value:>11.4f} {statistics.fmean(inputs):>11.4f} {min(inputs):>10.4f}")


if __name__ == "__main__":
    main()
