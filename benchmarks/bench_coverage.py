"""Spec-inference coverage: every torchvision classification model, a sample of timm models, and Hugging Face
transformers model types.

    python -m benchmarks.bench_coverage [--torchvision all|none|NAME,...] [--timm families|120|NAME,...]
                                        [--hf none|all|TYPE,...]
                                        [--timeout 600] [--max-params 200e6] [--max-build 700e6]
                                        [--family-max-params 60e6] [--jsonl results.jsonl] [--jobs 1]

Per model, each in a fresh subprocess (its own memory, a timeout): traced by torch.fx or not (and why),
spec verified (a random permutation keeps the outputs in float64), the share of hidden channels permuted,
and seconds to infer (trace, label, verify). Hidden channels = output channels of every Conv/Linear layer
except the classifier's (the layers with ``num_classes`` = 11 outputs): what an expert's hand-written spec
permutes. The timm sample takes one model of every architecture family (module; a small variant by its name),
up to the number asked for; ``--timm families`` takes the smallest model of every family by parameter count among
its four smallest-sounding names (the families whose smallest is above --family-max-params are named and left out).
Models above --max-params are not verified on this machine (float64 copies), above --max-build (counted on the
meta device) not built.
Prints a table and the mean share over torchvision's convolutional models (all but ViT, Swin, MaxViT).
The ``hf`` family (``hf/<model_type>``, see benchmarks/hf_models.py) builds each type's default config shrunk
in code, captures it with torch.export (torch.fx cannot trace these), verifies on token ids with a padding mask
(pixel values for vision models) and counts the output units of Linear, Conv1D and Conv2d layers except those
of the vocabulary or class heads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import signal
import time
from functools import partial
from concurrent.futures import ThreadPoolExecutor, as_completed

NUM_CLASSES = 11
TRANSFORMERS = ("vit_", "swin_", "maxvit_")


def measure_hf(name: str) -> dict:
    from benchmarks.hf_models import build, example, hidden_share
    from matching.errors import MatchingError
    from matching.infer import infer_spec

    out = {"name": name}
    try:
        model, kind = build(name.split("/", 1)[1])
    except Exception as exc:  # noqa: BLE001 - a config this shrinking does not fit
        return out | {"traced": False, "why": f"build: {type(exc).__name__}: {exc}"[:160]}
    out["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    start = time.perf_counter()
    try:
        spec = infer_spec(model, example(model, kind))
    except MatchingError as exc:
        text = str(exc)
        return out | {"traced": "cannot be traced" not in text, "verified": False, "why": text[:200],
                      "seconds": round(time.perf_counter() - start, 1)}
    permuted, hidden = hidden_share(model, spec)
    return out | {"traced": True, "verified": True, "share": round(permuted / hidden, 3) if hidden else None,
                  "seconds": round(time.perf_counter() - start, 1), "permutations": len(spec.free_perms),
                  "structured": sorted({k for e in spec.perms.values() for k in e if k in ("groups", "segments", "expand", "reindex")}),
                  "why": "; ".join(n.split(":")[0] for n in spec.left_out)}


def measure(name: str, max_params: float, max_build: float) -> dict:
    if name.startswith("hf/"):
        return measure_hf(name)
    import torch

    import matching
    from matching.architectures import example_input
    from matching.errors import MatchingError
    from matching.infer import infer_spec

    out = {"name": name}
    try:  # counted on the meta device first: a model of billions of parameters is not built on this machine
        with torch.device("meta"):
            params = sum(p.numel() for p in matching.build_model(name, num_classes=NUM_CLASSES).parameters())
    except Exception:  # noqa: BLE001 - counted for real below
        params = 0
    if params > max_build:
        return out | {"params_m": round(params / 1e6, 1), "traced": None, "why": "not built (over --max-build)"}
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        model = matching.build_model(name, num_classes=NUM_CLASSES).eval()
    except MatchingError as exc:
        return out | {"traced": False, "why": f"build: {exc}"[:160]}
    params = sum(p.numel() for p in model.parameters())
    out["params_m"] = round(params / 1e6, 1)
    x = example_input(name, model)
    out["input"] = "x".join(str(s) for s in x.shape[1:])
    try:
        spec = infer_spec(model, x, verify=params <= max_params)
    except MatchingError as exc:
        text = str(exc)
        traced = "cannot be traced" not in text
        return out | {"traced": traced, "verified": False, "why": text.split(". Its permutation spec")[0][:200],
                      "seconds": round(time.perf_counter() - start, 1)}
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["traced"], out["verified"] = True, params <= max_params
    hidden = permuted = 0
    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            n = module.weight.shape[0]
            axes = spec.axes_to_perm.get(f"{module_name}.weight", (None,))
            if n == NUM_CLASSES and axes[0] is None:
                continue  # the classifier (also auxiliary ones)
            hidden += n
            permuted += n if axes[0] is not None else 0
    out["share"] = round(permuted / hidden, 3) if hidden else None
    out["permutations"] = len(spec.free_perms)
    out["structured"] = sorted({k for e in spec.perms.values() for k in e if k in ("groups", "segments", "expand", "reindex")})
    return out


SMALL = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "lite", "_s_", "b0", "18", "_t_", "mini")


def _by_family() -> dict[str, list[str]]:
    """timm's models by family (the module that defines them), each family's small-sounding names first."""
    import timm

    by_family: dict[str, list[str]] = {}
    for name in timm.list_models():
        by_family.setdefault(timm.models._registry._model_to_module.get(name, name.split("_")[0]), []).append(name)
    return {family: sorted(group, key=lambda n: (not any(t in n for t in SMALL), len(n), n))
            for family, group in sorted(by_family.items())}


def timm_sample(count: int) -> list[str]:
    names = [f"timm/{group[0]}" for group in _by_family().values()]
    if len(names) < count:  # fewer families than asked: add more models, spread over the list
        import timm
        rest = [f"timm/{n}" for n in timm.list_models() if f"timm/{n}" not in names and any(t in n for t in SMALL)]
        names += rest[::max(1, len(rest) // (count - len(names)))][:count - len(names)]
    return names[:count]


def timm_families(max_params: float, candidates: int = 4) -> tuple[list[str], list[str]]:
    """Every timm family's smallest model by parameter count among its ``candidates`` smallest-sounding names
    (counted on the meta device: no memory, no compute; counting all ~1300 models takes long on a busy machine),
    and the families whose smallest is above ``max_params``, as "name (N M)"."""
    import timm
    import torch

    picked, above = [], []
    for group in _by_family().values():
        counted = []
        for name in group[:candidates]:
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, num_classes=NUM_CLASSES)
                counted.append((sum(p.numel() for p in model.parameters()), name))
            except Exception:  # noqa: BLE001, S112 - a model that needs real data to build: the others count
                continue
        if counted:
            params, name = min(counted)
            (picked if params <= max_params else above).append(f"timm/{name}" if params <= max_params
                                                                else f"{name} ({params / 1e6:.0f} M)")
    return picked, above


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torchvision", default="all")
    parser.add_argument("--timm", default="120")
    parser.add_argument("--hf", default="none", help="Hugging Face model types: none, all, or TYPE,...")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--max-params", type=float, default=200e6)
    parser.add_argument("--max-build", type=float, default=700e6)
    parser.add_argument("--family-max-params", type=float, default=60e6,
                        help="--timm families: the smallest model of each family, families above this left out")
    parser.add_argument("--jsonl", help="append each result here as it comes")
    parser.add_argument("--jobs", type=int, default=1, help="models measured at once (each in its own subprocess)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every model in this one process (no import per model: a busy machine; --timeout "
                             "by an alarm, which Python code answers between operations)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.max_params, args.max_build)))
        return
    from matching.architectures import torchvision_names

    names = []
    if args.torchvision == "all":
        names += [f"torchvision/{n}" for n in torchvision_names()]
    elif args.torchvision != "none":
        names += [f"torchvision/{n}" for n in args.torchvision.split(",")]
    if args.timm == "families":
        picked, above = timm_families(args.family_max_params)
        names += picked
        print(f"timm families: {len(picked)} with a model up to {args.family_max_params / 1e6:.0f} M parameters; "
              f"above: {', '.join(above) or 'none'}\n(as --timm {','.join(n.split('/', 1)[1] for n in picked)})", flush=True)
    elif args.timm.isdigit():
        names += timm_sample(int(args.timm))
    elif args.timm != "none":
        names += [f"timm/{n}" for n in args.timm.split(",") if n]
    if args.hf == "all":
        from benchmarks.hf_models import TYPES
        names += [f"hf/{t}" for t in TYPES]
    elif args.hf != "none":
        names += [f"hf/{t}" for t in args.hf.split(",") if t]
    def run_one(name: str) -> dict:
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_coverage", "--one", name,
                                   "--max-params", str(args.max_params), "--max-build", str(args.max_build)],
                                  capture_output=True, text=True,
                                  timeout=args.timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            return json.loads(lines[-1]) if lines else {"name": name, "traced": False,
                                                        "why": f"crashed: {proc.stderr.strip().splitlines()[-1][:160] if proc.stderr.strip() else proc.returncode}"}
        except subprocess.TimeoutExpired:
            return {"name": name, "traced": None, "why": f"timeout after {args.timeout:.0f} s"}

    if args.in_process:
        run_one = partial(_measure_here, max_params=args.max_params, max_build=args.max_build, timeout=args.timeout)
    done = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # threads only wait on the subprocesses
        futures = [] if args.in_process else [pool.submit(run_one, name) for name in names]
        for result in (run_one(name) for name in names) if args.in_process else (f.result() for f in as_completed(futures)):
            done[result["name"]] = result
            print(_row(result), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as handle:
                    handle.write(json.dumps(result) + "\n")
    results = [done[name] for name in names]
    print("\n".join(_row(r) for r in results))
    print(summary(results))


class _Timeout(BaseException):  # not caught by the broad `except Exception` of a capture that falls back
    pass


def _measure_here(name: str, max_params: float, max_build: float, timeout: float) -> dict:
    def expire(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(int(timeout))
    try:
        return measure(name, max_params, max_build)
    except _Timeout:
        return {"name": name, "traced": None, "why": f"timeout after {timeout:.0f} s"}
    except Exception as exc:  # noqa: BLE001 - one model's crash is its row
        return {"name": name, "traced": False, "why": f"crashed: {type(exc).__name__}: {exc}"[:160]}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _row(r: dict) -> str:
    share = "" if r.get("share") is None else f"{r['share']:.2f}"
    return (f"| {r['name']} | {r.get('params_m', '')} | {'yes' if r.get('traced') else 'no'} | "
            f"{'yes' if r.get('verified') else 'no'} | {share} | {r.get('seconds', '')} | "
            f"{', '.join(r.get('structured', []))} | {r.get('why', '')} |")


def summary(results: list[dict]) -> str:
    lines = []
    for label, keep in (("torchvision convolutional", lambda n: n.startswith("torchvision/") and not n.split("/")[1].startswith(TRANSFORMERS)),
                        ("torchvision all", lambda n: n.startswith("torchvision/")), ("timm sample", lambda n: n.startswith("timm/")),
                        ("Hugging Face types", lambda n: n.startswith("hf/"))):
        rs = [r for r in results if keep(r["name"])]
        if not rs:
            continue
        traced = [r for r in rs if r.get("traced")]
        verified = [r for r in rs if r.get("verified")]
        shares = [r["share"] for r in rs if r.get("share") is not None]
        mean_all = sum(r.get("share") or 0.0 for r in rs) / len(rs)
        lines.append(f"{label}: {len(rs)} models, traced {len(traced)}, verified {len(verified)}, mean share "
                     f"{sum(shares) / max(1, len(shares)):.3f} over the {len(shares)} with a spec "
                     f"({mean_all:.3f} counting the others as 0)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
