"""Partial merges (ZipIt!'s partial zipping): the layers up to a cut are merged into one shared trunk, the layers
after it stay as two heads, A's own and aligned B's.

"Up to" is execution order: one forward pass of the architecture's example input, with hooks on every module,
numbers the start and the end of every module call. ``merge_until`` names a module (the cut is where its last
call ends) or a permutation of the spec (the cut is where the last module whose output carries it ends: that
module's weight has the permutation on its first axis). The trunk is every module whose first call started
before the cut: its tensors are merged and shared by the two heads. Every other tensor belongs to a head.

``ZippedModel`` runs the trunk once: head 0 (the trunk and A's head) runs in full and its module calls that ended
by the cut are recorded; in head 1 those calls return the recorded outputs instead of computing again (the trunk
parameters are one set of tensors, so this is the same function). Functional operations between modules (an
activation written as ``F.relu``) run in both heads: they hold no parameters and cost next to nothing.

``zipped.safetensors``: ``trunk.<key>`` (shared), ``heads.0.<key>`` (A), ``heads.1.<key>`` (aligned B); metadata
``format`` = "rebasin-zipped", ``architecture`` (JSON {name, options}) and ``merge_until`` (the cut's module;
"" = nothing merged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from matching.architectures import build_model, example_input, infer_options
from matching.errors import MatchingError
from matching.hf import logits as output_logits
from matching.spec import PermutationSpec

FORMAT = "rebasin-zipped"


@dataclass(frozen=True)
class Call:
    module: str
    start: int
    end: int
    parent: int | None  # index of the enclosing call, None for the outermost


def trace_calls(model: nn.Module, example) -> list[Call]:
    """Every module call of one forward pass, in the order they start (steps count starts and ends)."""
    calls, stack, step, handles = [], [], [0], []

    def pre(name):
        def hook(module, args):
            calls.append([name, step[0], None, stack[-1] if stack else None])
            stack.append(len(calls) - 1)
            step[0] += 1
        return hook

    def post(module, args, output):
        calls[stack.pop()][2] = step[0]
        step[0] += 1

    for name, module in model.named_modules():
        handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model.eval()(**example) if isinstance(example, dict) else model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return [Call(*c) for c in calls]


def _owner(key: str, modules: set[str]) -> str:
    module = key.rpartition(".")[0]
    while module not in modules:  # a key of a submodule that is no nn.Module child (never in practice)
        module = module.rpartition(".")[0]
    return module


def cut_points(model: nn.Module, spec: PermutationSpec, calls: list[Call]) -> list[dict]:
    """The cuts a sweep tries, in execution order: one per permutation of the spec, at the end of the last module
    that produces it. [{"module", "permutation"}]"""
    ends = _last_ends(calls)
    modules = {name for name, _ in model.named_modules()}
    producer = {}
    for perm, axes in spec.perm_to_axes.items():
        owners = [_owner(key, modules) for key, axis in axes if axis == 0]
        owners = [m for m in owners if m in ends]
        if owners:
            producer[perm] = max(owners, key=ends.get)
    points, seen = [], set()
    for perm, module in sorted(producer.items(), key=lambda item: ends[item[1]]):
        if module not in seen:
            seen.add(module)
            points.append({"module": module, "permutation": perm})
    return points


def _last_ends(calls):
    ends = {}
    for call in calls:
        ends[call.module] = max(ends.get(call.module, -1), call.end)
    return ends


def resolve_cut(model: nn.Module, spec: PermutationSpec | None, calls: list[Call], merge_until: str) -> str:
    """The module a ``merge_until`` value cuts after: a module name, or a permutation's producing module."""
    ends = _last_ends(calls)
    if merge_until in ends and merge_until != "":
        return merge_until
    points = cut_points(model, spec, calls) if spec is not None else []
    for point in points:
        if point["permutation"] == merge_until:
            return point["module"]
    children = [name for name, _ in model.named_children() if name in ends]
    raise MatchingError(f"merge_until {merge_until!r} is neither a module the model calls nor one of its spec's "
                        f"permutations; e.g. modules {children[:12]}, or permutations "
                        f"{[p['permutation'] for p in points][:12]} (or 'sweep': every cut)")


@dataclass(frozen=True)
class Cut:
    module: str | None  # None: nothing merged
    trunk_modules: tuple[str, ...]  # modules whose tensors are shared (their first call started before the cut)
    replayed: dict[str, tuple[bool, ...]]  # per module: for each of its calls that head 1 makes, replayed or run
    recorded: dict[str, tuple[bool, ...]]  # per module: for each of its calls in head 0, whether it is recorded


def plan_cut(calls: list[Call], module: str | None) -> Cut:
    if module is None:
        return Cut(None, (), {}, {})
    end = _last_ends(calls)[module]
    done = [call.end <= end for call in calls]
    # A replayed call skips the calls nested in it: head 1 never makes them.
    inner = [call.parent is not None and done[call.parent] for call in calls]
    replayed: dict[str, list[bool]] = {}
    recorded: dict[str, list[bool]] = {}
    for call, finished, nested in zip(calls, done, inner):
        recorded.setdefault(call.module, []).append(finished and not nested)
        if not nested:
            replayed.setdefault(call.module, []).append(finished)
    trunk = tuple(dict.fromkeys(call.module for call in calls if call.start < end))
    return Cut(module, trunk, {m: tuple(r) for m, r in replayed.items() if any(r)},
               {m: tuple(r) for m, r in recorded.items() if any(r)})


def trunk_keys(model: nn.Module, cut: Cut) -> list[str]:
    """The state-dict keys that the trunk's modules hold themselves (not through a submodule)."""
    trunk, modules = set(cut.trunk_modules), {name for name, _ in model.named_modules()}
    return [key for key in model.state_dict() if _owner(key, modules) in trunk]


def zipped_state(state_a: dict, aligned_b: dict, merged: dict, keys: list[str]) -> dict[str, torch.Tensor]:
    """trunk.* from the merged model, heads.0.* from A, heads.1.* from aligned B."""
    shared = set(keys)
    out = {f"trunk.{k}": merged[k] for k in keys}
    for i, state in enumerate((state_a, aligned_b)):
        out.update({f"heads.{i}.{k}": v for k, v in state.items() if k not in shared})
    return out


def split_zipped(zipped: dict) -> tuple[dict, dict, list[str]]:
    """The two full states (trunk + each head) and the trunk's keys."""
    trunk = {k[len("trunk."):]: v for k, v in zipped.items() if k.startswith("trunk.")}
    heads = [{k[len(f"heads.{i}."):]: v for k, v in zipped.items() if k.startswith(f"heads.{i}.")} for i in (0, 1)]
    if not heads[0] or set(heads[0]) != set(heads[1]) or len(trunk) + 2 * len(heads[0]) != len(zipped):
        raise MatchingError("not a zipped checkpoint: expected trunk.<key>, heads.0.<key> and heads.1.<key> tensors, "
                            "the two heads with the same keys")
    return {**trunk, **heads[0]}, {**trunk, **heads[1]}, sorted(trunk)


class ZippedModel(nn.Module):
    """Two copies of the architecture whose trunk tensors are the same tensors; ``forward`` runs the trunk once
    and returns both heads' outputs, or their mean with ``average=True`` (when the label spaces are the same)."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, cut: Cut, average: bool = False):
        super().__init__()
        self.heads = nn.ModuleList([model_a, model_b])
        self.cut, self.average = cut, average
        modules_a, modules_b = dict(model_a.named_modules()), dict(model_b.named_modules())
        for name in cut.trunk_modules:  # share: head 1's trunk modules hold head 0's tensors
            a, b = modules_a[name], modules_b[name]
            for registry in ("_parameters", "_buffers"):
                for key, value in getattr(a, registry).items():
                    if value is not None:
                        getattr(b, registry)[key] = value
        self._recorded: dict[str, list] = {}
        for name in cut.replayed:
            modules_a[name].register_forward_hook(self._recorder(name))
            modules_b[name].forward = self._replayer(name, modules_b[name])

    def _recorder(self, name):
        plan = self.cut.recorded[name]

        def hook(module, args, output):
            index = self._calls[name]
            self._calls[name] += 1
            if index < len(plan) and plan[index]:
                # A copy: the caller may change the output in place (a residual ``out += identity``).
                self._recorded[name].append(tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, output))
        return hook

    def _replayer(self, name, module):
        plan, run, count = self.cut.replayed[name], type(module).forward, [0]

        def forward(*args, **kwargs):
            index = count[0]
            count[0] += 1
            if index < len(plan) and plan[index]:
                return self._recorded[name][sum(plan[:index])]
            return run(module, *args, **kwargs)
        forward.reset = lambda: count.__setitem__(0, 0)
        return forward

    def forward(self, *args, **kwargs):
        self._recorded = {name: [] for name in self.cut.replayed}
        self._calls = dict.fromkeys(self.cut.replayed, 0)
        for name in self.cut.replayed:
            dict(self.heads[1].named_modules())[name].forward.reset()
        try:
            outputs = (self.heads[0](*args, **kwargs), self.heads[1](*args, **kwargs))
        finally:
            self._recorded = {}
        if self.average:
            return (output_logits(outputs[0]) + output_logits(outputs[1])) / 2
        return outputs


def build_zipped(architecture: dict, state_a: dict, state_b: dict, merge_until: str | None,
                 average: bool = False, shared: list[str] | None = None) -> ZippedModel:
    """The zipped model of two full states whose trunk tensors (up to ``merge_until``) are the same. Without
    ``merge_until``, ``shared`` (the trunk's keys) places the cut: after the last module holding one of them."""
    name, user = architecture["name"], architecture.get("options") or {}
    options = {**infer_options(name, {k: tuple(v.shape) for k, v in state_a.items()}), **user}
    models = []
    for state in (state_a, state_b):
        model = build_model(name, **options)
        model.load_state_dict(state)
        models.append(model.eval())
    calls = trace_calls(models[0], example_input(name, models[0]))
    if not merge_until and shared:
        modules, ends = {n for n, _ in models[0].named_modules()}, _last_ends(calls)
        merge_until = max({_owner(k, modules) for k in shared}, key=lambda m: ends.get(m, -1))
    cut = plan_cut(calls, resolve_cut(models[0], None, calls, merge_until) if merge_until else None)
    if shared is not None and sorted(trunk_keys(models[0], cut)) != sorted(shared):
        raise MatchingError(f"the zipped checkpoint's trunk tensors do not match a cut after {cut.module!r} of "
                            f"architecture {name!r}")
    return ZippedModel(*models, cut, average)


def load_zipped(path_or_state, architecture: dict | str | None = None, average: bool = False) -> ZippedModel:
    """A zipped checkpoint (``zipped.safetensors`` or its state dict) as a model: ``model(x)`` gives (A's head,
    aligned B's head), or their mean with ``average=True``. ``architecture``: {"name", "options"} or a name;
    from a file it defaults to the one in its metadata. The cut is the metadata's ``merge_until``, else (a bare
    state dict) the last module whose tensors are in the trunk."""
    metadata = {}
    if isinstance(path_or_state, (str, Path)):
        with safe_open(str(path_or_state), "pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    else:
        state = dict(path_or_state)
    if architecture is None:
        if "architecture" not in metadata:
            raise MatchingError("give the architecture: this zipped checkpoint's metadata does not name one")
        architecture = json.loads(metadata["architecture"])
    if isinstance(architecture, str):
        architecture = {"name": architecture}
    state_a, state_b, keys = split_zipped(state)
    return build_zipped(architecture, state_a, state_b, metadata.get("merge_until"), average, shared=keys)


def joint_predictions(logits: list[torch.Tensor], label_sets: list[list[int]]) -> torch.Tensor:
    """Joint prediction of heads trained separately: each head's softmax over its own label set's classes (its
    probabilities), then the arg max over the union (a class is predicted from the head that owns it). Raw logits of
    two heads are not on one scale: cross-entropy fixes a head's logits only up to an added constant, so a head
    with larger logits would win every example; probabilities are comparable. A single model is scored the same
    way, its one output split by label set."""
    scores = torch.full((logits[0].shape[0], max(max(s) for s in label_sets) + 1), -torch.inf, device=logits[0].device)
    for head, classes in zip(logits, label_sets):
        index = torch.tensor(classes, device=head.device)
        scores[:, index] = head[:, index].float().softmax(1)
    return scores.argmax(1)


@torch.no_grad()
def joint_accuracy(forward, inputs: torch.Tensor, targets: torch.Tensor, label_sets: list[list[int]],
                   batch_size: int = 1000) -> float:
    """Accuracy on the examples whose class is in the union of the label sets; ``forward(x)`` gives one logits
    tensor per label set (a single model: the same logits for each)."""
    union = torch.tensor(sorted({c for s in label_sets for c in s}), device=targets.device)
    keep = torch.isin(targets, union)
    inputs, targets = inputs[keep], targets[keep]
    correct = 0
    for start in range(0, len(inputs), batch_size):
        logits = [output_logits(o) for o in forward(inputs[start:start + batch_size])]
        correct += int((joint_predictions(logits, label_sets) == targets[start:start + batch_size]).sum())
    return correct / max(1, len(inputs))


def count_flops(forward, example) -> int:
    """FLOPs of one forward call (torch.utils.flop_counter: matrix products and convolutions)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward(example)
    return int(counter.get_total_flops())


PARTIAL_DEFINITION = ("cut: the end of the last call of the merge_until module (a permutation: of the last module whose "
                      "output carries it), in execution order; trunk: every module whose first call started before "
                      "the cut, its tensors merged and shared; heads: every other tensor, heads.0 from A, heads.1 from "
                      "aligned B")
JOINT_DEFINITION = ("joint accuracy: on the held-out examples whose class is in a label set, each head (model) gives "
                    "the softmax over only its own label set's classes and the prediction is the arg max of those "
                    "probabilities over the union; a single merged model is scored the same way, its one output split "
                    "by label set")


def partial_merge(architecture: dict, spec: PermutationSpec, state_a: dict, aligned_b: dict, merged: dict, *,
                  merge_until: str | None, label_sets: list[list[int]] | None, held_out, bn_inputs=None,
                  device="cpu", tick=None, trunk_merge=None) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """The report entries of a partial merge (``partial``, and ``joint_accuracy`` with label sets) and the zipped
    state (None for a sweep or without merge_until). ``merged``: the full merge (its trunk tensors are the trunk);
    ``held_out``: (inputs, targets) or None; ``bn_inputs``: data to re-estimate the zipped model's BatchNorm
    statistics on (its heads see the merged trunk's features), or None. ``trunk_merge(trunk keys)``: the two full
    states of the zipped model (equal on the trunk keys); by default the full merge's trunk in A and aligned B."""
    from matching.evaluate import evaluate, has_batchnorm, reset_batchnorm

    def zipped(module):
        if module is None:  # nothing merged: A and aligned B as they are
            return build_zipped(architecture, state_a, aligned_b, None).to(device)
        model = build_zipped(architecture, *trunk_merge(set(trunk_keys(probe, plan_cut(calls, module)))), module)
        model.to(device)
        if bn_inputs is not None and has_batchnorm(model):
            reset_batchnorm(model, bn_inputs)
        return model

    def merged_trunk(keys):
        return [{k: merged[k] if k in keys else v for k, v in state.items()} for state in (state_a, aligned_b)]

    trunk_merge = trunk_merge or merged_trunk
    probe = build_zipped(architecture, state_a, aligned_b, None).heads[0]
    # FLOPs of one example: of the evaluation data when there is some (its size, not the architecture's default)
    example = held_out[0][:1].cpu() if held_out is not None else example_input(architecture["name"], probe, batch=1)
    calls = trace_calls(probe, example)
    single = count_flops(probe, example)
    report: dict = {}
    if label_sets is not None:
        outputs = output_logits(probe.eval()(example)).shape[-1]
        if max(c for s in label_sets for c in s) >= outputs:
            raise MatchingError(f"label_sets name class {max(c for s in label_sets for c in s)} but the model has "
                                f"{outputs} outputs")
    joint = None
    if label_sets is not None and held_out is not None:
        inputs, targets = held_out
        full = build_zipped(architecture, merged, merged, None).heads[0].to(device)
        joint = {"ensemble": joint_accuracy(zipped(None), inputs, targets, label_sets),
                 "full_merge": joint_accuracy(lambda x: (full(x),) * len(label_sets), inputs, targets, label_sets),
                 "label_sets": label_sets, "definition": JOINT_DEFINITION}

    def describe(module, point=None):
        model = zipped(module)
        entry = {"module": module, **({"permutation": point["permutation"]} if point else {}),
                 "shared_tensors": len(trunk_keys(model.heads[0], model.cut)),
                 "flops": count_flops(model.cpu(), example)}
        entry["flops_fraction"] = entry["flops"] / (2 * single)
        model.to(device)
        if joint is not None:
            entry["joint_accuracy"] = joint_accuracy(model, *held_out, label_sets)
        return entry, model

    if merge_until is None:
        return {"joint_accuracy": joint} if joint else {}, None
    points = cut_points(probe, spec, calls)
    flops = {"two_models": 2 * single, "merged": single}
    if merge_until == "sweep":
        cuts = []
        for i, point in enumerate(points):
            try:
                cuts.append(describe(point["module"], point)[0])
            except MatchingError as error:  # a cut the method cannot make (zip: across a residual stream)
                cuts.append({**point, "refused": str(error)})
            if tick is not None:
                tick("partial_sweep", i + 1, len(points), f"cut after {point['module']}")
        report["partial"] = {"merge_until": "sweep", "cuts": cuts, "flops": flops, "definition": PARTIAL_DEFINITION}
    else:
        module = resolve_cut(probe, spec, calls, merge_until)
        entry, model = describe(module)
        keys = trunk_keys(model.heads[0], model.cut)
        report["partial"] = {"merge_until": merge_until, "cut": module, "flops": {**flops, "zipped": entry["flops"]},
                             "flops_fraction": entry["flops_fraction"], "shared": keys,
                             "heads": [k for k in state_a if k not in set(keys)], "definition": PARTIAL_DEFINITION}
        if joint is not None:
            joint["zipped"] = entry["joint_accuracy"]
        elif held_out is not None:  # one label space: the heads' mean
            model.average = True
            report["partial"]["zipped"] = evaluate(model, *held_out)
        state = {k: v.detach().cpu().contiguous() for k, v in model.heads[0].state_dict().items()}
        state_b = {k: v.detach().cpu().contiguous() for k, v in model.heads[1].state_dict().items()}
        zipped_tensors = zipped_state(state, state_b, state, keys)
    if joint is not None:
        report["joint_accuracy"] = joint
    return report, (None if merge_until == "sweep" else zipped_tensors)


def zipped_metadata(architecture: dict, cut: str | None) -> dict[str, str]:
    return {"format": FORMAT, "architecture": json.dumps(architecture), "merge_until": cut or ""}
