"""Shared test helpers: sklearn's bundled digits as a CONTRACT dataset file, and small trained models."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import matching
from cli import demo


@functools.lru_cache
def digits(image: bool = False):
    """Digits (1797 8x8 images, bundled with scikit-learn: no download), fixed 1347/450 split, inputs in [0, 1]."""
    return demo.digits(image)


def write_digits(path, image: bool = False, eval_split: bool = True):
    x, y, xe, ye = digits(image)
    tensors = {"inputs": x, "targets": y}
    if eval_split:
        tensors.update(eval_inputs=xe, eval_targets=ye)
    save_file(tensors, str(path))
    return path


@functools.lru_cache
def _trained(name: str, options: tuple, seed: int, epochs: int, lr: float, image: bool, weight_decay: float):
    x, y, _, _ = digits(image)
    return demo.train(name, dict(options), x, y, seed, epochs, lr, weight_decay)


def trained(name: str, seed: int, epochs: int = 20, lr: float = 0.05, image: bool = False, weight_decay: float = 0.0,
            **options):
    """State dict of a model trained on the digits training split (cached per process)."""
    options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    state = _trained(name, options, seed, epochs, lr, image, weight_decay)
    return {k: v.clone() for k, v in state.items()}


def accuracy_and_loss(name, state, inputs, targets, **options):
    model = matching.build_model(name, **options)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        logits = model(inputs)
    return (logits.argmax(1) == targets).float().mean().item(), F.cross_entropy(logits, targets).item()
