"""`rebasin merge`: the service's merge job, offline, on local files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from matching.errors import Cancelled, MatchingError

METHOD_NAMES = {"weight": "weight_matching", "activation": "activation_matching", "ste": "ste_matching"}


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors, or a PyTorch state dict loaded with ``weights_only=True`` (never arbitrary unpickling)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        elif suffix in (".pt", ".pth", ".bin"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise MatchingError(f"{path.name}: unsupported checkpoint format; use .safetensors, or a state dict saved "
                                "with torch.save as .pt/.pth/.bin")
    except MatchingError:
        raise
    except Exception as exc:  # corrupt file, TorchScript archive, pickled objects refused by weights_only
        raise MatchingError(f"{path.name}: cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))  # a common wrapper
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise MatchingError(f"{path.name}: not a state dict (a flat mapping of names to tensors)")
    return state


def _option_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:
            return [_option_value(part) for part in text.split(",") if part]
        return text


def parse_key_values(items: list[str] | None, flag: str) -> dict:
    """KEY=VALUE command-line options: JSON values, comma lists, or plain strings (``sizes=64,128,10``)."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MatchingError(f"{flag} {item!r}: use KEY=VALUE")
        options[key.replace("-", "_")] = _option_value(value)
    return options


def add_merge_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge", help="align and merge checkpoints offline (the same job the service runs)",
        description="Align checkpoints modulo permutation symmetries (Git Re-Basin) and merge them. Two checkpoints: "
                    "B is aligned to A; three or more: MergeMany. Writes merged.safetensors, aligned*.safetensors, "
                    "permutation.json, report.json (and barrier.png with evaluation data) into --out.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help=".safetensors or .pt/.pth/.bin state dicts")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", metavar="NAME", help="registered architecture (mlp, vgg, resnet20, resnet18, resnet50)")
    which.add_argument("--spec", type=Path, metavar="SPEC.json", help="permutation spec JSON (weight matching only)")
    p.add_argument("--arch-option", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option, e.g. width=4 or sizes=784,512,10 (repeatable; inferred ones may be left out)")
    p.add_argument("--method", default="weight", choices=sorted(METHOD_NAMES) + sorted(METHOD_NAMES.values()))
    p.add_argument("--data", type=Path, metavar="DATA.safetensors", help="dataset (needed for activation and ste)")
    p.add_argument("--eval-data", type=Path, metavar="DATA.safetensors", help="held-out dataset for the barrier report")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-iter", type=int)
    p.add_argument("--lambdas", type=int, help="number of interpolation points (default 25)")
    p.add_argument("--merge-lambda", type=float)
    p.add_argument("--steps", type=int, help="STE steps")
    p.add_argument("--learning-rate", type=float, help="STE learning rate")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--repair", choices=["none", "reset", "repair"],
                   help="statistics correction of the merged model (default: reset for BatchNorm networks, repair "
                        "otherwise; needs --data or --eval-data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.set_defaults(func=run_merge)
    return p


def run_merge(args) -> int:
    from tqdm import tqdm

    from matching.merge import merge_checkpoints, write_artifacts

    bar = {"stage": None, "bar": None}

    def progress(stage, completed, total, message):
        if bar["stage"] != stage:
            if bar["bar"] is not None:
                bar["bar"].close()
            bar["stage"], bar["bar"] = stage, tqdm(total=total, desc=stage, unit="step", file=sys.stderr, leave=False)
        bar["bar"].total = total
        bar["bar"].n = completed
        bar["bar"].set_postfix_str(message[:60], refresh=True)

    try:
        if len(args.checkpoints) < 2:
            raise MatchingError("give at least two checkpoints")
        states = [load_checkpoint(path) for path in args.checkpoints]
        architecture = spec = None
        if args.arch:
            architecture = {"name": args.arch, "options": parse_key_values(args.arch_option, "--arch-option")}
        else:
            try:
                spec = json.loads(args.spec.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise MatchingError(f"--spec {args.spec}: cannot read JSON ({exc})") from None
        options = {name: getattr(args, name) for name in ("seed", "max_iter", "lambdas", "merge_lambda", "steps",
                                                            "learning_rate", "batch_size", "repair") if getattr(args, name) is not None}
        outcome = merge_checkpoints(states, method=METHOD_NAMES.get(args.method, args.method), architecture=architecture,
                                    permutation_spec=spec, dataset=args.data, eval_dataset=args.eval_data,
                                    options=options, device=args.device, progress=progress)
        files = write_artifacts(outcome, args.out)
    except (MatchingError, Cancelled) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar["bar"] is not None:
            bar["bar"].close()
    print(format_report(outcome.report))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def format_report(report: dict) -> str:
    m = report["matching"]
    lines = [f"{report['method']}: {report['num_checkpoints']} checkpoints, {m['iterations']} iteration(s), "
             f"{m['seconds']:.2f} s"]
    if m.get("objective_initial") is not None:
        lines.append(f"objective {m['objective_initial']:.6g} -> {m['objective_final']:.6g}")
    if "barrier" in report:
        lines.extend(barrier_table(report))
        lines.append(f"merged: loss {report['merged']['loss']:.4f}, accuracy {report['merged']['accuracy']:.4f}"
                     + (f" (repair: {report['repair']['mode']})" if "repair" in report else ""))
    else:
        lines.append("no evaluation data: no barrier report")
    return "\n".join(lines)


def barrier_table(report: dict) -> list[str]:
    """The barrier table of a report: one row per curve (naive, aligned, aligned_repair) and split."""
    lines = []
    for suffix in ("", "_train"):
        if f"barrier{suffix}" not in report:
            continue
        ev, curves = report[f"evaluation{suffix}"], report[f"curves{suffix}"]
        lines.append(f"barrier on {ev['split']} ({ev['num_examples']} examples, {len(curves['lambdas'])} lambdas):")
        lines.append(f"{'':16}{'loss barrier':>14}{'acc barrier':>14}{'mid loss':>11}{'mid acc':>10}")
        mid = len(curves["lambdas"]) // 2
        for name, b in report[f"barrier{suffix}"].items():
            c = curves[name]
            lines.append(f"{name:16}{b['loss']:14.4f}{b['accuracy']:14.4f}{c['loss'][mid]:11.4f}{c['accuracy'][mid]:10.4f}")
    return lines
