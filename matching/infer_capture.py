"""Graph capture for spec inference: the traced graph of a trusted module, with a shape on every node.

torch.fx traces at the level of modules and torch functions, which is what the rules of matching.infer_layers
read. A model torch.fx cannot trace (Python that branches on shapes, Hugging Face transformers) is captured by
``torch.export`` instead (matching.infer_export), rewritten into the same vocabulary. Example inputs are a
tensor (the model's first argument) or a dict of keyword arguments (``input_ids`` and ``attention_mask``,
``pixel_values``). Traces and the model runs of inference share one lock (see ``TRACE_LOCK``).
"""

from __future__ import annotations

import inspect
import threading

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from matching.errors import MatchingError

# torch.fx tracing patches module-global state (nn.Module.__call__ among it): two threads tracing at once (an API
# process answering concurrent job submissions) corrupt it for good, and a model run in one thread while another
# traces goes through the patched call and fails. Traces and the runs of inference (shape propagation,
# verification) take this lock.
TRACE_LOCK = threading.Lock()


def call_inputs(model: nn.Module, inputs) -> tuple[tuple, dict]:
    """(args, kwargs) to call ``model`` on an example: a tensor is its first argument, a dict its keywords;
    ``use_cache=False`` where the model takes it (a decoder's key/value cache is an output that no spec
    permutes, and it keeps torch.export from capturing GPT-2 and LLaMA)."""
    args, kwargs = ((inputs,), {}) if isinstance(inputs, torch.Tensor) else ((), dict(inputs))
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "use_cache" in parameters and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def describe(inputs) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"of shape {list(inputs.shape)}"
    return "{" + ", ".join(f"{k}: {list(v.shape) if isinstance(v, torch.Tensor) else v!r}" for k, v in inputs.items()) + "}"


def trace(model: nn.Module, top_training: bool = False, example_input=None) -> torch.fx.GraphModule:
    """torch.fx symbolic trace in eval mode (``top_training``: the top module's own flag set, every submodule in
    eval mode: the graph with GoogLeNet's and Inception's auxiliary heads, still deterministic). A model torch.fx
    cannot trace is captured by torch.export on ``example_input`` (eval mode only: the graph is marked
    ``meta["exported"]``); a model neither captures is a MatchingError naming the construct."""
    was_training = model.training
    model.eval()
    model.training = top_training
    try:
        with TRACE_LOCK:
            return torch.fx.symbolic_trace(model)
    except Exception as exc:  # TraceError, TypeError from control flow on proxies, NotImplementedError, ...
        if example_input is None or top_training:
            raise MatchingError(untraceable_message(model, exc)) from None
        fx_error = exc
    finally:
        model.train(was_training)
    return exported(model, example_input, fx_error)


def exported(model: nn.Module, example_input, fx_error: BaseException) -> torch.fx.GraphModule:
    from matching.infer_export import export_graph

    was_training = model.training
    model.eval()
    args, kwargs = call_inputs(model, example_input)
    try:
        with TRACE_LOCK:
            gm = export_graph(model, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - UserError, GuardOnDataDependentSymNode, unsupported ops, ...
        raise MatchingError(untraceable_message(model, fx_error, exc)) from None
    finally:
        model.train(was_training)
    gm.meta["exported"] = True
    return gm


def _reason(exc: BaseException) -> str:
    import traceback
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith(("matching/infer_capture.py", "matching/infer_export.py")):
            where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} ({(frame.line or '').strip()[:120]})"
            break
    text = next((line for line in str(exc).splitlines() if line.strip()), "")[:300]
    return f"{where}: {type(exc).__name__}" + (f": {text}" if text else "")


def untraceable_message(model: nn.Module, exc: BaseException, export_exc: BaseException | None = None) -> str:
    captured = f"cannot be traced by torch.fx{_reason(exc)}"
    if export_exc is not None:
        captured += f"; nor captured by torch.export{_reason(export_exc)}"
    # `rebasin spec --module` runs this same capture: where it fails here, it fails there too
    return (f"{type(model).__name__} {captured}. Its permutation spec cannot be inferred (`rebasin spec --module` "
            "captures the graph the same way, so it fails the same way): write the spec by hand (the "
            "'permutation_spec' JSON format in the README) and submit it as 'permutation_spec' instead of "
            "'architecture' (weight matching only), or change the model's forward so that it does not branch on "
            "tensor values.")


def unread_parameters(gm: torch.fx.GraphModule, model: nn.Module) -> bool:
    read = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    return any(not any(".".join(key.split(".")[:i]) in read for i in range(1, key.count(".") + 2))
               for key, _ in model.named_parameters())


def graph_args(gm: torch.fx.GraphModule, model: nn.Module, example_input) -> list:
    """The graph's positional inputs for an example: placeholders are the forward's parameters by name (a
    tensor example is the first); the others take their defaults."""
    args, kwargs = call_inputs(model, example_input)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = []
    for i, node in enumerate(placeholders):
        name = node.target.lstrip("*")
        if i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        else:
            values.append(node.args[0] if node.args else None)
    return values


def propagated(gm: torch.fx.GraphModule, model: nn.Module, example_input) -> torch.fx.GraphModule:
    """Shapes on every node, from one run in eval mode (the graph's submodules are the model's own: a run in
    training mode would update its BN statistics)."""
    was_training = model.training
    gm.eval()
    try:
        with TRACE_LOCK, torch.no_grad():
            ShapeProp(gm).propagate(*graph_args(gm, model, example_input))
    except Exception as exc:
        raise MatchingError(f"the example input {describe(example_input)} does not run through "
                            f"{type(model).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from None
    finally:
        model.train(was_training)
    return gm

