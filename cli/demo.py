"""`rebasin demo`: two small models worth merging, and the data to see the barrier, in a few seconds.

Two MLPs trained on scikit-learn's bundled digits (1797 8x8 images: nothing is downloaded) from
different seeds: the same function class, hidden units in different orders, so their naive midpoint is
worse than either and the aligned one is not.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import torch
import torch.nn.functional as F

DEMO_SIZES = [64, 128, 128, 10]
DEMO_SEEDS = (1, 2)


def digits(image: bool = False):
    """Digits as tensors, inputs in [0, 1], a fixed 1347/450 train/held-out split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        from cli.errors import UsageError

        raise UsageError("the demo needs scikit-learn's bundled digits: pip install scikit-learn") from None
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:1347], order[1347:]
    return x[train], y[train], x[held_out], y[held_out]


def copy_tokens(examples: int = 2048, held_out: int = 512, vocab: int = 16, half: int = 8, seed: int = 0):
    """A generated token task: ``half`` random tokens, then the same tokens again; next-token targets. The first
    half cannot be predicted (loss ln(vocab) there), the second is copied through attention. Returns
    (inputs, targets, eval_inputs, eval_targets), int64 [N, 2 * half - 1] each."""
    first = torch.randint(vocab, (examples + held_out, half), generator=torch.Generator().manual_seed(seed))
    sequences = torch.cat([first, first], 1)
    inputs, targets = sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous()
    return inputs[:examples], targets[:examples], inputs[examples:], targets[examples:]


def fit(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
        epochs: int, seed: int) -> torch.nn.Module:
    """Cross-entropy training in batches of 64, their order drawn from ``seed``; the model is left in eval mode."""
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=order).split(64):
            # [N, T, vocab] logits of a language model: one next-token prediction per position
            loss = F.cross_entropy(model(inputs[batch]).flatten(0, -2), targets[batch].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def train(name: str, options: dict, inputs: torch.Tensor, targets: torch.Tensor, seed: int, epochs: int = 20,
          lr: float = 0.05, weight_decay: float = 0.0) -> dict[str, torch.Tensor]:
    """State dict of a registered architecture trained with SGD (momentum 0.9, batches of 64) from ``seed``."""
    import matching

    torch.manual_seed(seed)
    model = matching.build_model(name, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    fit(model, inputs, targets, optimizer, epochs, seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cmd_demo(args) -> None:
    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y, x_eval, y_eval = digits()
    data = out / "digits.safetensors"
    save_file({"inputs": x, "targets": y, "eval_inputs": x_eval, "eval_targets": y_eval}, str(data))
    models = []
    for label, seed in zip("ab", DEMO_SEEDS):
        path = out / f"model_{label}.safetensors"
        save_file(train("mlp", {"sizes": DEMO_SIZES}, x, y, seed), str(path))
        models.append(path)
    a, b, d, merged = (shlex.quote(str(p)) for p in (*models, data, out / "merged"))
    print(f"""wrote {a} and {b} (MLPs {DEMO_SIZES} trained on digits from seeds {DEMO_SEEDS[0]} and {DEMO_SEEDS[1]}) and {d}
(inputs/targets: 1347 training examples, eval_inputs/eval_targets: 450 held out)

Merge them offline, with the barrier report:
  rebasin merge {a} {b} --arch mlp --data {d} --out {merged}

Or on a running server (rebasin serve):
  rebasin submit {a} {b} --arch mlp --eval-data {d} --out {merged}

Or with curl: see "A session with curl" in the README.""")
