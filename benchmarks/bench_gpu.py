"""Every stage of a job on the CPU and on the GPU, in one run, against the floor of the work.

    python -m benchmarks.bench_gpu            # the full sizes (meant for a GPU machine)
    python -m benchmarks.bench_gpu --quick    # smaller data and fewer steps, a few minutes on a CPU

Cases: weight matching (MLP 784-512x3-10, ResNet20-LN x16, ResNet-50), activation matching and STE on
ResNet20-LN x4, a 25-point barrier curve. Each runs on the CPU and, when there is one, on the GPU ("n/a"
without CUDA), through the same ``matching`` functions a job calls, from checkpoints in CPU memory (the
transfer to the device is part of the time, as in a job). GPU timing: one warm-up run, then the median of
``--repeats`` runs, each timed by CUDA events between device synchronisations; CPU: median of wall times.

Floor = the larger of (FLOPs / measured matmul rate) and (bytes / measured memory bandwidth) on that device:
FLOPs are those of the run's matmuls and convolutions, counted by ``torch.utils.flop_counter`` (the LAP,
which runs on the CPU, is not in them); bytes are what must be read at least once (both models' weights,
and the data once per pass over it). The rate and bandwidth are measured at the start (float32 matmul,
tensor copy). ``time/floor`` says how far a stage is from what the hardware could do at best.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import matching
from matching.activation_matching import activation_matching
from matching.architectures import example_input
from matching.evaluate import Dataset, interpolation_curve
from matching.ste_matching import ste_matching


# weight matching updates its cost matrices in place (addmm_), which the counter does not know by default
IN_PLACE_MATMUL = {torch.ops.aten.addmm_: lambda self_shape, a_shape, b_shape, **_: 2 * a_shape[0] * a_shape[1] * b_shape[1]}


@dataclass
class Case:
    title: str
    work: str
    run: Callable[[torch.device], object]  # one run of the stage on a device
    bytes_read: int


def _pair(name: str, options: dict):
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(matching.build_model(name, **options).eval())
    spec = matching.infer_spec(models[0], example_input(name, models[0]))
    return models[0], spec, models[0].state_dict(), models[1].state_dict()


def _nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _data(examples: int, seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    return Dataset(torch.randn(examples, 3, 32, 32, generator=gen), torch.randint(0, 10, (examples,), generator=gen))


def cases(quick: bool) -> list[Case]:
    out = []
    for title, name, options in [("weight matching MLP 784-512x3-10", "mlp", {"sizes": [784, 512, 512, 512, 10]}),
                                 ("weight matching ResNet20-LN x16", "resnet20", {"width": 16, "norm": "layer"}),
                                 ("weight matching ResNet-50", "resnet50", {})]:
        _, spec, a, b = _pair(name, options)
        out.append(Case(title, "max_iter 100", lambda dev, spec=spec, a=a, b=b: matching.weight_matching(spec, a, b, device=dev),
                        _nbytes(a) + _nbytes(b)))

    model, spec, a, b = _pair("resnet20", {"width": 4, "norm": "layer"})
    weights = _nbytes(a) + _nbytes(b)
    examples = 64 if quick else 10_000
    data = _data(examples)
    out.append(Case("activation matching ResNet20-LN x4", f"{examples} examples, batch 256",
                    lambda dev: activation_matching(spec, model, a, b, data.inputs, batch_size=256, device=dev),
                    weights + data.inputs.nbytes))
    steps, batch = (3, 16) if quick else (100, 256)
    out.append(Case("STE matching ResNet20-LN x4", f"{steps} steps, batch {batch}",
                    lambda dev: ste_matching(spec, model, a, b, data, steps=steps, batch_size=batch, device=dev),
                    steps * (weights + batch * data.inputs[0].nbytes)))
    lambdas = [i / 24 for i in range(25)]
    examples = 16 if quick else 10_000
    curve_data = _data(examples, seed=1)

    def curve(dev):
        net = model.to(dev)
        a_dev, b_dev = ({k: v.to(dev) for k, v in s.items()} for s in (a, b))
        return interpolation_curve(net, a_dev, b_dev, lambdas, curve_data.inputs.to(dev), curve_data.targets.to(dev))

    out.append(Case("barrier curve ResNet20-LN x4", f"25 points, {examples} examples", curve,
                    len(lambdas) * (weights + curve_data.inputs.nbytes)))
    return out


def _timed(fn: Callable[[], object], dev: torch.device) -> float:
    if dev.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(dev)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize(dev)
    return begin.elapsed_time(end) / 1000


def machine_rates(dev: torch.device, quick: bool) -> tuple[float, float]:
    """(float32 matmul FLOP/s, memory bandwidth in bytes/s), best of a few runs."""
    n = 1024 if dev.type == "cpu" else 8192
    x, y = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    src = torch.empty(2**24 if dev.type == "cpu" else 2**28, device=dev)  # 64 MiB / 1 GiB
    dst = torch.empty_like(src)
    matmul = min(_timed(lambda: torch.mm(x, y), dev) for _ in range(3 if quick else 10))
    copy = min(_timed(lambda: dst.copy_(src), dev) for _ in range(3 if quick else 10))
    return 2 * n**3 / matmul, 2 * src.nbytes / copy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller data and fewer STE steps; one timed run per case")
    parser.add_argument("--repeats", type=int, help="timed runs per case and device (default 3; --quick: 1)")
    parser.add_argument("--cases", help="comma-separated case numbers (1-6) to run; default all")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rates = {dev.type: machine_rates(dev, args.quick) for dev in devices}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device: GPU columns n/a"
    print(f"torch {torch.__version__}, CPU {torch.get_num_threads()} threads, GPU: {gpu}; {repeats} timed run(s) per "
          "case, median; GPU after one warm-up, CUDA events")
    for kind, (flops, bandwidth) in rates.items():
        print(f"measured on {kind}: float32 matmul {flops / 1e9:.0f} GFLOP/s, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = (f"{'case':36} {'work':27} {'GFLOP':>8} {'CPU s':>8} {'CPU floor':>9} {'GPU s':>8} {'GPU floor':>9} "
              f"{'GPU/floor':>9} {'CPU/GPU':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    chosen = {int(i) for i in args.cases.split(",")} if args.cases else None
    for number, case in enumerate(cases(args.quick), 1):
        if chosen and number not in chosen:
            continue
        counter = FlopCounterMode(display=False, custom_mapping=IN_PLACE_MATMUL)
        with counter:  # the counting run (slowed by the counter's per-op dispatch) is the CPU's warm-up
            case.run(torch.device("cpu"))
        flops = counter.get_total_flops()
        times, floors = {}, {}
        for dev in devices:
            if dev.type == "cuda":
                case.run(dev)  # warm-up: CUDA context, kernels, allocator
            times[dev.type] = statistics.median(_timed(lambda: case.run(dev), dev) for _ in range(repeats))
            matmul_rate, bandwidth = rates[dev.type]
            floors[dev.type] = max(flops / matmul_rate, case.bytes_read / bandwidth)
        cpu = f"{times['cpu']:8.3f} {floors['cpu']:9.3f}"
        if "cuda" in times:
            gpu_cols = (f"{times['cuda']:8.3f} {floors['cuda']:9.4f} {times['cuda'] / floors['cuda']:9.1f} "
                        f"{times['cpu'] / times['cuda']:8.1f}")
        else:
            gpu_cols = f"{'n/a':>8} {'n/a':>9} {'n/a':>9} {'n/a':>8}"
        print(f"{case.title:36} {case.work:27} {flops / 1e9:8.1f} {cpu} {gpu_cols}", flush=True)


if __name__ == "__main__":
    main()
