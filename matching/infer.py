"""Permutation-spec inference from a traced module, and its verification.

The graph comes from matching.infer_capture; every value in it gets a channel label (matching.infer_labels) by
the rules of matching.infer_layers, matching.infer_shapes and matching.infer_attention; the labels that were
never fixed become the spec's permutations. The result is then checked by permuting a model at random and
comparing outputs; a spec that fails that check is an error and never used.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from matching.errors import MatchingError
from matching.infer_capture import TRACE_LOCK, call_inputs, propagated, trace, unread_parameters
from matching.infer_labels import resolve_spec
from matching.infer_layers import GraphLabels
from matching.spec import PermutationSpec, apply_permutation, perm_sizes, random_perms


Example = torch.Tensor | dict  # a tensor (the model's first argument) or keyword arguments (input_ids, attention_mask)


def label_graph(model: nn.Module, example_input: Example):
    """Label every graph value; returns the GraphLabels with the graph module, node -> (label, channel_dim), param axes.
    Parameters that the eval-mode graph never reads (auxiliary heads that run only in training) are labelled
    from the graph traced with the top module's training flag, in the same union-find: a parameter read by
    both graphs ties their labels. The eval-mode graph is labelled last: its nodes are the activation points.
    Tied tensors (an LM head sharing the token embedding) are read under one key: their keys get one labelling."""
    gm = trace(model, example_input=example_input)
    labels = GraphLabels()
    if not gm.meta.get("exported") and unread_parameters(gm, model):
        try:
            auxiliary = propagated(trace(model, top_training=True), model, example_input)
        except MatchingError:  # that graph does not trace or run: its parameters stay unpermuted
            auxiliary = None
        if auxiliary is not None:
            labels.visit_graph(auxiliary)
            labels.auxiliary = True
    labels.visit_graph(propagated(gm, model, example_input))
    tie_aliases(labels, model)
    return labels


def tie_aliases(labels: GraphLabels, model: nn.Module) -> None:
    """State keys of one tensor (tied weights) take the same labels, whichever key the graph read."""
    keys: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        keys.setdefault(id(tensor), []).append(key)
    for group in (g for g in keys.values() if len(g) > 1):
        seen = [k for k in group if k in labels.param_axes]
        if not seen:
            continue
        for key in seen[1:]:
            labels.set_axes(seen[0], labels.param_axes[key])
        for key in group:
            labels.param_axes[key] = list(labels.param_axes[seen[0]])


def _follow_state_names(labels: GraphLabels, model: nn.Module) -> None:
    """The graph reads tensors under their modules' names; a state-dict hook may give them other names (see
    matching.hf: transformers' renamed checkpoints). The spec is over the state dict's names."""
    module_names = {id(t): name for name, t in [*model.named_parameters(), *model.named_buffers()]}
    state = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        module_name = module_names.get(id(tensor))
        if module_name is not None and module_name not in state and module_name in labels.param_axes:
            labels.param_axes[name] = labels.param_axes.pop(module_name)


def infer_spec(model: nn.Module, example_input: Example, verify: bool = True) -> PermutationSpec:
    """Infer the permutation spec of ``model`` (a trusted module) from an example input (a tensor, or a dict of
    keyword arguments such as ``input_ids`` and ``attention_mask``) and, by default, verify it."""
    labels = label_graph(model, example_input)
    _follow_state_names(labels, model)
    spec = resolve_spec(labels, model.state_dict())
    if verify:
        verify_spec(model, spec, example_input, auxiliary=labels.auxiliary)
    return spec


def activation_points(model: nn.Module, example_input: Example, spec: PermutationSpec):
    """For each free permutation of ``spec``: graph nodes whose channel axis it permutes, as (node, channel axis,
    offset, size) with the slice of the channel axis it holds (a segment of a concatenation), post-nonlinearity
    nodes preferred (the paper matches post-activation units). Returns ({perm: [...]}, graph module)."""
    labels = label_graph(model, example_input)
    free = set(spec.free_perms)
    points: dict[str, list] = {p: [] for p in free}
    post: dict[str, list] = {p: [] for p in free}
    activations = set(labels.activation_nodes)

    def add(name, label, cdim, offset, size):
        root = labels.find(label)
        if root in free:
            points[root].append((name, cdim, offset, size))
            if name in activations:
                post[root].append((name, cdim, offset, size))
        elif root in labels.derived and labels.derived[root][0] == "segments":
            for lab, n in labels.derived[root][1]:
                add(name, lab, cdim, offset, n)
                offset += n

    for node in labels.gm.graph.nodes:
        if node.name in labels.info and node.name not in labels.params:
            label, cdim = labels.info[node.name]
            shape = labels.shape(node)
            add(node.name, label, cdim, 0, shape[cdim] if shape else 0)
    return {p: post[p] or points[p] for p in points}, labels.gm


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Tensors a model creates without a dtype take ``dtype`` (XGLM fills its mask with ``torch.full((),
    finfo(scores.dtype).min)``, which overflows the default float32 once the scores are float64). Process-wide:
    a fallback for the models whose float64 copy does not run or gives non-finite outputs without it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class _LowPrecision(TorchDispatchMode):
    """Notes whether any op computes a floating-point result in less than float64."""

    found = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                self.found = True
        return out


def verify_spec(model: nn.Module, spec: PermutationSpec, example_input: Example, seed: int = 0,
                auxiliary: bool = False) -> None:
    """Permute a float64 copy of ``model`` at random per ``spec``; outputs must not change (``auxiliary``: also
    those computed with the top module's training flag set and every submodule in eval mode, e.g. GoogLeNet's
    auxiliary heads)."""
    reference = copy.deepcopy(model).double().eval()
    state = reference.state_dict()
    # randomise BN statistics so that a spec that forgets them fails
    gen = torch.Generator().manual_seed(seed)
    for key, tensor in state.items():
        if key.endswith("running_mean"):
            tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype) * 0.1)
        elif key.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype) + 0.5)
    reference.load_state_dict(state)
    sizes = perm_sizes(spec, {k: tuple(v.shape) for k, v in state.items()})
    permuted = copy.deepcopy(reference)
    permuted.load_state_dict(apply_permutation(spec, random_perms(sizes, gen, spec), state))
    # float inputs in float64; token ids and attention masks stay integers
    args, kwargs = call_inputs(model, tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                               else t, example_input))
    def run_both(float64_default: bool):
        # The default dtype is process-wide: set only for models that need it, so that other threads' tensors
        # (an example input being made while this one verifies) stay float32.
        with TRACE_LOCK, torch.no_grad(), _default_dtype(torch.float64) if float64_default else contextlib.nullcontext():
            with _LowPrecision() as seen:
                expected_out = reference(*args, **kwargs)
            return list(zip(tree_leaves(expected_out), tree_leaves(permuted(*args, **kwargs)))), seen.found

    err, scale, rounded = 0.0, 0.0, False
    for top_training in (False, True) if auxiliary else (False,):
        reference.training = permuted.training = top_training
        try:
            try:
                outputs, found = run_both(False)
                finite = all(e.isfinite().all() for e, _ in outputs if isinstance(e, torch.Tensor) and e.is_floating_point())
            except Exception:  # noqa: BLE001 - retried below with float64 as the default dtype
                finite = False
            if not finite:
                outputs, found = run_both(True)
        except Exception as exc:  # noqa: BLE001 - kernels without float64 (grouped_mm of mixture-of-experts layers)
            raise MatchingError(f"the inferred permutation spec of {type(model).__name__} cannot be verified: its "
                                f"float64 copy does not run ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        rounded |= found
        for expected, got in ((e, g) for e, g in outputs if isinstance(e, torch.Tensor)):
            err, scale = max(err, (expected - got).abs().max().item()), max(scale, expected.abs().max().item())
    # a model that computes in float32 inside (LLaMA's RMSNorm) rounds differently once its units are reordered
    if not err <= (1e-6 if rounded else 1e-8) * (1 + scale):
        raise MatchingError(f"the inferred permutation spec of {type(model).__name__} is not function-preserving (max abs "
                            f"diff {err:.3g}), so it is not used; write the spec by hand and send it as permutation_spec")
