"""The measurements ``matching.memory.COEFFICIENTS`` is fitted on: a job's peak RssAnon against its estimate.

Each case runs the worker's data path (``load_file`` of every input, ``merge_checkpoints``, ``write_artifacts``)
in a fresh process whose inputs were written by another, so the baseline is an idle process with torch
imported. Prints one row per case: the sizes the estimate reads, the measured growth of RssAnon over the
baseline, the estimate's growth, and their ratio (must be >= 1).

    python -m benchmarks.memory_estimate                 # every case
    python -m benchmarks.memory_estimate --cases mlp-wm,gpt2-wm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024**2
MLP = [784, 2048, 2048, 2048, 10]
GPT2 = {"vocab_size": 50257, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}
GPT_SMALL = {"vocab_size": 2000, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 256}
# name: (architecture, options, inputs, method, dataset: (kind, examples) or None, eval dataset, job options)
CASES = {
    "mlp-wm": ("mlp", {"sizes": MLP}, 2, "weight_matching", None, None, {"max_iter": 2}),
    "mlp-wm-eval": ("mlp", {"sizes": MLP}, 2, "weight_matching", None, ("features", 4000), {"lambdas": 3, "max_iter": 2}),
    "mlp-many": ("mlp", {"sizes": MLP}, 3, "weight_matching", None, None, {"max_iter": 2}),
    "mlp-act": ("mlp", {"sizes": MLP}, 2, "activation_matching", ("features", 2000), None, {"lambdas": 3}),
    "mlp-ste": ("mlp", {"sizes": MLP}, 2, "ste_matching", ("features", 2000), None, {"steps": 3, "max_iter": 3, "lambdas": 3}),
    "r20x4-wm-eval": ("resnet20", {"width": 4}, 2, "weight_matching", None, ("images32", 250), {"lambdas": 3}),
    "r20x4-act": ("resnet20", {"width": 4}, 2, "activation_matching", ("images32", 250), None, {"lambdas": 3}),
    "resnet18-wm": ("resnet18", {}, 2, "weight_matching", None, None, {"max_iter": 3}),
    "gpt-small-eval": ("gpt", GPT_SMALL, 2, "weight_matching", None, ("tokens", 250), {"lambdas": 3}),
    "gpt2-wm": ("gpt", GPT2, 2, "weight_matching", None, None, {"max_iter": 3}),
}


def prepare(case: str, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import matching

    arch, options, count, _, dataset, eval_dataset, _ = CASES[case]
    for i in range(count):
        torch.manual_seed(i)
        save_file(matching.build_model(arch, **options).state_dict(), folder / f"input{i}.safetensors")
    for name, spec in (("dataset", dataset), ("eval", eval_dataset)):
        if spec is None:
            continue
        kind, n = spec
        g = torch.Generator().manual_seed(0)
        if kind == "features":
            data = {"inputs": torch.randn(n, MLP[0], generator=g), "targets": torch.randint(0, 10, (n,), generator=g)}
        elif kind == "images32":
            data = {"inputs": torch.randn(n, 3, 32, 32, generator=g), "targets": torch.randint(0, 10, (n,), generator=g)}
        else:
            shape = (n, options["block_size"])
            data = {"inputs": torch.randint(0, options["vocab_size"], shape, generator=g),
                    "targets": torch.randint(0, options["vocab_size"], shape, generator=g)}
        save_file(data, folder / f"{name}.safetensors")


def header(path: Path) -> dict:
    from storage.ingest import read_safetensors_header

    return {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in read_safetensors_header(path).items()}


def measure(case: str, folder: Path) -> dict:
    """What the worker's run_merge does with the inputs, under the sampler."""
    import torch
    from safetensors.torch import load_file

    import matching
    from matching.memory import (
        PeakSampler,
        activation_bytes,
        estimate_peak,
        rss_anon_bytes,
    )

    torch.set_num_threads(2)
    arch, options, count, method, dataset, eval_dataset, job_options = CASES[case]
    inputs = [folder / f"input{i}.safetensors" for i in range(count)]
    data = folder / "dataset.safetensors" if dataset else None
    held_out = folder / "eval.safetensors" if eval_dataset else None
    headers = [header(p) for p in inputs]
    datasets = [header(p) for p in (data, held_out) if p is not None]
    shapes = {k: tuple(v["shape"]) for k, v in headers[0].items()}
    sizes = [activation_bytes({"name": arch, "options": options}, shapes, d) for d in datasets]
    baseline = rss_anon_bytes()
    estimate = estimate_peak(headers, method=method, options=job_options, datasets=datasets, baseline_bytes=baseline,
                             activations=max(sizes) if sizes and None not in sizes else None)
    started = time.perf_counter()
    with PeakSampler() as sampler:
        states = [load_file(p) for p in inputs]
        outcome = matching.merge_checkpoints(states, method=method, architecture={"name": arch, "options": options},
                                             dataset=data, eval_dataset=held_out, options=job_options)
        del states
        matching.write_artifacts(outcome, folder / "out")
        del outcome
    return {"case": case, "baseline_mib": baseline / MiB, "measured_mib": (sampler.peak_bytes - baseline) / MiB,
            "estimated_mib": (estimate.peak_bytes - baseline) / MiB,
            "terms_mib": {k: v / MiB for k, v in estimate.terms.items()}, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--child", nargs=2, metavar=("STEP", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, folder = args.child
        if step == "prepare":
            prepare(args.cases, Path(folder))
        else:
            print(json.dumps(measure(args.cases, Path(folder))))
        return
    print("| case | inputs MiB | model fp32 MiB | data MiB | batch widest MiB | batch all MiB | measured MiB "
          "| estimated MiB | est/meas | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix="rebasin-memory-") as folder:
            run = lambda step: subprocess.run([sys.executable, "-m", "benchmarks.memory_estimate", "--cases", case,
                                               "--child", step, folder], check=True, capture_output=True, text=True)
            run("prepare")
            row = json.loads(run("measure").stdout.strip().splitlines()[-1])
        t = row["terms_mib"]
        print(f"| {case} | {t['inputs']:.0f} | {t['model_fp32']:.0f} | {t['datasets']:.0f} | {t['activations']:.1f} | {t['all_activations']:.1f} "
              f"| {row['measured_mib']:.0f} | {row['estimated_mib']:.0f} "
              f"| {row['estimated_mib'] / row['measured_mib']:.2f} | {row['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
