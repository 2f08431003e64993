"""`rebasin merge`: the service's merge job, offline, on local files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from matching.checkpoints import load_checkpoint
from matching.errors import Cancelled, MatchingError
from matching.merge import DEFAULTS, PARTIAL_OPTIONS

# A plain checkpoint larger than this is written as shards (save_pretrained's default max_shard_size, 5 GB).
SHARD_BYTES = 5 * 10**9
METHOD_NAMES = {"weight": "weight_matching", "activation": "activation_matching", "ste": "ste_matching"}
# One set of spellings for every command that takes a method: the short names and the API's.
METHOD_CHOICES = list(METHOD_NAMES) + list(METHOD_NAMES.values()) + ["auto", "zip"]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states each option's default (where there is one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" not in text and action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def add_method_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="weight", choices=METHOD_CHOICES, metavar="METHOD",
                        help="weight (data-free), activation or ste (need --data), or auto (needs --data: runs "
                             "weight and activation matching and keeps the lower held-out barrier), or zip (ZipIt!, needs "
                             "--data); the API's names "
                             "weight_matching, activation_matching, ste_matching work too")


class StageBar:
    """Progress on stderr, one line per stage: where it is (``weight_matching: 3/10``), how long it has
    taken, and the stage's last message; no rates (a stage's steps differ too much to make one mean
    anything). Off when stderr is not a terminal."""

    FORMAT = "{desc}: {n_fmt}/{total_fmt} {elapsed}{postfix}"

    def __init__(self):
        self.stage, self.bar = None, None

    def update(self, stage: str, completed: int, total: int, message: str = "") -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(desc=stage, total=total or None, file=sys.stderr, bar_format=self.FORMAT, disable=None)
        self.bar.total = total or None
        self.bar.n = completed
        self.bar.set_postfix_str(message[:60], refresh=True)

    def close(self) -> None:
        """Before anything else is printed, so that no message lands on the bar's line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
        formatter_class=DefaultsHelpFormatter,
        description="Align checkpoints modulo permutation symmetries (Git Re-Basin) and merge them. Two checkpoints: "
                    "B is aligned to A; three or more: MergeMany. Writes merged.safetensors, aligned*.safetensors "
                    "(shards with an index above 5 GB; model folders: the folders merged/ and aligned*/, laid out as "
                    "the inputs), permutation.json, "
                    "report.json (and barrier.png with evaluation data) into --out, and prints the barrier table.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help=".safetensors or a torch.save state dict (.pt/.pth/.bin, also wrapped as {'state_dict': ...}), or "
                        "a model folder as save_pretrained writes it (config.json and its weights): then --arch hf builds "
                        "the model from config.json, and the outputs are the folders merged/ and aligned/")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", metavar="NAME", help="registered architecture, e.g. mlp, vgg, resnet20, torchvision/resnet18")
    which.add_argument("--spec", type=Path, metavar="SPEC.json", help="permutation spec JSON (weight matching only)")
    p.add_argument("--arch-option", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option, e.g. width=4 or sizes=784,512,10 (repeatable; inferred ones may be left out)")
    add_method_argument(p)
    p.add_argument("--data", type=Path, metavar="DATA.safetensors", help="dataset (needed for activation and ste)")
    p.add_argument("--eval-data", type=Path, metavar="DATA.safetensors", help="held-out dataset for the barrier report")
    for flag, kind, what in (("--seed", int, "random seed"), ("--max-iter", int, "weight matching iterations"),
                             ("--lambdas", int, "number of interpolation points"),
                             ("--merge-lambda", float, "where between A and aligned B the merged model lies"),
                             ("--steps", int, "STE steps"), ("--learning-rate", float, "STE learning rate"),
                             ("--batch-size", int, "activation and STE batch size"),
                             ("--alpha", float, "zip: factor on a merged feature's correlations (0: merged once)"),
                             ("--beta", float, "zip: share of merges allowed within one model")):
        option = flag[2:].replace("-", "_")
        p.add_argument(flag, type=kind, help=f"{what} (default {DEFAULTS[option]})")
    p.add_argument("--repair", choices=["none", "reset", "repair"],
                   help="statistics correction of the merged model (default: reset for BatchNorm networks, repair "
                        "otherwise; needs --data or --eval-data)")
    p.add_argument("--merge-until", metavar="MODULE",
                   help="partial merge: merge up to this module (or spec permutation), keep the rest as two heads "
                        "(zipped.safetensors); 'sweep': every cut point in the report")
    p.add_argument("--label-sets", type=_option_value, metavar="JSON",
                   help="the classes A and B were trained on, e.g. [[0,1,2,3,4],[5,6,7,8,9]]: joint accuracy")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run_merge)
    return p


def run_merge(args) -> int:
    from matching.merge import merge_checkpoints, write_artifacts

    bar = StageBar()
    try:
        if len(args.checkpoints) < 2:
            raise MatchingError("give at least two checkpoints")
        states, layouts = _load_inputs(args.checkpoints)
        architecture = spec = None
        if args.arch:
            architecture = {"name": args.arch, "options": parse_key_values(args.arch_option, "--arch-option")}
        else:
            try:
                spec = json.loads(args.spec.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise MatchingError(f"--spec {args.spec}: cannot read JSON ({exc})") from None
        options = {name: getattr(args, name) for name in dict.fromkeys([*DEFAULTS, "repair", *PARTIAL_OPTIONS])
                   if getattr(args, name, None) is not None}
        outcome = merge_checkpoints(states, method=METHOD_NAMES.get(args.method, args.method), architecture=architecture,
                                    permutation_spec=spec, dataset=args.data, eval_dataset=args.eval_data,
                                    options=options, device=args.device, progress=bar.update,
                                    configs=[layout.config for layout in layouts] if layouts else None)
        bar.close()
        files = write_artifacts(outcome, args.out, layout=layouts[0] if layouts else None, folders="dir",
                                shard_bytes=SHARD_BYTES)
    except (MatchingError, Cancelled) as exc:
        bar.close()
        print(f"rebasin: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --out not writable, a dataset file missing, ...
        bar.close()
        print(f"rebasin: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(format_report(outcome.report))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _load_inputs(paths) -> tuple[list[dict], list]:
    """The checkpoints' state dicts, and their layouts when they are model folders (all or none of them)."""
    from matching.folders import is_model_folder, load_folder

    folders = [is_model_folder(path) for path in paths]
    if not any(folders):
        return [load_checkpoint(path) for path in paths], []
    if not all(folders):
        raise MatchingError("give every checkpoint as a model folder (a directory with config.json) or none of them")
    loaded = [load_folder(path) for path in paths]
    return [state for state, _ in loaded], [layout for _, layout in loaded]


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
    partial, joint = report.get("partial"), report.get("joint_accuracy")
    if joint:
        lines.append("joint accuracy: " + ", ".join(f"{k} {joint[k]:.4f}" for k in ("ensemble", "full_merge", "zipped")
                                                   if k in joint))
    if partial and "cut" in partial:
        lines.append(f"zipped up to {partial['cut']}: {len(partial['shared'])} shared tensors, FLOPs "
                     f"{partial['flops_fraction']:.2f} of the two models")
    for cut in partial.get("cuts", []) if partial else []:
        lines.append(f"cut after {cut['module']}: FLOPs {cut['flops_fraction']:.2f}"
                     + (f", joint accuracy {cut['joint_accuracy']:.4f}" if "joint_accuracy" in cut else ""))
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


def add_spec_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "spec", help="print the verified permutation spec of a model (JSON)",
        description="Infer a model's permutation spec (torch.fx), verify it (a random permutation must keep the "
                    "outputs in float64) and write it as JSON: send it as a job's 'permutation_spec' (or to "
                    "rebasin merge --spec) for a model the server does not know. --module imports your own code "
                    "on this machine; the server never executes uploaded code.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", metavar="NAME", help="registered architecture, e.g. resnet20, torchvision/resnet50, timm/convnext_tiny")
    which.add_argument("--module", metavar="PKG.MOD:FACTORY", help="a function or class in an importable module that returns the model")
    p.add_argument("--arch-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the architecture, or keyword argument of the factory (repeatable)")
    p.add_argument("--input-shape", metavar="C,H,W", help="shape of one example (required with --module, except for a transformers model: token ids "
                        "and an attention mask, or pixel values, from its config; default: the architecture's)")
    p.add_argument("--out", type=Path, metavar="SPEC.json", help="write here instead of standard output")
    p.set_defaults(func=run_spec)
    return p


def run_spec(args) -> int:
    try:
        spec_json = export_spec(arch=args.arch, module=args.module, options=parse_key_values(args.arch_option, "--arch-option"),
                                input_shape=args.input_shape)
    except MatchingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(spec_json, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out} ({sum(1 for axes in spec_json['axes_to_perm'].values() if any(axes))} permuted tensors)",
              file=sys.stderr)
    else:
        print(text)
    return 0


def export_spec(*, arch: str | None = None, module: str | None = None, options: dict | None = None,
                input_shape: str | None = None) -> dict:
    """The verified spec of a registered architecture or of ``package.module:factory`` (trusted local code)."""
    import torch

    from matching.architectures import build_model, example_input
    from matching.infer import infer_spec
    from matching.spec import spec_to_json

    options = options or {}
    shape = None
    if input_shape:
        try:
            shape = tuple(int(s) for s in input_shape.split(",") if s.strip())
        except ValueError:
            raise MatchingError(f"--input-shape {input_shape!r}: use comma-separated integers, e.g. 3,224,224") from None
        if not shape or min(shape) < 1:
            raise MatchingError(f"--input-shape {input_shape!r}: use positive integers, e.g. 3,224,224")
    if arch is not None:
        model = build_model(arch, **options)
        x = torch.randn(2, *shape) if shape else example_input(arch, model)
    else:
        model = _load_factory(module)(**options)
        if not isinstance(model, torch.nn.Module):
            raise MatchingError(f"{module} returned a {type(model).__name__}, not a torch.nn.Module")
        if _is_transformers(model):
            x = _transformers_inputs(model, shape)
        elif shape is None:
            raise MatchingError("--module needs --input-shape (the shape of one example, e.g. 3,224,224)")
        else:
            x = torch.randn(2, *shape)
    return spec_to_json(infer_spec(model.eval(), x))


def _is_transformers(model) -> bool:
    return isinstance(getattr(getattr(model, "config", None), "model_type", None), str) and hasattr(model, "main_input_name")


def _transformers_inputs(model, shape: tuple[int, ...] | None) -> dict:
    """A transformers model's keyword inputs, as the service builds them (matching.hf.example_inputs): token ids
    with an attention mask, or pixel values; --input-shape, if given, is one example's ([T] or [C, H, W])."""
    import torch

    from matching import hf

    inputs = hf.example_inputs(model)
    if shape is None:
        return inputs
    hf.check_input_shape(model, shape)
    if hf.is_vision(model):
        return {hf.VISION_INPUT: torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))}
    ids = torch.randint(getattr(model.config, "vocab_size", None) or 64, (2, shape[0]), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, shape[0] // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _load_factory(target: str):
    import importlib

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise MatchingError(f"--module {target!r}: use package.module:factory")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise MatchingError(f"--module {target!r}: cannot import {module_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MatchingError(f"--module {target!r}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise MatchingError(f"--module {target!r}: {attr!r} is not callable")
    return obj
