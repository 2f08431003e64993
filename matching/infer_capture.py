"""Graph capture for spec inference: the traced graph of a trusted module, with a shape on every node.

torch.fx traces at the level of modules and torch functions, which is what the rules of matching.infer_layers
read. Traces and the model runs of inference share one lock (see ``TRACE_LOCK``).
"""

from __future__ import annotations

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


def trace(model: nn.Module, top_training: bool = False) -> torch.fx.GraphModule:
    """torch.fx symbolic trace in eval mode (``top_training``: the top module's own flag set, every submodule in
    eval mode: the graph with GoogLeNet's and Inception's auxiliary heads, still deterministic); a model that
    cannot be traced is a MatchingError naming the construct."""
    was_training = model.training
    model.eval()
    model.training = top_training
    try:
        with TRACE_LOCK:
            return torch.fx.symbolic_trace(model)
    except Exception as exc:  # TraceError, TypeError from control flow on proxies, NotImplementedError, ...
        raise MatchingError(untraceable_message(model, exc)) from None
    finally:
        model.train(was_training)


def untraceable_message(model: nn.Module, exc: BaseException) -> str:
    import traceback
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if "/torch/" not in frame.filename.replace("\\", "/"):
            where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} ({(frame.line or '').strip()[:120]})"
            break
    reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return (f"{type(model).__name__} cannot be traced by torch.fx{where}: {type(exc).__name__}: {reason}. "
            "Its permutation spec cannot be inferred on the server; export it where the model code lives with "
            "`rebasin spec --module package.module:factory --input-shape C,H,W` (or write it by hand) and submit "
            "it as 'permutation_spec' instead of 'architecture' (weight matching only).")


def unread_parameters(gm: torch.fx.GraphModule, model: nn.Module) -> bool:
    read = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    return any(not any(".".join(key.split(".")[:i]) in read for i in range(1, key.count(".") + 2))
               for key, _ in model.named_parameters())


def propagated(gm: torch.fx.GraphModule, model: nn.Module, example_input: torch.Tensor) -> torch.fx.GraphModule:
    """Shapes on every node, from one run in eval mode (the graph's submodules are the model's own: a run in
    training mode would update its BN statistics)."""
    was_training = model.training
    gm.eval()
    try:
        with TRACE_LOCK, torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        raise MatchingError(f"the example input of shape {list(example_input.shape)} does not run through "
                            f"{type(model).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from None
    finally:
        model.train(was_training)
    return gm

