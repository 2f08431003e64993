"""REPAIR (Jordan, Sedghi, Saukh, Entezari, Neyshabur, ICLR 2023): per-channel statistics of the merged model's
pre-activations are reset to the interpolation of the endpoints' statistics, and the correction is folded
back into the weights, so the repaired checkpoint has the same architecture and keys.

Where the correction goes: the output of every layer whose output units are permuted (the final classifier
is not) and which has a per-channel affine to fold a scale and a shift into:
- Linear and Conv layers with a bias: the weight's output rows and the bias;
- GroupNorm and LayerNorm (over the last axis) with weight and bias: gamma and beta.
In BatchNorm networks REPAIR is the BN reset (as in the paper): the layers after a BN were trained on its
train-mode output, whose statistics are exactly (beta, |gamma|), and re-estimating its running statistics on the
merged model restores that. Measured on digits: moving BN outputs to the endpoints' eval-mode statistics instead
(ResNet20-BN: merged loss 0.79 -> 1.01), or also repairing VGG-BN's classifier layers, was worse than the reset.
Goal statistics: mean_goal = sum_i w_i mean_i and std_goal = sum_i w_i std_i over the endpoints (w = (1 - lambda,
lambda) for a pair, 1/N each for MergeMany), as in the paper. One pass over the data computes them for the merged
model: each corrected layer's output is renormalised with its batch's statistics on the way (so that the layers
after it see repaired inputs, as the paper's BatchNorm-based implementation does), while the exact statistics of
the uncorrected output over all examples are accumulated for the fold.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from matching.evaluate import has_batchnorm, model_input, subsample
from matching.spec import PermutationSpec

CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm)
CHANNEL_LAST = (nn.Linear, nn.LayerNorm)
EPS = 1e-5
MAX_EXAMPLES = 2048


def repair_points(model: nn.Module, spec: PermutationSpec) -> list[str]:
    """Names of the modules whose outputs REPAIR corrects (see the module docstring)."""
    if has_batchnorm(model):
        return []
    points = []
    for name, module in model.named_modules():
        if not isinstance(module, CHANNEL_FIRST + CHANNEL_LAST):
            continue
        if getattr(module, "weight", None) is None or getattr(module, "bias", None) is None:
            continue
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
            continue
        if (spec.axes_to_perm.get(f"{name}.weight") or (None,))[0] is None:
            continue
        points.append(name)
    return points


def _channel_axis(module: nn.Module, output: torch.Tensor) -> int:
    return 1 if isinstance(module, CHANNEL_FIRST) and output.dim() > 1 else output.dim() - 1


class _Moments:
    """Exact per-channel mean and variance of a module's output over all examples (float64 sums)."""

    def __init__(self):
        self.count, self.total, self.squares = 0, 0.0, 0.0

    def add(self, flat: torch.Tensor) -> None:
        flat = flat.double()
        self.count += flat.shape[0]
        self.total = self.total + flat.sum(0)
        self.squares = self.squares + (flat * flat).sum(0)

    def mean_var(self):
        mean = self.total / self.count
        return mean.float(), (self.squares / self.count - mean * mean).clamp_min(0).float()


def _flatten(output: torch.Tensor, axis: int) -> torch.Tensor:
    return output.movedim(axis, -1).reshape(-1, output.shape[axis])


def _broadcast(values: torch.Tensor, output: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * output.dim()
    shape[axis] = -1
    return values.view(shape)


@torch.no_grad()
def channel_statistics(model: nn.Module, state: dict, points: list[str], inputs: torch.Tensor,
                       batch_size: int = 500) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{point: (mean, std)} of each point's output channels, for the model loaded with ``state``."""
    model.load_state_dict(state)
    moments = _run(model, points, inputs, batch_size, goals=None)
    return {name: (mean, var.sqrt()) for name, (mean, var) in ((n, m.mean_var()) for n, m in moments.items())}


def _run(model, points, inputs, batch_size, goals):
    """One pass; with ``goals``, every point's output is renormalised to its goal on the way."""
    model.eval()
    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    moments = {name: _Moments() for name in points}

    def hook_for(name):
        def hook(module, args, output):
            axis = _channel_axis(module, output)
            flat = _flatten(output, axis)
            moments[name].add(flat)
            if goals is None:
                return None
            goal_mean, goal_std = goals[name]
            batch_mean, batch_var = flat.float().mean(0), flat.float().var(0, unbiased=False)
            scale = goal_std / (batch_var + EPS).sqrt()
            shift = goal_mean - batch_mean * scale
            return (output * _broadcast(scale, output, axis) + _broadcast(shift, output, axis)).to(output.dtype)
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in points]
    try:
        for start in range(0, len(inputs), batch_size):
            model(model_input(inputs[start:start + batch_size], device))
    finally:
        for handle in handles:
            handle.remove()
    return moments


class Repair:
    """The endpoints' statistics on the REPAIR data, computed once; ``apply`` repairs any weighted average of them."""

    def __init__(self, model: nn.Module, spec: PermutationSpec, endpoint_states: list[dict], inputs: torch.Tensor,
                 batch_size: int = 500):
        self.points = repair_points(model, spec)
        self.inputs, _ = subsample(inputs, max_examples=MAX_EXAMPLES)
        self.batch_size = batch_size
        self.endpoints = [channel_statistics(model, state, self.points, self.inputs, batch_size)
                          for state in endpoint_states] if self.points else []

    def goals(self, weights: list[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (sum(w * stats[name][0] for w, stats in zip(weights, self.endpoints)),
                       sum(w * stats[name][1] for w, stats in zip(weights, self.endpoints)))
                for name in self.points}

    @torch.no_grad()
    def apply(self, model: nn.Module, weights: list[float]) -> None:
        """Repair the model as loaded (after any BN reset) towards ``sum_i weights[i] * endpoint statistics``:
        its corrected layers' weights and biases are rescaled in place."""
        if not self.points:
            return
        goals = self.goals(weights)
        moments = _run(model, self.points, self.inputs, self.batch_size, goals)
        modules = dict(model.named_modules())
        for name in self.points:
            mean, var = moments[name].mean_var()
            goal_mean, goal_std = goals[name]
            scale = goal_std / (var + EPS).sqrt()
            shift = goal_mean - mean * scale
            module = modules[name]
            weight, bias = module.weight, module.bias
            weight.mul_(scale.to(weight.dtype).view(-1, *[1] * (weight.dim() - 1)))
            bias.mul_(scale.to(bias.dtype)).add_(shift.to(bias.dtype))
