"""MLflow, an optional extra (``pip install 'rebasin[mlflow]'``): checkpoints read from ``models:/`` and
``runs:/`` URIs, and a job's results logged as a run (and a registered model version).

``mlflow`` is imported only inside these functions: the service runs without it installed, and then
refuses the features that need it with a clear 422 (see ``available``).
"""

import importlib.util
import math
import os
import time
from pathlib import Path

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
MODEL_ARTIFACT_DIR = "model"  # where a registered merged checkpoint sits in its run
# MLflow's own HTTP defaults retry for minutes; a merge should learn quickly that the server is away.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def available() -> bool:
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):  # blocked (sys.modules["mlflow"] = None) or half-installed
        return False


def _client(tracking_uri: str):
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def download_checkpoint(uri: str, tracking_uri: str, workdir: Path, limit: int) -> Path:
    """The one checkpoint file that ``uri`` names (a file) or holds (a model or run folder)."""
    from storage.sources import SourceFailed

    if not available():
        raise SourceFailed("MLflow is not installed on this worker (pip install 'rebasin[mlflow]')", status=422)
    client = _client(tracking_uri)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    workdir.mkdir(parents=True, exist_ok=True)
    try:
        artifact_uri = uri
        if uri.startswith("models:/"):
            # Resolved here, against this registry (download_artifacts would ask the process-wide one).
            name, _, version = uri.removeprefix("models:/").partition("/")
            artifact_uri = client.get_model_version_download_uri(name, version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(workdir), tracking_uri=tracking_uri))
    except MlflowException as error:
        code = getattr(error, "error_code", "")
        retry = code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
        raise SourceFailed(f"{uri}: {error.message[:500]}", status=502 if retry else 422, retry=retry) from None
    except OSError as error:
        raise SourceFailed(f"{uri}: {type(error).__name__}: {error}", retry=True) from None
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    if sum(p.stat().st_size for p in files) > limit and local.is_file():
        raise SourceFailed(f"{uri} is over the limit of {limit} bytes (REBASIN_MAX_UPLOAD_BYTES)", status=413, kind="upload-too-large")
    candidates = [p for p in files if p.suffix in CHECKPOINT_SUFFIXES]
    if len(candidates) != 1:
        names = ", ".join(str(p.relative_to(local)) for p in candidates) or "none"
        raise SourceFailed(f"{uri} must hold exactly one checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}); it holds: "
                           f"{names}. Name the file: runs:/<run_id>/<path to the file>", status=422)
    if candidates[0].stat().st_size > limit:
        raise SourceFailed(f"{uri} is over the limit of {limit} bytes (REBASIN_MAX_UPLOAD_BYTES)", status=413, kind="upload-too-large")
    return candidates[0]


def _numbers(prefix: str, value, out: dict[str, float]) -> dict[str, float]:
    """Flatten the numeric leaves of a nested report into MLflow metric names (barrier.aligned.loss)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _numbers(f"{prefix}.{key}" if prefix else str(key), inner, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        out[prefix] = float(value)
    return out


def job_params(request: dict, result: dict) -> dict[str, str]:
    params = {"method": request.get("method", ""), "checkpoints": ",".join(request.get("checkpoints", [])),
              "device": request.get("device", "auto")}
    if request.get("architecture"):
        params["architecture"] = request["architecture"].get("name", "")
        params |= {f"architecture.{k}": v for k, v in (request["architecture"].get("options") or {}).items()}
    for source in (request.get("options") or {}, result.get("options") or {}):
        params |= {f"options.{k}": v for k, v in source.items()}
    for role in ("dataset", "eval_dataset"):
        if request.get(role):
            params[role] = request[role]
    return {key: str(value)[:500] for key, value in params.items()}


def log_job(tracking_uri: str, experiment: str, register_as: str | None, job_id: str, request: dict, result: dict,
            files: dict[str, Path]) -> dict:
    """Log a run for a succeeded job; returns what the job's result records: run id, experiment id, model version."""
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(experiment)
        except MlflowException:  # created meanwhile by another job
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(experiment_id, run_name=f"rebasin {job_id}", tags={"rebasin.job_id": job_id})
    run_id, now = run.info.run_id, int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in _numbers("", {
        "barrier": result.get("barrier"), "merged": result.get("merged"), "matching": result.get("matching")}, {}).items()]
    curves = result.get("curves") or {}
    for curve, series in curves.items():
        if isinstance(series, dict):
            for quantity, values in series.items():
                metrics += [Metric(f"curve.{curve}.{quantity}", float(v), now, step) for step, v in enumerate(values)
                            if isinstance(v, (int, float)) and math.isfinite(v)]
    params = [Param(key, value) for key, value in job_params(request, result).items()]
    # MLflow takes up to 100 params and 1000 metrics a batch.
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for name in ("report.json", "barrier.png", "permutation.json"):
        if name in files:
            client.log_artifact(run_id, str(files[name]))
    exported = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri}
    if register_as:
        client.log_artifact(run_id, str(files["merged.safetensors"]), MODEL_ARTIFACT_DIR)
        try:
            client.create_registered_model(register_as)
        except MlflowException as error:
            if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(register_as, source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT_DIR}", run_id=run_id)
        exported |= {"registered_model": register_as, "model_version": str(version.version)}
    client.set_terminated(run_id)
    return exported
