"""Request and response bodies of the HTTP API (kept apart from the ORM models)."""

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

Method = Literal["weight_matching", "activation_matching", "ste_matching"]
Item = TypeVar("Item")
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class TensorFileOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    sha256: str
    size_bytes: int
    format: str
    num_tensors: int
    created_at: datetime


class CheckpointOut(TensorFileOut):
    num_parameters: int


class DatasetOut(TensorFileOut):
    num_examples: int


class ArchitectureRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class JobOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    max_iter: int = Field(100, ge=1, le=10_000, description="Weight-matching iterations (coordinate-descent sweeps).")
    lambdas: int = Field(25, ge=2, le=201, description="Evenly spaced interpolation points for the barrier curves.")
    merge_lambda: float = Field(0.5, ge=0.0, le=1.0, description="Where on the A-to-aligned-B line the merged model lies.")
    steps: int | None = Field(None, ge=1, le=100_000, description="STE: optimisation steps.")
    learning_rate: float | None = Field(None, gt=0, description="STE: learning rate.")
    batch_size: int | None = Field(None, ge=1, le=65_536, description="STE and activation matching: batch size.")
    repair: Literal["none", "reset", "repair"] | None = Field(
        None, description="What corrects the merged model's activation statistics, in merged.safetensors and in the "
        "extra 'aligned_repair' curve: 'none' (plain interpolation), 'reset' (BatchNorm statistics re-estimated), "
        "'repair' (REPAIR, Jordan et al. 2023: every permuted layer's channels rescaled to the interpolated "
        "statistics of the endpoints, folded into the weights; after a BN reset in BatchNorm networks). Computed on "
        "the 'dataset' (else the 'eval_dataset'). Left out: 'reset' for BatchNorm networks, 'repair' otherwise, "
        "'none' without data.")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Method = "weight_matching"
    checkpoints: list[str] = Field(min_length=2, max_length=64, description="A first; more than two = MergeMany.")
    architecture: ArchitectureRef | None = None
    permutation_spec: dict[str, Any] | None = None
    dataset: str | None = None
    eval_dataset: str | None = None
    options: JobOptions = Field(default_factory=JobOptions)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description=(
        "auto: the worker's device; cpu; cuda or cuda:N: a GPU worker (each runs on its own GPU). Refused when "
        "the embedded server's machine has no such GPU; with a broker, the job waits for a GPU worker."))
    callback_url: HttpUrl | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if (self.architecture is None) == (self.permutation_spec is None):
            raise ValueError("give exactly one of 'architecture' and 'permutation_spec'")
        if self.method != "weight_matching" and self.dataset is None:
            raise ValueError(f"{self.method} needs a 'dataset' (activations are computed on it)")
        if self.options.repair in ("reset", "repair") and self.dataset is None and self.eval_dataset is None:
            raise ValueError(f"repair={self.options.repair!r} computes statistics on data: give a 'dataset' "
                             "(or an 'eval_dataset')")
        if len(set(self.checkpoints)) != len(self.checkpoints):
            raise ValueError("'checkpoints' lists the same checkpoint twice")
        return self


class Progress(BaseModel):
    stage: str
    completed: int
    total: int
    message: str = ""


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    size_bytes: int
    sha256: str


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: JobStatus
    method: Method
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress | None
    result: dict[str, Any] | None
    artifacts: list[ArtifactOut]
    error: dict[str, Any] | None
    attempts: int
    device_used: str | None = Field(None, description="The device the job ran on (cpu, cuda:0), once a worker has taken it.")
    request: dict[str, Any]


class Page(BaseModel, Generic[Item]):
    items: list[Item]
    next_page_token: str | None = None


class Quotas(BaseModel):
    """A tenant's limits; null = unlimited."""

    active_jobs: int | None = Field(description="queued plus running jobs at once (REBASIN_TENANT_MAX_ACTIVE_JOBS)")
    stored_bytes: int | None = Field(description="bytes of uploaded checkpoints and datasets (REBASIN_TENANT_MAX_STORED_BYTES)")
    requests_per_s: float | None = Field(description="sustained API requests per second (REBASIN_TENANT_REQUESTS_PER_S)")
    request_burst: int | None = Field(description="requests that may come at once (REBASIN_TENANT_REQUEST_BURST)")


class Usage(BaseModel):
    queued_jobs: int
    running_jobs: int
    active_jobs: int = Field(description="queued plus running: what the active_jobs quota counts")
    stored_bytes: int = Field(description="uploaded checkpoints and datasets, identical files counted once")
    artifact_bytes: int = Field(description="outputs of the tenant's jobs (not limited)")
    requests_available: int | None = Field(description="requests that may be sent right now without a 429")


class UsageOut(BaseModel):
    tenant: str
    quotas: Quotas
    usage: Usage
