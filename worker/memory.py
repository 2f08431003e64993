"""A worker's memory budget and the check that a job fits it, before the job loads anything."""

from __future__ import annotations

from core.config import Settings
from matching.merge import streams
from matching.memory import (
    Estimate,
    activation_bytes,
    estimate_peak,
    machine_memory,
    rss_anon_bytes,
)

GiB = 1024**3
# Jobs this worker runs at once: ``rebasin worker --concurrency`` sets it before the pool processes fork.
jobs_at_once = 1


class MemoryBudgetExceeded(Exception):
    def __init__(self, estimate: Estimate, budget_bytes: int, source: str):
        super().__init__(f"estimated peak {estimate.peak_bytes} B > budget {budget_bytes} B ({source})")
        self.estimate, self.budget_bytes, self.source = estimate, budget_bytes, source


def worker_budget(settings: Settings) -> tuple[int, str]:
    """(bytes one job may use, where the worker's memory figure comes from: setting, cgroup or physical)."""
    if settings.worker_memory_bytes is not None:
        total, source = settings.worker_memory_bytes, "setting"
    else:
        total, source = machine_memory()
    return total // max(1, jobs_at_once), source


def estimate_job(request: dict, checkpoints: dict, datasets: dict) -> Estimate:
    """The job's peak from the database's records of its inputs (tensor shapes and dtypes), and this
    process's memory now (the baseline the job adds to)."""
    inputs = [checkpoints[i].tensors for i in request["checkpoints"]]
    data = [datasets[i].tensors for i in (request.get("dataset"), request.get("eval_dataset")) if i]
    shapes = {name: tuple(t["shape"]) for name, t in inputs[0].items()}
    sizes = [activation_bytes(request.get("architecture"), shapes, d) for d in data]
    return estimate_peak(inputs, method=request["method"], datasets=data, options=request.get("options") or {},
                         streams=streams(request["method"], len(inputs), bool(data), request.get("options")),
                         baseline_bytes=rss_anon_bytes(),
                         activations=None if None in sizes or not sizes else max(sizes))


def check_fits(request: dict, checkpoints: dict, datasets: dict, settings: Settings) -> tuple[Estimate, int, str]:
    budget, source = worker_budget(settings)
    estimate = estimate_job(request, checkpoints, datasets)
    if estimate.peak_bytes > budget:
        raise MemoryBudgetExceeded(estimate, budget, source)
    return estimate, budget, source


def budget_detail(error: MemoryBudgetExceeded) -> str:
    """The failed job's problem detail: what it needs, what the worker has, what to do."""
    where = {"setting": "REBASIN_WORKER_MEMORY_BYTES", "cgroup": "its cgroup memory limit",
             "physical": "its physical memory"}[error.source]
    share = f", shared by {jobs_at_once} jobs at once" if jobs_at_once > 1 else ""
    terms = error.estimate.terms
    return (f"The job needs an estimated {error.estimate.peak_bytes / GiB:.2f} GiB of memory at its peak, and this "
            f"worker allows a job {error.budget_bytes / GiB:.2f} GiB ({where}{share}). The estimate counts the "
            f"checkpoints ({terms['inputs'] / GiB:.2f} GiB as stored), working copies of the model "
            f"({terms['model_fp32'] / GiB:.2f} GiB each in float32), the datasets ({terms['datasets'] / GiB:.2f} GiB) "
            f"and the worker's own {error.estimate.baseline_bytes / GiB:.2f} GiB. Merge fewer or smaller checkpoints, "
            "use smaller datasets, or run it on a worker with more memory. Nothing was loaded.")
