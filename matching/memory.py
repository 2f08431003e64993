"""How much memory a merge job needs, known before anything is loaded, and how much it used.

``estimate_peak`` bounds a job's peak anonymous memory (RssAnon: the process's own heap and anonymous maps,
not the page cache of files it reads) from what a worker knows without loading a tensor: each input's
tensor shapes and dtypes (the safetensors headers, kept in the database), the method, the dataset sizes,
the number of inputs, and whether the data path streams. The formula, every size in bytes::

    peak = baseline
         + slack * ( INPUT    * sum_i input_bytes_i          # the inputs as loaded (their own dtypes)
                   + (MODEL + MERGE_MANY * n) * model_fp32_bytes  # working copies in float32; n = inputs if > 2, else 0
                   + DATA     * dataset_bytes                # dataset and eval dataset, as stored
                   + ACTIVATIONS * batch_rows * example_bytes    # an evaluation batch's widest activation
                   + ALL_ACTIVATIONS * training_rows * all_bytes )  # a statistics/training batch, every layer
         + overhead

- ``baseline``: the process's anonymous memory when the job starts (the interpreter, torch, what the last
  job left in the allocator); the worker measures it, ``rebasin merge`` passes 0.
- ``input_bytes_i``: the bytes of input i's tensors in their stored dtype; ``model_fp32_bytes``: one input's
  floating tensors at 4 bytes an element, integers as stored (weight matching, interpolation, evaluation and
  the model itself all work in float32).
- ``dataset_bytes``: the stored bytes of the dataset and eval dataset; ``example_bytes``: the widest
  activation of one example in float32 (the largest module output, found by a forward pass of the
  architecture on the meta device: a CNN's widest feature map, a language model's logits), else
  ``FALLBACK_ACTIVATION_FACTOR`` times one example's input, or for token ids the positions times the
  checkpoint's largest dimension (a vocabulary: the logits); ``batch_rows`` the rows evaluated at once (1000,
  the evaluation batch; the job's batch_size for activation and STE matching when larger; at most the
  dataset's examples); ``all_bytes``: every module output of one example added up (activation matching
  holds both models' captured activations of a batch, STE's autograd every layer's), ``training_rows`` the
  job's batch_size (256).
- ``INPUT``, ``MODEL``, ``MERGE_MANY``, ``DATA``, ``ACTIVATIONS``, ``ALL_ACTIVATIONS``, ``overhead``: per method and per data path, the table
  ``COEFFICIENTS`` (fitted on measurements, see benchmarks/memory_estimate.py and its table in
  benchmarks/README.md); ``slack`` = ``SLACK``.

The in-memory data path (``streams=False``) holds every input whole, float32 copies of the matched tensors (and
their reshaped layouts), the aligned and merged models, the module, and a serialised copy while writing:
measured, 8.5 float32 model copies beyond the inputs for a GPT-2 pair, 4 for an MLP. A streaming data path
has its own row (``streams=True``, for the jobs ``matching.merge.streams`` sends down it).

Peaks are measured by ``PeakSampler``: a thread reading the process's RssAnon from /proc/self/status every
few milliseconds. The kernel keeps a high-water mark only of the whole resident set (VmHWM, file pages
included: memory-mapped checkpoints would count), not of the anonymous part, so a spike shorter than the
sampling interval can be missed; touching a gigabyte takes longer than that.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

# Bytes per element of the safetensors dtypes.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}
EVALUATION_BATCH_ROWS = 1000  # matching.evaluate.evaluate's batch
SLACK = 1.25
# Without a model to run on the meta device: the widest activation taken as this many times the input.
FALLBACK_ACTIVATION_FACTOR = 64
FALLBACK_LAYERS = 64
DEFAULT_BATCH_SIZE = 256  # activation and STE matching's batch_size (matching.merge.DEFAULTS)
MiB = 1024**2


@dataclass(frozen=True)
class Coefficients:
    """The terms of one method on one data path (see the module docstring)."""

    input: float  # per byte of every input, as stored
    model: float  # per float32 byte of one model
    merge_many: float  # per float32 byte of one model, per input, with three inputs or more (MergeMany)
    data: float  # per stored byte of the datasets
    activations: float  # per float32 byte of the widest activation of an evaluation batch
    all_activations: float  # per float32 byte of every activation of a training/statistics batch
    overhead: int  # bytes, whatever the size


# (streams, method) -> terms. The in-memory data path (streams=False), fitted on the peaks measured by
# benchmarks/memory_estimate.py (table in benchmarks/README.md): MODEL from the GPT-2 pair (weight matching
# holds about 8 float32 model copies beyond the inputs for a transformer, 4 for an MLP: the upper one is
# kept), MERGE_MANY from the three-MLP MergeMany, ACTIVATIONS from ResNet-20x4 and a small GPT's logits,
# OVERHEAD from a tiny job (imports and traces of a first job, plotting). The streaming data path starts
# from the same numbers until it is measured.
COEFFICIENTS: dict[tuple[bool, str], Coefficients] = {
    (False, "weight_matching"): Coefficients(input=1.0, model=8.5, merge_many=3.0, data=2.0, activations=6.0,
                                             all_activations=0.0, overhead=160 * MiB),
    (False, "activation_matching"): Coefficients(input=1.0, model=8.5, merge_many=3.0, data=2.0, activations=6.0,
                                                 all_activations=0.75, overhead=192 * MiB),
    (False, "ste_matching"): Coefficients(input=1.0, model=11.0, merge_many=3.0, data=2.0, activations=6.0,
                                          all_activations=1.5, overhead=192 * MiB),
    # ZipIt! holds what activation matching does plus each layer's [2n, 2n] correlations and the merge/unmerge
    # matrices (small beside the activations): activation matching's terms, not measured on their own.
    (False, "zip"): Coefficients(input=1.0, model=8.5, merge_many=0.0, data=2.0, activations=6.0,
                                 all_activations=0.75, overhead=192 * MiB),
}
# What method "auto" runs (matching.merge.AUTO_CANDIDATES): its estimate is theirs, the largest.
AUTO_CANDIDATES = ("weight_matching", "activation_matching", "ste_matching")
# The streaming path (matching.merge.streams: weight matching of a pair without data) memory-maps the inputs
# (file pages, not RssAnon), keeps cost matrices and tensor copies within matching.merge.STREAM_CACHE_BYTES
# (512 MiB, in the overhead) and writes the outputs tensor by tensor. Measured by benchmarks/bench_memory.py:
# ViT-L/16 fp32 peak 1.19 GiB for 1.13 GiB a checkpoint, a 1.1 B LLaMA bf16 pair 2.10 GiB for 2.05 GiB (4.1 GiB
# in float32); half a float32 model bounds both above what the cache and the interpreter take.
COEFFICIENTS[(True, "weight_matching")] = Coefficients(input=0.0, model=0.5, merge_many=0.0, data=0.0, activations=0.0,
                                                       all_activations=0.0, overhead=(512 + 256) * MiB)


@dataclass(frozen=True)
class Estimate:
    peak_bytes: int
    baseline_bytes: int
    terms: dict[str, int]  # each term's bytes before slack, for the report


def tensor_bytes(tensors: dict[str, dict], float32: bool = False) -> int:
    """Bytes of a safetensors header's tensors ({name: {dtype, shape}}); ``float32``: floats at 4 bytes."""
    total = 0
    for entry in tensors.values():
        size = DTYPE_BYTES.get(entry["dtype"], 8)
        if float32 and entry["dtype"] in FLOAT_DTYPES:
            size = 4
        total += size * math.prod(entry["shape"])
    return total


def example_bytes(dataset: dict[str, dict]) -> int:
    """One example of a dataset's ``inputs`` in float32 (token ids count as one float each)."""
    shape = dataset.get("inputs", {}).get("shape") or [1]
    return 4 * math.prod(shape[1:])


def activation_bytes(architecture: dict | None, shapes: dict[str, tuple[int, ...]],
                     dataset: dict[str, dict]) -> tuple[int, int] | None:
    """Float32 bytes of the model's module outputs for one example of ``dataset``: (the largest one: logits of
    a language model, the widest feature map of a CNN; all of them added up), from a forward pass on the meta
    device: no memory, no compute. None when it cannot be known before loading (architecture ``hf``, whose
    config.json is in the stored file; a bare permutation spec; a model that does not build or run on meta)."""
    if not architecture or architecture.get("name") in (None, "hf") or "inputs" not in dataset:
        return None
    import torch

    from matching.architectures import build_model, infer_options

    try:
        name = architecture["name"]
        options = {**infer_options(name, shapes), **(architecture.get("options") or {})}
        with torch.device("meta"):
            model = build_model(name, **options).eval()
        widest, total = [0], [0]

        def record(module, args, output):
            for tensor in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(tensor, torch.Tensor):
                    widest[0] = max(widest[0], tensor.numel())
                    total[0] += tensor.numel()

        hooks = [m.register_forward_hook(record) for m in model.modules()]
        entry = dataset["inputs"]
        dtype = torch.float32 if entry["dtype"] in FLOAT_DTYPES else torch.int64
        with torch.no_grad(), torch.device("meta"):
            model(torch.zeros(1, *entry["shape"][1:], dtype=dtype))
        for hook in hooks:
            hook.remove()
        return 4 * widest[0], 4 * total[0]
    except Exception:  # an estimate, not a check: the fallback (example_bytes) takes over
        return None


def _token_logits_bytes(inputs: list[dict[str, dict]], datasets: list[dict[str, dict]]) -> int:
    """Without a model to run: a language model's logits per example, token positions x the checkpoint's
    largest dimension (its vocabulary) in float32; 0 for datasets of features."""
    positions = max((math.prod(d["inputs"]["shape"][1:]) for d in datasets
                     if "inputs" in d and d["inputs"]["dtype"] not in FLOAT_DTYPES), default=0)
    largest = max((max(entry["shape"]) for entry in (inputs[0] if inputs else {}).values() if entry["shape"]), default=0)
    return 4 * positions * largest


def estimate_peak(inputs: list[dict[str, dict]], *, method: str, datasets: list[dict[str, dict]] = (),
                  options: dict | None = None, streams: bool = False, baseline_bytes: int = 0,
                  activations: tuple[int, int] | None = None) -> Estimate:
    """Upper bound of a job's peak RssAnon. ``inputs``: each checkpoint's tensors ({name: {dtype, shape}});
    ``datasets``: the dataset and eval dataset's tensors; ``method``: "auto" runs every candidate in turn and
    counts as the largest; ``activations``: the widest and all activations of one example
    (``activation_bytes``), else one example's input counts, times FALLBACK_ACTIVATION_FACTOR (widest) and
    FALLBACK_LAYERS times that (all)."""
    options = options or {}
    if method == "auto":
        return max((estimate_peak(inputs, method=m, datasets=datasets, options=options, streams=False,
                                  baseline_bytes=baseline_bytes, activations=activations)
                    for m in AUTO_CANDIDATES), key=lambda e: e.peak_bytes)  # auto has data: nothing streams
    terms = COEFFICIENTS[(streams, method)]
    examples = max((entry["shape"][0] for d in datasets for name, entry in d.items()
                    if name in ("inputs", "eval_inputs") and entry["shape"]), default=0)
    batch_rows = min(examples, max(EVALUATION_BATCH_ROWS, int(options.get("batch_size") or 0)))
    per_example = max((example_bytes(d) for d in datasets), default=0)
    if datasets and activations is not None:
        widest, every = max(per_example, activations[0]), max(per_example, activations[1])
    else:
        widest = max(per_example * FALLBACK_ACTIVATION_FACTOR, _token_logits_bytes(inputs, datasets))
        every = widest * FALLBACK_LAYERS
    training_rows = min(examples, int(options.get("batch_size") or DEFAULT_BATCH_SIZE))
    sizes = {
        "inputs": sum(tensor_bytes(t) for t in inputs),
        "model_fp32": tensor_bytes(inputs[0], float32=True) if inputs else 0,
        "datasets": sum(tensor_bytes(d) for d in datasets),
        "activations": batch_rows * widest,
        "all_activations": training_rows * every if method != "weight_matching" else 0,
    }
    many = len(inputs) if len(inputs) > 2 else 0
    job = (terms.input * sizes["inputs"] + (terms.model + terms.merge_many * many) * sizes["model_fp32"]
           + terms.data * sizes["datasets"] + terms.activations * sizes["activations"]
           + terms.all_activations * sizes["all_activations"])
    peak = baseline_bytes + int(SLACK * job) + terms.overhead
    return Estimate(peak_bytes=peak, baseline_bytes=baseline_bytes, terms=sizes)


def rss_anon_bytes() -> int:
    """This process's anonymous resident memory (RssAnon), 0 where /proc does not say."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler:
    """The highest RssAnon of this process while in the ``with`` block, sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="memory-sampler", daemon=True)

    def __enter__(self) -> PeakSampler:
        self.start_bytes = self.peak_bytes = rss_anon_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_anon_bytes())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, rss_anon_bytes())


def cgroup_limits(proc_cgroup: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")) -> list[int]:
    """The memory limits of this process's cgroup and its ancestors (v2 memory.max, v1
    memory.limit_in_bytes); "max" and v1's near-2^63 "unlimited" are left out."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root, name = mount, "memory.max"
        elif "memory" in controllers.split(","):
            root, name = mount / "memory", "memory.limit_in_bytes"
        else:
            continue
        # Inside a container the cgroup's own directory is often mounted as the root: try both.
        here = root / path.lstrip("/")
        for folder in {*[here, *here.parents], root}:
            if folder != root and root not in folder.parents:
                continue
            try:
                value = (folder / name).read_text().strip()
            except OSError:
                continue
            if value.isdigit() and int(value) < 2**60:
                limits.append(int(value))
    return limits


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def machine_memory() -> tuple[int, str]:
    """(bytes, where from): the tightest cgroup limit, else the physical memory."""
    limits = cgroup_limits()
    if limits and min(limits) < physical_memory_bytes():
        return min(limits), "cgroup"
    return physical_memory_bytes(), "physical"
