"""Datasets, interpolation, BN reset, and the loss barrier (the paper's Definition 2.2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from matching.errors import MatchingError
from matching.hf import logits as output_logits

# Targets equal to this are not scored (masked-LM targets: only the masked positions have a label; padding).
IGNORE_INDEX = -100


@dataclass
class Dataset:
    inputs: torch.Tensor
    targets: torch.Tensor
    eval_inputs: torch.Tensor | None = None
    eval_targets: torch.Tensor | None = None
    # Token datasets with padding: 1 where a token is real, 0 where it is padding (passed to the model as
    # ``attention_mask``; its targets there should be IGNORE_INDEX).
    attention_mask: torch.Tensor | None = None
    eval_attention_mask: torch.Tensor | None = None


def _check_split(inputs, targets, prefix, where):
    if not inputs.is_floating_point() and inputs.dtype != torch.int64:
        raise MatchingError(f"{where}: '{prefix}inputs' must be a float tensor (or int64 token ids), got {inputs.dtype}")
    if inputs.dim() < 2:
        raise MatchingError(f"{where}: '{prefix}inputs' must have shape [N, ...features], got {list(inputs.shape)}")
    sequence = inputs.dtype == torch.int64 and targets.shape == inputs.shape  # next-token targets, one per position
    if targets.dtype != torch.int64 or (targets.dim() != 1 and not sequence):
        raise MatchingError(f"{where}: '{prefix}targets' must be int64 class labels of shape [N] (or, for int64 token "
                            f"inputs [N, T], next-token targets [N, T]), got {targets.dtype} {list(targets.shape)}")
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise MatchingError(f"{where}: '{prefix}inputs' has {len(inputs)} examples but '{prefix}targets' has {len(targets)}")
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise MatchingError(f"{where}: '{prefix}inputs' contains NaN or Inf")
    if not inputs.is_floating_point() and inputs.min() < 0:
        raise MatchingError(f"{where}: '{prefix}inputs' token ids must be non-negative")
    if targets.min() < 0 and not (sequence and bool(((targets >= 0) | (targets == IGNORE_INDEX)).all())):
        raise MatchingError(f"{where}: '{prefix}targets' must be non-negative class indices (token targets may be "
                            f"{IGNORE_INDEX} where a position is not scored)")
    if sequence and not bool((targets != IGNORE_INDEX).any()):
        raise MatchingError(f"{where}: every one of '{prefix}targets' is {IGNORE_INDEX}: nothing to score")


def model_logits(model: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits for a batch: its output, or a Hugging Face ModelOutput's ``.logits``."""
    return output_logits(model(x) if attention_mask is None else model(x, attention_mask=attention_mask))


def model_input(x: torch.Tensor, device, dtype=torch.float32) -> torch.Tensor:
    """A batch as the model takes it: features in ``dtype``, token ids (integers) as they are."""
    return x.to(device, dtype) if x.is_floating_point() else x.to(device)


def load_dataset(path: str | Path) -> Dataset:
    """A safetensors file with ``inputs``/``targets`` and optionally ``eval_inputs``/``eval_targets``."""
    where = f"dataset {Path(path).name}"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MatchingError(f"{where} is not a readable safetensors file: {exc}") from None
    if "inputs" not in tensors or "targets" not in tensors:
        raise MatchingError(f"{where} must hold tensors 'inputs' and 'targets' (has {sorted(tensors)})")
    _check_split(tensors["inputs"], tensors["targets"], "", where)
    if ("eval_inputs" in tensors) != ("eval_targets" in tensors):
        raise MatchingError(f"{where}: give both 'eval_inputs' and 'eval_targets', or neither")
    if "eval_inputs" in tensors:
        _check_split(tensors["eval_inputs"], tensors["eval_targets"], "eval_", where)
    for prefix in ("", "eval_"):
        mask = tensors.get(f"{prefix}attention_mask")
        if mask is not None and (mask.shape != tensors.get(f"{prefix}inputs", torch.empty(0)).shape
                                 or tensors[f"{prefix}inputs"].is_floating_point() or not ((mask == 0) | (mask == 1)).all()):
            raise MatchingError(f"{where}: '{prefix}attention_mask' must be 0/1 of the shape of '{prefix}inputs' "
                                "(int64 token ids [N, T])")
    return Dataset(tensors["inputs"], tensors["targets"], tensors.get("eval_inputs"), tensors.get("eval_targets"),
                   tensors.get("attention_mask"), tensors.get("eval_attention_mask"))


def interpolate(state_a: dict, state_b: dict, lam: float) -> dict:
    """(1 - lam) * A + lam * B for float tensors (in float32); integer buffers are taken from A."""
    out = {}
    for key, a in state_a.items():
        if a.is_floating_point():
            out[key] = torch.lerp(a.float(), state_b[key].to(a.device).float(), lam)
        else:
            out[key] = a
    return out


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_batchnorm(model: nn.Module, inputs: torch.Tensor, batch_size: int = 500, max_examples: int = 2048) -> None:
    """Re-estimate BN running statistics on ``inputs`` (an exact average over the batches, not an EMA).
    At most ``max_examples`` (evenly strided) are used: a few thousand estimate per-channel statistics
    well, and this runs at every lambda of a curve."""
    inputs, _ = subsample(inputs, max_examples=max_examples)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = plain mean over batches
    model.train()
    device = next(model.parameters()).device
    for start in range(0, len(inputs), batch_size):
        model(inputs[start:start + batch_size].to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor | None = None,
             *, batch_size: int = 1000) -> dict:
    """Mean loss and accuracy over the scored targets (not IGNORE_INDEX)."""
    model.eval()
    device = next(model.parameters()).device
    # Summed on the device and read once: a read per batch would wait for the GPU at every batch.
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size].to(device)
        y = targets[start:start + batch_size].to(device).flatten()
        mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
        logits = model_logits(model, x, mask).float().flatten(0, -2)  # [N, T, vocab] logits: one prediction per position
        loss += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
        correct += (logits.argmax(-1) == y).sum()  # an ignored target (-100) is never a prediction
    scored = max(1, int((targets != IGNORE_INDEX).sum()))
    return {"loss": loss.item() / scored, "accuracy": correct.item() / scored}


def interpolation_curves(model: nn.Module, state_a: dict, state_b: dict, lambdas: list[float], splits: dict,
                         bn_inputs=None, repair=None, tick=None) -> dict:
    """{split name: {"loss": [...], "accuracy": [...]}} along the line from A to B, each point evaluated on every
    split of ``splits`` ({name: (inputs, targets[, attention_mask])}). BN models get their statistics re-estimated at each point
    (on ``bn_inputs``); with ``repair`` (a ``matching.repair.Repair`` of this pair) each point is then repaired."""
    reset = bn_inputs is not None and has_batchnorm(model)
    curves = {name: {"loss": [], "accuracy": []} for name in splits}
    for i, lam in enumerate(lambdas):
        model.load_state_dict(interpolate(state_a, state_b, lam))
        if reset:
            reset_batchnorm(model, bn_inputs)
        if repair is not None:
            repair.apply(model, [1 - lam, lam])
        for name, split in splits.items():
            result = evaluate(model, *split)
            curves[name]["loss"].append(result["loss"])
            curves[name]["accuracy"].append(result["accuracy"])
        if tick is not None:
            tick(i + 1, len(lambdas), f"lambda={lam:.3f} loss={result['loss']:.4f}")
    return curves


def interpolation_curve(model: nn.Module, state_a: dict, state_b: dict, lambdas: list[float], inputs, targets,
                        bn_inputs=None, tick=None) -> dict:
    """Loss and accuracy at each lambda on one split; BN models get their statistics re-estimated at each point."""
    return interpolation_curves(model, state_a, state_b, lambdas, {"": (inputs, targets)}, bn_inputs, tick=tick)[""]


def subsample(inputs: torch.Tensor, targets: torch.Tensor | None = None, max_examples: int = 2048):
    """At most ``max_examples`` examples, evenly strided (deterministic)."""
    if len(inputs) > max_examples:
        index = torch.linspace(0, len(inputs) - 1, max_examples).long()
        return inputs[index], None if targets is None else targets[index]
    return inputs, targets


def barrier(values: list[float], lambdas: list[float], higher_is_better: bool = False) -> float:
    """Definition 2.2: max over lambda of f(lambda) - ((1 - lambda) f(0) + lambda f(1)) for a loss;
    for accuracy the sign is flipped (the largest drop below the line between the endpoints)."""
    sign = -1.0 if higher_is_better else 1.0
    first, last = values[0], values[-1]
    return max(sign * (v - ((1 - lam) * first + lam * last)) for v, lam in zip(values, lambdas))
