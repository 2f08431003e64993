"""The job: validate inputs, align, merge, evaluate, write artifacts."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from matching.architectures import build_model, example_input, infer_options
from matching.errors import Cancelled, MatchingError
from matching.evaluate import (Dataset, barrier, evaluate, has_batchnorm, interpolate, interpolation_curves,
                               load_dataset, model_input, model_logits, reset_batchnorm, subsample)
from matching.checkpoints import tensor_layout
from matching.folders import FolderLayout, shard_plan, write_folder, write_folder_tar, write_shards
from matching.hf import check_configs, check_input_shape, logits as output_logits, tied_groups
from matching.repair import Repair, repair_points
from matching.infer import infer_spec
from matching.spec import (PermutationSpec, apply_permutation, perm_sizes, permute_tensor, spec_from_json, spec_to_json,
                           within_axes)
from matching.weight_matching import statistics_keys, weight_matching
from matching.zipit import ALPHA_DEFAULT, BETA_DEFAULT

METHODS = ("weight_matching", "activation_matching", "ste_matching", "auto", "zip")
# auto: the methods it runs, in this order (STE only when options.time_budget_s leaves time for it)
AUTO_CANDIDATES = ("weight_matching", "activation_matching", "ste_matching")
OPTION_TYPES = {"seed": int, "max_iter": int, "lambdas": int, "merge_lambda": float, "steps": int,
                "learning_rate": float, "batch_size": int, "time_budget_s": float, "alpha": float, "beta": float}
ZIP_OPTIONS = ("alpha", "beta")  # method zip (matching.zipit) only
# Partial merges and different label spaces (matching.zipped): every method reads them.
PARTIAL_OPTIONS = ("merge_until", "label_sets")
# The options each method reads (the report lists these only).
METHOD_OPTIONS = {
    "weight_matching": ("seed", "max_iter", "lambdas", "merge_lambda", "repair", *PARTIAL_OPTIONS),
    "activation_matching": ("seed", "max_iter", "lambdas", "merge_lambda", "batch_size", "repair",  # max_iter: MergeMany
                            *PARTIAL_OPTIONS),
    "ste_matching": (*(o for o in OPTION_TYPES if o not in ("time_budget_s", *ZIP_OPTIONS)), "repair", *PARTIAL_OPTIONS),
    "auto": (*(o for o in OPTION_TYPES if o not in ZIP_OPTIONS), "repair", *PARTIAL_OPTIONS),
    "zip": ("lambdas", "merge_lambda", "batch_size", *ZIP_OPTIONS, "repair", *PARTIAL_OPTIONS),
}
MAX_LABELS = 100_000
DEFAULTS = {"seed": 0, "max_iter": 100, "lambdas": 25, "merge_lambda": 0.5, "steps": 200, "learning_rate": 1e-3,
            "batch_size": 256, "time_budget_s": None, "alpha": ALPHA_DEFAULT, "beta": BETA_DEFAULT}
# "none": plain interpolation; "reset": BatchNorm statistics re-estimated on the data; "repair": REPAIR (after the
# reset, in BN networks). Left out: chosen per architecture (repair_default).
REPAIR_MODES = ("none", "reset", "repair")
TRAIN_EVAL_MAX_EXAMPLES = 10_000
# Streaming (weight matching of a pair, no data): what weight matching may keep of cost matrices and reshaped
# tensor copies (see weight_matching's cache_bytes; benchmarks/README.md, "Memory", for what it costs in time).
STREAM_CACHE_BYTES = 512 * 1024**2
# Streaming: a model with more parameters is built on the meta device (no memory) and its spec inferred there,
# unverified (verifying it runs a float64 copy of the model and a permuted one: 16 bytes per parameter).
VERIFY_MAX_PARAMETERS = 50_000_000


class LazyState(Mapping):
    """A state dict whose tensors are computed one at a time when read (``get(name)``), their dtype and shape
    known up front (``layout``): written tensor by tensor (``write_safetensors``), it is never whole in memory."""

    def __init__(self, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], get: Callable[[str], torch.Tensor]):
        self.layout, self._get = layout, get

    def __getitem__(self, key):
        if key not in self.layout:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self):
        return iter(self.layout)

    def __len__(self):
        return len(self.layout)


@dataclass
class MergeOutcome:
    merged: Mapping[str, torch.Tensor]
    aligned: list[Mapping[str, torch.Tensor]]
    permutation: dict
    report: dict
    extra: dict = field(default_factory=dict)
    # A partial merge (options.merge_until): zipped.safetensors' tensors and metadata (matching.zipped)
    zipped: dict[str, torch.Tensor] | None = None
    zipped_metadata: dict[str, str] | None = None


def _options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_TYPES) - {"repair", *PARTIAL_OPTIONS})
    if unknown:
        raise MatchingError(f"unknown job option(s) {unknown}; allowed: {sorted([*OPTION_TYPES, 'repair', *PARTIAL_OPTIONS])}")
    partial = {"merge_until": options.pop("merge_until", None), "label_sets": _label_sets(options.pop("label_sets", None))}
    if partial["merge_until"] is not None and (not isinstance(partial["merge_until"], str)
                                               or not 0 < len(partial["merge_until"]) <= 200):
        raise MatchingError(f"option 'merge_until' must name a module or a permutation (at most 200 characters), "
                            f"or be 'sweep'; got {partial['merge_until']!r}")
    repair = options.pop("repair", None)
    if repair is not None and repair not in REPAIR_MODES:
        raise MatchingError(f"option 'repair' must be one of {list(REPAIR_MODES)} (or left out: chosen per architecture), "
                            f"got {repair!r}")
    out = {**DEFAULTS, "repair": repair, **partial}
    for name, value in options.items():
        if name == "time_budget_s" and value is None:
            continue
        kind = OPTION_TYPES[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
            raise MatchingError(f"option {name!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        out[name] = kind(value)
    checks = {"max_iter": out["max_iter"] >= 1, "lambdas": 2 <= out["lambdas"] <= 1001,
              "merge_lambda": 0.0 <= out["merge_lambda"] <= 1.0, "steps": out["steps"] >= 1,
              "learning_rate": 0 < out["learning_rate"] < math.inf, "batch_size": out["batch_size"] >= 1,
              "time_budget_s": out["time_budget_s"] is None or 0 < out["time_budget_s"] < math.inf,
              "alpha": 0.0 <= out["alpha"] <= 1.0, "beta": 0.0 <= out["beta"] <= 1.0}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise MatchingError(f"option(s) out of range: {', '.join(f'{k}={out[k]!r}' for k in bad)} (max_iter, steps, "
                            "batch_size >= 1; lambdas 2..1001; merge_lambda, alpha, beta in [0, 1]; learning_rate, "
                            "time_budget_s > 0)")
    return out


def _reported_options(opts: dict, method: str) -> dict:
    """The options the method read, defaults filled in; the partial-merge ones only when given."""
    return {k: v for k, v in opts.items() if k in METHOD_OPTIONS[method] and not (k in PARTIAL_OPTIONS and v is None)}


def _label_sets(value) -> list[list[int]] | None:
    """options.label_sets: one list of class indices per checkpoint (two), disjoint, none empty."""
    if value is None:
        return None
    ok = (isinstance(value, list) and len(value) == 2
          and all(isinstance(s, list) and 0 < len(s) <= MAX_LABELS for s in value)
          and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < MAX_LABELS for s in value for c in s))
    if not ok or len({c for s in value for c in s}) != sum(len(s) for s in value):
        raise MatchingError("option 'label_sets' must be two lists of distinct class indices, e.g. [[0,1,2,3,4],"
                            f"[5,6,7,8,9]]: the classes A and B were trained on, non-empty, disjoint, each below {MAX_LABELS}")
    return value


_SPEC_CACHE: dict[tuple, PermutationSpec] = {}


def _hf_options(user: dict, configs: list[dict | None] | None) -> dict:
    """Architecture ``hf``: the model is built from the checkpoints' own config.json, which must agree."""
    if configs is None or "config" in user:
        return user
    if any(config is None for config in configs):
        raise MatchingError("architecture 'hf' builds the model from each checkpoint's config.json: give every "
                            "checkpoint as a model folder (config.json and its weights, as save_pretrained writes them)")
    check_configs(configs)
    return {**user, "config": configs[0]}


def _build(name: str, options: dict, meta: bool) -> torch.nn.Module:
    """The model; ``meta``: on the meta device (shapes only) when it has more than VERIFY_MAX_PARAMETERS."""
    if meta:
        try:
            with torch.device("meta"):
                model = build_model(name, **options)
        except MatchingError:  # its initialisation needs data (RegNet): build it for real, then move it to meta
            model = build_model(name, **options).to("meta")
        if sum(p.numel() for p in model.parameters()) > VERIFY_MAX_PARAMETERS:
            return model
    return build_model(name, **options)


def _on_meta(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in model.state_dict().values())


def _spec_of(name: str, options: dict, model: torch.nn.Module) -> PermutationSpec:
    """The model's inferred spec, verified unless the model is on the meta device (cached by both)."""
    key = (name, json.dumps(options, sort_keys=True))
    if key in _SPEC_CACHE:
        return _SPEC_CACHE[key]
    if not _on_meta(model):
        _SPEC_CACHE[key] = infer_spec(model, example_input(name, model))
        return _SPEC_CACHE[key]
    if (*key, "unverified") not in _SPEC_CACHE:
        with torch.device("meta"):
            _SPEC_CACHE[(*key, "unverified")] = infer_spec(model, example_input(name, model), verify=False)
    return _SPEC_CACHE[(*key, "unverified")]


def _model_and_spec(architecture, shapes, configs=None, meta=False) -> tuple[torch.nn.Module, PermutationSpec, dict]:
    if not isinstance(architecture, dict) or not isinstance(architecture.get("name"), str):
        raise MatchingError('architecture must be an object {"name": ..., "options": {...}}')
    name = architecture["name"]
    user = architecture.get("options") or {}
    if not isinstance(user, dict):
        raise MatchingError("architecture options must be an object")
    if name == "hf":
        user = _hf_options(user, configs)
    options = {**infer_options(name, shapes), **user}
    model = _build(name, options, meta)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Buffers a checkpoint may leave out, and names that share a parameter with another one (tied embeddings,
    # which save_pretrained writes once): filled in by _full_state.
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    for group in tied_groups(model):
        if any(name in shapes for name in group):
            optional |= set(group) - set(shapes)
    missing = sorted(set(expected) - set(shapes) - optional)
    extra = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}")
        if extra:
            parts.append(f"unexpected tensors {extra[:5]}")
        if wrong:
            parts.append("wrong shapes " + ", ".join(f"{k}: {list(shapes[k])} (expected {list(expected[k])})" for k in wrong[:5]))
        shown = {k: v for k, v in options.items() if k != "config"}  # hf: the checkpoint's own config.json
        raise MatchingError(f"checkpoint does not fit architecture {name!r} with options {shown}: " + "; ".join(parts))
    return model, _spec_of(name, options, model), options


def check_inputs(shapes: list[dict[str, tuple[int, ...]]], *, method: str, architecture: dict | None = None,
                 permutation_spec: dict | None = None, options: dict | None = None, has_dataset: bool = False,
                 has_eval_dataset: bool = False, example_shapes: list[tuple[int, ...]] = (),
                 configs: list[dict | None] | None = None) -> None:
    """Cheap validation from checkpoint shapes (and the per-example input shapes of the datasets) only;
    raises MatchingError with an actionable message. ``configs``: the checkpoints' config.json (model folders;
    None for a plain checkpoint), which architecture ``hf`` builds the model from."""
    # A job that will stream builds its model on the meta device when it is large (as the worker will): the API
    # process that validates the request must not hold the model in float32 and its spec's verification.
    meta = streams(method, len(shapes), has_dataset or has_eval_dataset, options)
    model, _, _, arch_options = _check(shapes, method, architecture, permutation_spec, options, has_dataset,
                                       has_eval_dataset, configs, meta)
    for example_shape in example_shapes if model is not None else ():
        check_example_shape(architecture["name"], arch_options, tuple(example_shape))


def _takes(name: str, model: torch.nn.Module) -> str:
    """', which takes e.g. [1, 32, 32]' when the architecture says what it takes (no framework message:
    it names the model's internals, not the user's data)."""
    try:
        return f"; it takes inputs of per-example shape {list(example_input(name, model).shape[1:])}"
    except Exception:
        return ""


def check_example_shape(name: str, arch_options: dict, example_shape: tuple[int, ...]) -> None:
    """Whether the model takes inputs of this per-example shape, traced on the meta device (no memory, no compute)."""
    if name == "hf":
        with torch.device("meta"):
            return check_input_shape(build_model(name, **arch_options), example_shape)
    try:
        with torch.device("meta"):
            probe = build_model(name, **arch_options).eval()
    except MatchingError:  # its initialisation needs data (RegNet): build it for real, then move it to meta
        probe = build_model(name, **arch_options).eval().to("meta")
    with torch.device("meta"):
        for dtype in (torch.float32, torch.int64):  # features, or token ids
            try:
                probe(torch.zeros(2, *example_shape, dtype=dtype))
                return
            except (RuntimeError, ValueError, IndexError, AssertionError):
                continue
    raise MatchingError(f"dataset inputs have per-example shape {list(example_shape)}, which architecture "
                        f"{name!r} with options {arch_options} cannot take{_takes(name, probe)}")


def _check(shapes, method, architecture, permutation_spec, options, has_dataset, has_eval_dataset=False, configs=None,
           meta=False):
    if method not in METHODS:
        raise MatchingError(f"unknown method {method!r}; use one of {list(METHODS)}")
    opts = _options(options)
    if len(shapes) < 2:
        raise MatchingError("give at least two checkpoints (two = align B to A; three or more = MergeMany)")
    if method == "zip" and len(shapes) != 2:
        raise MatchingError(f"zip merges two checkpoints, not {len(shapes)}; for three or more use another method (MergeMany)")
    if method == "zip" and opts["repair"] == "repair":
        raise MatchingError("repair='repair' is not available with zip (its units are merged features, not A's and B's "
                            "units); use 'reset' or 'none'")
    if (architecture is None) == (permutation_spec is None):
        raise MatchingError("give exactly one of 'architecture' and 'permutation_spec'")
    first = {k: tuple(v) for k, v in shapes[0].items()}
    if not first:
        raise MatchingError("checkpoint 0 holds no tensors")
    for i, other in enumerate(shapes[1:], 1):
        other = {k: tuple(v) for k, v in other.items()}
        if set(other) != set(first):
            diff = sorted(set(other) ^ set(first))
            raise MatchingError(f"checkpoints 0 and {i} have different tensors (e.g. {diff[:5]}); all must share one architecture")
        wrong = [k for k in first if first[k] != other[k]]
        if wrong:
            k = wrong[0]
            raise MatchingError(f"checkpoints 0 and {i} differ in shape: {k} is {list(first[k])} vs {list(other[k])}")
    if method != "weight_matching" and not has_dataset:
        raise MatchingError(f"{method} needs a dataset (the 'dataset' field / --data)"
                            + (": it compares the candidates on its held-out split" if method == "auto" else ""))
    if opts["repair"] in ("reset", "repair") and not (has_dataset or has_eval_dataset):
        raise MatchingError(f"repair={opts['repair']!r} computes statistics on data: give a 'dataset' (or an "
                            "'eval_dataset', whose 'inputs' are then used)")
    partial = [o for o in PARTIAL_OPTIONS if opts[o] is not None]
    if partial and len(shapes) != 2:
        raise MatchingError(f"option(s) {partial} need exactly two checkpoints (A and B: two heads)")
    if opts["label_sets"] is not None and not (has_dataset or has_eval_dataset):
        raise MatchingError("option 'label_sets' is for the joint accuracy on evaluation data: give an 'eval_dataset' "
                            "(or a 'dataset')")
    if permutation_spec is not None:
        if partial:
            raise MatchingError(f"option(s) {partial} need a model to run data through; give an architecture instead "
                                "of a bare permutation_spec")
        if opts["repair"] in ("reset", "repair"):
            raise MatchingError(f"repair={opts['repair']!r} needs a model to run data through; give an architecture "
                                "instead of a bare permutation_spec")
        if method != "weight_matching":
            raise MatchingError(f"{method} needs a model to run data through; with a bare permutation_spec only weight_matching is possible (give an architecture instead)")
        spec = spec_from_json(permutation_spec)
        perm_sizes(spec, first)
        return None, spec, opts, None
    model, spec, arch_options = _model_and_spec(architecture, first, configs, meta)
    if partial:
        _check_partial(model, spec, architecture["name"], opts)
    return model, spec, opts, arch_options


def _check_partial(model, spec, name, opts) -> None:
    """merge_until names a module the model calls or a permutation; label_sets' classes are model outputs."""
    from matching.zipped import resolve_cut, trace_calls
    example = example_input(name, model)
    calls = trace_calls(model, example)
    if opts["merge_until"] not in (None, "sweep"):
        resolve_cut(model, spec, calls, opts["merge_until"])
    if opts["label_sets"] is not None:
        with torch.no_grad():
            output = model.eval()(**example) if isinstance(example, dict) else model.eval()(example)
        outputs = output_logits(output).shape[-1]
        top = max(c for s in opts["label_sets"] for c in s)
        if top >= outputs:
            raise MatchingError(f"option 'label_sets' names class {top} but the model has {outputs} outputs")


def _resolve_device(device: str) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MatchingError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise MatchingError(f"device {device!r} is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise MatchingError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or auto")
    return dev


def _ticker(progress, should_cancel, min_interval: float = 0.25):
    """tick(stage, completed, total, message): checks cancellation every call, reports at most every
    ``min_interval`` seconds (and always at the end of a stage)."""
    last = [0.0]

    def tick(stage, completed, total, message=""):
        if should_cancel is not None and should_cancel():
            raise Cancelled("job cancelled")
        now = time.monotonic()
        if progress is not None and (completed >= total or now - last[0] >= min_interval):
            last[0] = now
            progress(stage, int(completed), int(total), message)
    return tick


def _check_finite(states):
    for i, state in enumerate(states):
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise MatchingError(f"checkpoint {i}: {key!r} is not a tensor")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise MatchingError(f"checkpoint {i}: tensor {key!r} contains NaN or Inf")
            if tensor.is_complex():
                raise MatchingError(f"checkpoint {i}: tensor {key!r} is complex; only real tensors are supported")


def _full_state(model, state):
    """The checkpoint with what it may leave out: a tied name gets the tensor it is tied to, an optional buffer
    (num_batches_tracked) the model's default."""
    full = dict(state)
    for group in tied_groups(model):
        present = next((name for name in group if name in full), None)
        for name in group if present is not None else ():
            full.setdefault(name, full[present])
    for key, value in model.state_dict().items():  # a meta model's: only num_batches_tracked (0) may be missing
        full.setdefault(key, torch.zeros(value.shape, dtype=value.dtype) if value.is_meta else value.clone())
    return full


def _to_device(dataset: Dataset, dev: torch.device) -> Dataset:
    move = lambda t: None if t is None else t.to(dev)
    return Dataset(*(move(getattr(dataset, f.name)) for f in dataclasses.fields(Dataset)))


def _eval_split(dataset: Dataset | None, eval_dataset: Dataset | None):
    """Held-out data when there is one: eval_dataset's eval split, else its inputs; else the dataset's eval
    split; else the training inputs (reported as such). (inputs, targets, split name, attention mask)"""
    for data, name in ((eval_dataset, "eval_dataset"), (dataset, "dataset")):
        if data is not None:
            if data.eval_inputs is not None:
                return data.eval_inputs, data.eval_targets, f"{name}:eval", data.eval_attention_mask
            return data.inputs, data.targets, name if data is eval_dataset else "dataset:train", data.attention_mask
    return None, None, None, None


def _check_data_fits(model, dataset: Dataset, name: str, device, architecture: str):
    for inputs, targets, mask in ((dataset.inputs, dataset.targets, dataset.attention_mask),
                                  (dataset.eval_inputs, dataset.eval_targets, dataset.eval_attention_mask)):
        if inputs is None:
            continue
        try:
            with torch.no_grad():
                logits = model_logits(model.eval(), model_input(inputs[:2], device), None if mask is None else mask[:2])
        except (RuntimeError, ValueError, IndexError):
            raise MatchingError(f"{name} inputs of shape {list(inputs.shape[1:])} per example do not fit the model"
                                f"{_takes(architecture, model)}") from None
        if logits.dim() != targets.dim() + 1 or int(targets.max()) >= logits.shape[-1]:  # [N, T] targets: [N, T, V]
            raise MatchingError(f"{name} has class labels up to {int(targets.max())} but the model has {logits.shape[-1]} outputs")


def streams(method: str, num_inputs: int, has_data: bool, options: dict | None) -> bool:
    """Whether a job takes the streaming path: weight matching of a pair without data (no model runs, so
    nothing needs whole models in memory). A partial merge builds the zipped model from real tensors."""
    return (method == "weight_matching" and num_inputs == 2 and not has_data
            and not any((options or {}).get(o) is not None for o in PARTIAL_OPTIONS))


def merge_checkpoints(states: list[dict[str, torch.Tensor]], *, method: str = "weight_matching",
                      architecture: dict | None = None, permutation_spec: dict | None = None,
                      dataset: str | Path | None = None, eval_dataset: str | Path | None = None,
                      options: dict | None = None, device: str = "cpu",
                      progress: Callable[[str, int, int, str], None] | None = None,
                      should_cancel: Callable[[], bool] | None = None,
                      configs: list[dict | None] | None = None) -> MergeOutcome:
    """Align checkpoints (2: B to A; >= 3: MergeMany), merge them, and evaluate when there is eval data.
    ``configs``: each checkpoint's config.json when it is a model folder (architecture ``hf`` needs them)."""
    started = time.perf_counter()
    tick = _ticker(progress, should_cancel)
    tick("validate", 0, 1, "checking inputs")
    shapes = [{k: tuple(v.shape) for k, v in s.items()} for s in states]
    # Weight matching of a pair without data streams: no model runs (no BN reset, REPAIR or evaluation), so a
    # large one is built on the meta device, the checkpoints are read tensor by tensor where they lie (memory
    # maps: load_checkpoint, load_folder), and the outputs are computed as they are written (LazyState).
    streaming = streams(method, len(states), dataset is not None or eval_dataset is not None, options)
    model, spec, opts, arch_options = _check(shapes, method, architecture, permutation_spec, options,
                                             dataset is not None, eval_dataset is not None, configs, streaming)
    if method == "auto":
        return _merge_auto(states, opts, started, architecture=architecture, dataset=dataset,
                           eval_dataset=eval_dataset, options=options, device=device, progress=progress,
                           should_cancel=should_cancel, configs=configs)
    _check_finite(states)
    dev = _resolve_device(device)
    dtypes = {k: v.dtype for k, v in states[0].items()}
    train = load_dataset(dataset) if dataset is not None else None
    held_out = load_dataset(eval_dataset) if eval_dataset is not None else None
    # Every stage works on the job's device: the checkpoints and the evaluation data cross to it once, here,
    # and the results come back once, at the end.
    if not streaming:
        states = [{k: v.to(dev) for k, v in s.items()} for s in states]
    train, held_out = (d if d is None else _to_device(d, dev) for d in (train, held_out))
    if model is not None:
        model = model if _on_meta(model) else model.to(dev)
        states = [_full_state(model, s) for s in states]
        for data, name in ((train, "dataset"), (held_out, "eval_dataset")):
            if data is not None:
                _check_data_fits(model, data, name, dev, architecture["name"])
    elif train is not None or held_out is not None:
        train = held_out = None  # a bare spec has no model to evaluate: data is ignored (documented)
    eval_inputs, eval_targets, eval_split, eval_mask = _eval_split(train, held_out)
    # Data for BN reset and REPAIR statistics: the dataset's training inputs, else the eval dataset's `inputs` (its
    # training split when it also has an eval split, else the evaluation data itself).
    bn_inputs, bn_split = None, None
    if train is not None:
        bn_inputs, bn_split = model_input(train.inputs, train.inputs.device), "dataset:train"
    elif held_out is not None:
        bn_inputs = model_input(held_out.inputs, held_out.inputs.device)
        bn_split = "eval_dataset:train" if held_out.eval_inputs is not None else "eval_dataset"
    tick("validate", 1, 1, "inputs ok")

    report: dict = {"method": method, "num_checkpoints": len(states),
                    "options": _reported_options(opts, method)}
    if arch_options is not None:
        shown = {k: v for k, v in arch_options.items() if k != "config"}  # hf: the config is the checkpoint's own
        report["architecture"] = {"name": architecture["name"], "options": shown}
    if method == "zip":
        merged, aligned, match_info, permutation = _zip_pair(spec, model, states[0], states[1], train, opts, dev, tick)
        endpoints, weights = [states[0], aligned[0]], [1 - opts["merge_lambda"], opts["merge_lambda"]]
    elif streaming:
        perms, match_info = _align_pair(method, spec, model, states[0], states[1], train, opts, dev, tick,
                                        cache_bytes=STREAM_CACHE_BYTES)
        aligned, merged = _streamed_outputs(spec, perms, states, dtypes, opts["merge_lambda"])
        permutation = {**spec_to_json(spec), "permutations": {p: v.tolist() for p, v in perms.items()}}
    elif len(states) == 2:
        perms, match_info = _align_pair(method, spec, model, states[0], states[1], train, opts, dev, tick)
        aligned = [apply_permutation(spec, perms, states[1])]
        merged = interpolate(states[0], aligned[0], opts["merge_lambda"])
        endpoints, weights = [states[0], aligned[0]], [1 - opts["merge_lambda"], opts["merge_lambda"]]
        permutation = {**spec_to_json(spec), "permutations": {p: v.tolist() for p, v in perms.items()}}
    else:
        from matching.merge_many import merge_many
        all_perms, match_info = merge_many(method, spec, model, states, train, opts, dev, tick, _align_pair)
        aligned = [apply_permutation(spec, p, s) for p, s in zip(all_perms, states)]
        merged = {k: (torch.stack([a[k].float() for a in aligned]).mean(0) if v.is_floating_point() else v)
                  for k, v in states[0].items()}
        endpoints, weights = aligned, [1 / len(aligned)] * len(aligned)
        permutation = {**spec_to_json(spec), "permutations": [{p: v.tolist() for p, v in perms.items()}
                                                              for perms in all_perms]}
    report["matching"] = match_info

    mode, chosen = (opts["repair"], "option") if opts["repair"] is not None else (repair_default(model, bn_inputs), "default")
    if method == "zip" and mode == "repair":  # its units are merged features: the endpoints' statistics do not apply
        mode = "none"
    bn_reset = False
    if model is not None and bn_inputs is not None and mode != "none":
        repairer = Repair(model, spec, endpoints, bn_inputs) if mode == "repair" else None
        model.load_state_dict(merged)
        if has_batchnorm(model):
            reset_batchnorm(model, bn_inputs)
            bn_reset = True
        if repairer is not None:
            repairer.apply(model, weights)
            tick("repair", 1, 1, f"repaired {len(repairer.points)} layers")
        merged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report["merged_bn_reset"] = bn_reset
    report["repair"] = {"mode": mode, "chosen_by": chosen, "data": bn_split if mode != "none" else None,
                        "layers": repair_points(model, spec) if mode == "repair" else [],
                        "definition": REPAIR_DEFINITION}

    if model is not None and eval_inputs is not None:
        train_split = _train_split(train, held_out)
        report.update(_evaluation(model, spec, states, aligned, merged, opts, (model_input(eval_inputs, eval_inputs.device), eval_targets, eval_split, eval_mask),
                                  train_split, bn_inputs, mode == "repair", tick))
    zipped = zipped_metadata = None
    if any(opts[o] is not None for o in PARTIAL_OPTIONS):
        from matching.zipped import partial_merge, zipped_metadata as metadata
        arch = {"name": architecture["name"], "options": arch_options}
        targets_ok = eval_targets is not None and eval_targets.dim() == 1
        if opts["label_sets"] is not None and not targets_ok:
            raise MatchingError("option 'label_sets' needs class labels of shape [N] in the evaluation data")
        held = (model_input(eval_inputs, eval_inputs.device), eval_targets) if targets_ok and eval_mask is None else None
        trunk_merge = _zip_trunk(spec, model, states, train, opts, dev, tick) if method == "zip" else None
        partial, zipped = partial_merge(arch, spec, states[0], aligned[0], merged, merge_until=opts["merge_until"],
                                        label_sets=opts["label_sets"], held_out=held,
                                        bn_inputs=bn_inputs if mode != "none" else None, device=dev, tick=tick,
                                        trunk_merge=trunk_merge)
        report.update(partial)
        if zipped is not None:
            zipped_metadata = metadata(arch, report["partial"]["cut"])
            zipped = {k: v.to(dtypes.get(k.split(".", 2)[-1] if k.startswith("heads.") else k[len("trunk."):],
                                         v.dtype)) for k, v in zipped.items()}
    report["seconds_total"] = time.perf_counter() - started
    if streaming:  # no data, so nothing above changed them: written as they are computed
        return MergeOutcome(merged=merged, aligned=aligned, permutation=permutation, report=report)
    cast = lambda s: {k: v.detach().to("cpu", dtypes[k]).contiguous() for k, v in s.items() if k in dtypes}
    return MergeOutcome(merged=cast(merged), aligned=[cast(a) for a in aligned], permutation=permutation,
                        report=report, zipped=zipped, zipped_metadata=zipped_metadata)


def _streamed_outputs(spec, perms, states, dtypes, merge_lambda) -> tuple[list[LazyState], LazyState]:
    """[aligned B] and the merged model as LazyStates: each tensor permuted (and interpolated, in float32 as
    ``interpolate``) when it is read, in the checkpoint's dtype, as the in-memory path computes it."""
    a, b = states
    layout = {k: (dtype, tuple(a[k].shape)) for k, dtype in dtypes.items()}
    within = within_axes(spec, {k: s for k, (_, s) in layout.items() if k in spec.axes_to_perm},
                         {p: len(v) for p, v in perms.items()}) if spec.perms else {}

    def permuted(key):
        return permute_tensor(spec, perms, key, b[key], within)

    def merged(key):
        t = a[key]
        t = torch.lerp(t.float(), permuted(key).to(t.device).float(), merge_lambda) if t.is_floating_point() else t
        return t.detach().to("cpu", dtypes[key]).contiguous()

    aligned = LazyState(layout, lambda key: permuted(key).detach().to("cpu", dtypes[key]).contiguous())
    return [aligned], LazyState(layout, merged)


def _auto_score(report: dict) -> tuple[float, str]:
    """What ``auto`` minimises: a pair's held-out loss barrier with the job's statistics correction (the
    REPAIRed curve when there is one; a BN network's curves include the reset), MergeMany's merged loss."""
    if report["num_checkpoints"] > 2:
        return report["merged"]["loss"], "merged_loss"
    curve = "aligned_repair" if "aligned_repair" in report["barrier"] else "aligned"
    return report["barrier"][curve]["loss"], curve


def _merge_auto(states, opts, started, *, options, progress, should_cancel, **job) -> MergeOutcome:
    """method "auto": weight and activation matching, then STE while options.time_budget_s lasts (it is stopped
    when the budget runs out; without a budget it is not run); each merged and evaluated as its job would be
    (same options, same correction), the one with the lowest held-out barrier kept (``_auto_score``)."""
    budget = opts["time_budget_s"]
    candidates, skipped, best = {}, {}, None
    for method in AUTO_CANDIDATES:
        elapsed = time.perf_counter() - started
        if method == "ste_matching" and (budget is None or elapsed >= budget):
            skipped[method] = ("no options.time_budget_s" if budget is None
                               else f"time_budget_s ({budget:g} s) spent before it started")
            continue
        over_budget = [False]

        def cancel(method=method, over_budget=over_budget):
            if should_cancel is not None and should_cancel():
                return True
            over_budget[0] = budget is not None and method == "ste_matching" and time.perf_counter() - started > budget
            return over_budget[0]

        def report_progress(stage, completed, total, message, method=method):
            if progress is not None:
                progress(stage, completed, total, f"auto, {method}: {message}")

        own = {k: v for k, v in (options or {}).items() if k != "time_budget_s" and k in METHOD_OPTIONS[method]}
        t0 = time.perf_counter()
        try:
            outcome = merge_checkpoints(states, method=method, options=own, progress=report_progress,
                                        should_cancel=cancel, **job)
        except Cancelled:
            if not over_budget[0]:
                raise
            skipped[method] = f"stopped when time_budget_s ({budget:g} s) ran out"
            continue
        score, curve = _auto_score(outcome.report)
        report = outcome.report
        candidates[method] = {"score": score, "barrier": report["barrier"].get(curve) if curve != "merged_loss" else None,
                              "barrier_naive": report["barrier"]["naive"], "merged": report["merged"],
                              "seconds": time.perf_counter() - t0}
        if best is None or score < best[0]:
            best = (score, method, outcome)
    _, chosen, outcome = best
    report = outcome.report
    report["method"] = "auto"
    report["options"] = _reported_options(opts, "auto")
    report["auto"] = {"chosen": chosen, "criterion": _AUTO_CRITERION, "split": report["evaluation"]["split"],
                      "time_budget_s": budget, "candidates": candidates, "skipped": skipped}
    report["seconds_total"] = time.perf_counter() - started
    return outcome


_AUTO_CRITERION = ("the lowest held-out loss barrier of the aligned pair with the job's statistics correction "
                   "(aligned_repair when REPAIR runs, else aligned: BN networks' curves include the BN reset); "
                   "MergeMany: the lowest held-out loss of the merged model")


REPAIR_DEFINITION = ("none: the plain interpolation; reset: BatchNorm running statistics re-estimated on the data; "
                     "repair: REPAIR (Jordan et al., ICLR 2023), every permuted layer's output channels rescaled to the "
                     "interpolated mean and std of the endpoints' (after a BN reset), folded into weights and biases")


def repair_default(model, bn_inputs) -> str:
    """Per architecture, by measurement (benchmarks/reproduce.py, docs/reproduction/report.md): BatchNorm networks
    "reset", networks without BatchNorm "repair"; "none" without data to compute statistics on."""
    if model is None or bn_inputs is None:
        return "none"
    return "reset" if has_batchnorm(model) else "repair"


def _train_split(train: Dataset | None, held_out: Dataset | None):
    """The training split for the train-split barrier: the dataset's inputs, else the eval dataset's training
    split when it has a separate held-out one; at most TRAIN_EVAL_MAX_EXAMPLES examples, evenly strided."""
    if train is not None:
        data, name = train, "dataset:train"
    elif held_out is not None and held_out.eval_inputs is not None:
        data, name = held_out, "eval_dataset:train"
    else:
        return None
    inputs, targets = subsample(model_input(data.inputs, data.inputs.device), data.targets, TRAIN_EVAL_MAX_EXAMPLES)
    mask = None if data.attention_mask is None else subsample(data.attention_mask, max_examples=TRAIN_EVAL_MAX_EXAMPLES)[0]
    return inputs, targets, name, len(data.inputs), mask


def buffer_keys(model, state) -> set[str]:
    """The checkpoint's tensors that are not learned parameters: the model's buffers, or without a model (a bare
    permutation_spec) those named like BatchNorm running statistics. Weight matching permutes them, never matches
    on them."""
    if model is None:
        return statistics_keys(state)
    return {k for k, _ in model.named_buffers()}


def _align_pair(method, spec, model, state_a, state_b, train, opts, dev, tick, init_perms=None, cache_bytes=None):
    """Permutations of B into A's basin, and the matching report (``cache_bytes``: weight matching streams)."""
    if method == "weight_matching":
        return weight_matching(spec, state_a, state_b, max_iter=opts["max_iter"], seed=opts["seed"], device=dev,
                               init_perms=init_perms, unmatched=buffer_keys(model, state_a), cache_bytes=cache_bytes,
                               tick=lambda i, n, msg: tick("weight_matching", i, n, msg))
    if method == "activation_matching":
        from matching.activation_matching import activation_matching
        return activation_matching(spec, model, state_a, state_b, train.inputs, batch_size=opts["batch_size"],
                                   device=dev, tick=lambda i, n, msg: tick("activation_matching", i, n, msg))
    from matching.ste_matching import ste_matching
    return ste_matching(spec, model, state_a, state_b, train, steps=opts["steps"], learning_rate=opts["learning_rate"],
                        batch_size=opts["batch_size"], seed=opts["seed"], max_iter=opts["max_iter"], device=dev,
                        tick=lambda i, n, msg: tick("ste_matching", i, n, msg))


def _zip_pair(spec, model, state_a, state_b, train, opts, dev, tick):
    """ZipIt! (matching.zipit), a full merge: (merged, aligned, matching report, permutation.json). B is not
    permuted (its features are merged, not matched one to one): ``aligned`` is B as given, so the "aligned"
    curves are the naive ones; the merged model is evaluated in ``report["merged"]``. BN statistics are
    re-estimated afterwards with the job's repair mode (reset), like every other method's."""
    from matching.zipit import clusters, zipit_merge
    result = zipit_merge(spec, model, state_a, state_b, train.inputs, alpha=opts["alpha"], beta=opts["beta"],
                         merge_lambda=opts["merge_lambda"], reset_bn=False, batch_size=opts["batch_size"], device=dev,
                         tick=lambda i, n, msg: tick("zip", i, n, msg))
    info = {**result.info, "aligned": "B as given: zip merges features, it does not permute B"}
    permutation = {**spec_to_json(spec), "zip": {p: clusters(u) for p, u in result.unmerges.items()},
                   "zip_definition": "per permutation, each merged unit's members [[A's units], [B's units]]; the "
                                     "merged unit is their weighted average (merge_lambda), and each member reads it back"}
    return result.merged, [state_b], info, permutation


def _zip_trunk(spec, model, states, train, opts, dev, tick):
    """Method zip with merge_until: each cut's trunk zipped on its own (matching.zipit, the merge and unmerge
    folded into the trunk and into each head's first layers), from correlations computed once for every cut."""
    from matching.zipit import feature_correlations, merged_permutations, zipit_merge
    correlations = {}

    def trunk_merge(keys):
        if not correlations:
            correlations.update(feature_correlations(spec, model, states[0], states[1], train.inputs,
                                                     merged_permutations(spec, None), batch_size=opts["batch_size"],
                                                     device=dev, tick=lambda i, n, m: tick("zip", i, n, m)))
        result = zipit_merge(spec, model, states[0], states[1], train.inputs, alpha=opts["alpha"], beta=opts["beta"],
                             trunk=keys, merge_lambda=opts["merge_lambda"], batch_size=opts["batch_size"], device=dev,
                             correlations=correlations)
        return [{**state, **result.merged, **head} for state, head in zip(states, result.heads)]
    return trunk_merge


def _evaluation(model, spec, states, aligned, merged, opts, held_out, train_split, bn_inputs, repair, tick) -> dict:
    """Curves for the naive pair (A, B), the aligned pair (A, pi(B)) and, with REPAIR, the aligned pair repaired at
    every point; on the held-out split (``barrier``, ``curves``) and the training split (``barrier_train``,
    ``curves_train``). MergeMany: between inputs 0 and 1, and every input and the merged model on its own."""
    lambdas = [i / (opts["lambdas"] - 1) for i in range(opts["lambdas"])]
    a, b = states[0], states[1]
    aligned_a, aligned_b = (a, aligned[0]) if len(states) == 2 else (aligned[0], aligned[1])
    inputs, targets, split, mask = held_out
    splits = {"held_out": (inputs, targets, mask)}
    if train_split is not None and train_split[2] != split:
        splits["train"] = (*train_split[:2], train_split[4])
    curves = {
        "naive": interpolation_curves(model, a, b, lambdas, splits, bn_inputs,
                                      tick=lambda i, n, m: tick("evaluate_naive", i, n, m)),
        "aligned": interpolation_curves(model, aligned_a, aligned_b, lambdas, splits, bn_inputs,
                                        tick=lambda i, n, m: tick("evaluate_aligned", i, n, m)),
    }
    if repair:
        repairer = Repair(model, spec, [aligned_a, aligned_b], bn_inputs)
        curves["aligned_repair"] = interpolation_curves(model, aligned_a, aligned_b, lambdas, splits, bn_inputs,
                                                        repair=repairer,
                                                        tick=lambda i, n, m: tick("evaluate_aligned_repair", i, n, m))

    def on(split_key):
        return ({name: {"loss": barrier(c[split_key]["loss"], lambdas),
                        "accuracy": barrier(c[split_key]["accuracy"], lambdas, True)} for name, c in curves.items()},
                {"lambdas": lambdas, **{name: c[split_key] for name, c in curves.items()}})

    bn_reset = bn_inputs is not None and has_batchnorm(model)
    out = {
        "evaluation": {"split": split, "num_examples": len(inputs), "bn_reset": bn_reset, "repair": repair,
                       "barrier_definition": "max over lambda of L(lambda) - ((1-lambda) L(0) + lambda L(1)); "
                                             "accuracy: the largest drop below the line between the endpoints"},
    }
    out["barrier"], out["curves"] = on("held_out")
    if train_split is not None:
        train_key = "train" if "train" in splits else "held_out"
        out["evaluation_train"] = {"split": train_split[2], "num_examples": len(train_split[0]),
                                   "num_examples_in_split": train_split[3], "bn_reset": bn_reset, "repair": repair}
        out["barrier_train"], out["curves_train"] = on(train_key)
    model.load_state_dict(merged)
    out["merged"] = evaluate(model, inputs, targets, mask)
    if "train" in splits:
        out["merged_train"] = evaluate(model, *splits["train"])
    if len(states) > 2:
        inputs_eval = []
        for s in states:
            model.load_state_dict(s)
            inputs_eval.append(evaluate(model, inputs, targets, mask))
        naive_avg = {k: (torch.stack([s[k].float() for s in states]).mean(0) if v.is_floating_point() else v)
                     for k, v in states[0].items()}
        model.load_state_dict(naive_avg)
        if bn_inputs is not None and has_batchnorm(model):
            reset_batchnorm(model, bn_inputs)
        out["merge_many"] = {"inputs": inputs_eval, "naive_average": evaluate(model, inputs, targets, mask),
                             "merged": out["merged"],
                             "curves_between": "aligned inputs 0 and 1 (naive: inputs 0 and 1)"}
    return out


def write_artifacts(outcome: MergeOutcome, out_dir: Path, layout: FolderLayout | None = None,
                    folders: str = "tar", shard_bytes: int | None = None) -> list[Path]:
    """merged.safetensors, aligned.safetensors (MergeMany: aligned_<i>.safetensors), permutation.json,
    report.json, and barrier.png when there was evaluation data. With the ``layout`` of model-folder inputs, the
    models are model folders laid out the same way instead: ``merged.tar``, ``aligned.tar`` (``aligned_<i>.tar``),
    or with ``folders="dir"`` the directories ``merged/``, ``aligned/`` (what ``rebasin download`` unpacks).
    ``shard_bytes`` (rebasin merge): a plain model larger than that is written as save_pretrained shards it,
    ``merged-0000k-of-0000n.safetensors`` with ``merged.safetensors.index.json``. Every model is written one
    tensor at a time."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(state, stem):
        if layout is None:
            shards = shard_plan(tensor_layout(state), shard_bytes or math.inf, stem)
            written.extend(write_shards(state, shards, out_dir, f"{stem}.safetensors.index.json"))
        elif folders == "dir":
            written.append(write_folder(state, layout, out_dir / stem))
        else:
            written.append(write_folder_tar(state, layout, out_dir / f"{stem}.tar"))

    save(outcome.merged, "merged")
    if len(outcome.aligned) == 1:
        save(outcome.aligned[0], "aligned")
    else:
        for i, state in enumerate(outcome.aligned):
            save(state, f"aligned_{i}")
    if outcome.zipped is not None:
        path = out_dir / "zipped.safetensors"
        save_file({k: v.contiguous() for k, v in outcome.zipped.items()}, str(path), metadata=outcome.zipped_metadata)
        written.append(path)
    for name, obj in (("permutation.json", outcome.permutation), ("report.json", outcome.report)):
        path = out_dir / name
        path.write_text(json.dumps(obj, indent=1, allow_nan=False))
        written.append(path)
    if "curves" in outcome.report:
        path = out_dir / "barrier.png"
        plot_barrier(outcome.report, path)
        written.append(path)
    return written


def plot_barrier(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    curves = report["curves"]
    fig = Figure(figsize=(9, 3.6))
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for name, style in (("naive", "--"), ("aligned", "-"), ("aligned_repair", "-.")):
            if name not in curves:
                continue
            b = report["barrier"][name][metric]
            ax.plot(curves["lambdas"], curves[name][metric], style, marker=".", label=f"{name} (barrier {b:.3g})")
        ax.set_xlabel("lambda (0 = model A, 1 = model B)")
        ax.set_ylabel(f"{metric} ({report['evaluation']['split']})")
        ax.legend()
    fig.suptitle(f"Linear interpolation, {report['method']}")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
