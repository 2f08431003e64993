"""Request and response bodies of the HTTP API (kept apart from the ORM models)."""

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, WithJsonSchema, model_validator

Method = Literal["weight_matching", "activation_matching", "ste_matching", "auto", "zip"]
Item = TypeVar("Item")
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


PROBLEM_BASE = "https://rebasin.dev/problems/"
# Every problem type the service answers with (the API's errors and failed jobs' errors), and when.
PROBLEM_TYPES = {
    "validation": "the request does not match the schema; `errors` lists each field",
    "unauthorized": "no valid API key (`Authorization: Bearer <key>`)",
    "invalid-token": "an OIDC bearer token that failed a check; `check` names it: malformed, algorithm, kid, signature, "
    "expired, not-yet-valid, audience, issuer, missing-claim, tenant, scope",
    "insufficient-scope": "a key or token whose scope (read, write, admin) does not allow the request",
    "identity-provider-unavailable": "the OIDC issuer's signing keys could not be fetched",
    "not-found": "no such resource for this tenant, or no such path",
    "method-not-allowed": "the path exists, the method does not (the `Allow` header lists those that do)",
    "invalid-file": "an upload that is not a valid checkpoint or dataset file",
    "malformed-body": "a multipart body that cannot be parsed",
    "upload-too-large": "a body over REBASIN_MAX_UPLOAD_BYTES",
    "unsupported-media-type": "an upload not sent as multipart/form-data",
    "upload-interrupted": "the client disconnected before the upload was complete",
    "unknown-input": "a job names a checkpoint or dataset that does not exist",
    "invalid-input": "inputs that cannot be merged: shapes, architecture, options, dataset (a job's error too)",
    "callbacks-off": "callback_url given while the server has no callback secret",
    "callback-refused": "a callback_url the server will not call",
    "not-cancellable": "cancel of a job that has already ended",
    "in-use": "delete of a checkpoint or dataset that a queued or running job uses",
    "page-token": "a page_token this server did not hand out",
    "invalid-idempotency-key": "an Idempotency-Key that is empty or too long",
    "idempotency-key-reused": "an Idempotency-Key used before for a different request",
    "idempotency-in-progress": "the first request with this Idempotency-Key is still being answered",
    "direct-uploads-unavailable": "direct uploads on a server without S3",
    "upload-not-pending": "a direct upload that is no longer pending",
    "upload-expired": "a direct upload past its expiry",
    "parts-rejected": "S3 refused to assemble a direct upload's parts",
    "worker-lost": "a job whose worker process died on every attempt (a job's error)",
    "out-of-memory": "a job that ran out of memory (a job's error)",
    "memory-budget": "a job whose estimated peak memory is larger than the worker's budget (REBASIN_WORKER_MEMORY_BYTES, "
    "else its cgroup limit or physical memory), refused before it loaded anything (a job's error)",
    "time-limit": "a job that ran past REBASIN_JOB_TIME_LIMIT_S (a job's error)",
    "import-refused": "an import source the server's policy refuses (scheme, bucket, host, address, redirect)",
    "import-failed": "an import whose source could not be read (an import's error)",
    "mlflow-unavailable": "the mlflow option on a server without MLflow installed or configured",
    "not-exportable": "an export of a job that has not succeeded",
    "internal": "a fault of the server (a bug): the request may be retried",
}


class FieldError(BaseModel):
    field: str = Field(description="dotted path of the field, e.g. options.max_iter")
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details: every error the API answers, and a failed job's ``error``."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    type: str = Field(
        description=f"`{PROBLEM_BASE}<kind>`; kinds: "
        + "; ".join(f"`{kind}`: {when}" for kind, when in PROBLEM_TYPES.items())
        + ". More may be added; clients should treat an unknown kind by its status.",
        examples=[PROBLEM_BASE + "not-found"],
    )
    title: str = Field(description="short and fixed per type")
    status: int = Field(ge=100, le=599, description="the HTTP status code")
    detail: str = Field(description="what went wrong, in words a user can act on")
    instance: str | None = Field(None, description="the path of the request")
    errors: list[FieldError] | None = Field(None, description="validation: one entry per invalid field")


class Metrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    loss: float
    accuracy: float


class Barrier(BaseModel):
    """Max over lambda of the loss (accuracy: the drop) above the line between the endpoints."""

    model_config = ConfigDict(extra="allow")

    naive: Metrics = Field(description="between A and B as they are")
    aligned: Metrics = Field(description="between A and B permuted into A's basin")


class Curves(BaseModel):
    model_config = ConfigDict(extra="allow")

    lambdas: list[float]
    naive: dict[str, list[float]] = Field(description="loss and accuracy at each lambda")
    aligned: dict[str, list[float]] = Field(description="loss and accuracy at each lambda")


class MatchingReport(BaseModel):
    model_config = ConfigDict(extra="allow")

    objective_initial: float | None = None
    objective_final: float | None = None
    iterations: int
    seconds: float


class MlflowExport(BaseModel):
    """Log the job as an MLflow run on REBASIN_MLFLOW_TRACKING_URI (needs the rebasin[mlflow] extra)."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field(min_length=1, max_length=250, description="experiment to log the run in (created if missing)")
    register_as: str | None = Field(None, min_length=1, max_length=250,
                                    description="register merged.safetensors as a new version of this model")


class MemoryReport(BaseModel):
    """The worker's memory around the job: anonymous resident memory (RssAnon) of the process that ran it."""

    model_config = ConfigDict(extra="allow")

    estimated_peak_bytes: int = Field(description="the estimate made before the job loaded anything (an upper bound)")
    measured_peak_bytes: int = Field(description="the highest RssAnon of the job's process while it ran, sampled "
                                     "every 5 ms; includes baseline_bytes")
    baseline_bytes: int = Field(description="the process's RssAnon when the job started (interpreter, libraries)")
    worker_budget_bytes: int = Field(description="what the worker allows one job: REBASIN_WORKER_MEMORY_BYTES, else "
                                     "its cgroup limit or physical memory, divided by the jobs it runs at once")
    budget_source: str = Field(description="setting, cgroup or physical")


class JobResult(BaseModel):
    """A succeeded job's report (also its ``report.json`` artifact). ``barrier``, ``curves``,
    ``evaluation`` and ``merged`` are there when the job had evaluation data."""

    model_config = ConfigDict(extra="allow")

    method: str | None = None
    num_checkpoints: int | None = None
    options: dict[str, Any] | None = Field(None, description="the options the method used, defaults filled in")
    matching: MatchingReport
    barrier: Barrier | None = None
    curves: Curves | None = None
    merged: Metrics | None = None
    evaluation: dict[str, Any] | None = None
    mlflow: dict[str, Any] | None = Field(None, description="with the mlflow option: run_id, experiment_id, and with "
                                          "register_as registered_model and model_version; error when the export failed")
    memory: MemoryReport | None = Field(None, description="the job's estimated and measured peak memory, and the "
                                        "worker's budget (jobs run by a worker)")
    warnings: list[str] | None = Field(None, description="what went wrong without failing the merge (an MLflow export)")
    partial: dict[str, Any] | None = Field(None, description=(
        "options.merge_until: {merge_until, cut (the module cut after), shared (the trunk's tensors), heads (the "
        "other tensors, one copy per head), flops: {two_models, merged, zipped}, flops_fraction (zipped / two "
        "models), zipped (without label_sets: the heads' mean on the evaluation data), definition}; 'sweep': "
        "{cuts: [{module, permutation, shared_tensors, flops, flops_fraction, joint_accuracy} or {module, permutation, refused: why the method cannot cut there}], flops}"))
    joint_accuracy: dict[str, Any] | None = Field(None, description=(
        "options.label_sets: {ensemble, full_merge, zipped (with merge_until), label_sets, definition}"))
    auto: dict[str, Any] | None = Field(None, description=(
        "method auto: {chosen, criterion, split, time_budget_s, candidates: {method: {score, barrier, barrier_naive, "
        "merged, seconds}}, skipped: {method: why}}; score is the held-out loss barrier with the job's correction "
        "(MergeMany: the merged loss), and the lowest is kept"))


def schema_ref(model: type[BaseModel], nullable: bool = False) -> WithJsonSchema:
    """Document a field as ``model`` while keeping it a plain dict on the wire, exactly as stored."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return WithJsonSchema({"anyOf": [ref, {"type": "null"}]} if nullable else ref)


# Models the API document refers to by name without a field typed as them (see schema_ref).
DOCUMENTED_MODELS = (Problem, JobResult)


class TensorFileOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    sha256: str = Field(description="of the stored safetensors; of the uploaded archive for an hf-folder checkpoint")
    size_bytes: int = Field(description="of the stored safetensors")
    format: str = Field(description="what was uploaded: safetensors, pytorch (stored converted to safetensors), or "
                        "hf-folder (a model folder's archive, stored as one safetensors that holds its layout)")
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
    time_budget_s: float | None = Field(None, gt=0, le=7 * 24 * 3600, description=(
        "auto: seconds the job may spend on its candidates. Weight and activation matching always run; STE matching "
        "runs only with a budget, and is stopped (and left out) when the budget runs out."))
    alpha: float | None = Field(None, ge=0, le=1, description=(
        "zip: factor on a merged feature's correlations for further merges (0: every feature merged at most once; "
        "default 0)."))
    beta: float | None = Field(None, ge=0, le=1, description=(
        "zip: the fraction of each model's merges that may be within the model (0: only across the models, a "
        "permutation; default 0.5)."))
    merge_until: str | None = Field(None, min_length=1, max_length=200, description=(
        "A partial merge (two checkpoints, an architecture): a module of the architecture (`layer2` of a "
        "torchvision ResNet, `layers.1` of an MLP) or a permutation of its spec (`P_layers.1`). Everything up to "
        "and including it, in execution order, is merged into one shared trunk; everything after stays as two "
        "heads, A's own and aligned B's: the artifact zipped.safetensors (`trunk.*`, `heads.0.*`, `heads.1.*`; "
        "matching.load_zipped builds it). The result's `partial` lists the shared tensors and the FLOPs. "
        "`sweep`: every cut point of the spec, each with its FLOPs (and joint accuracy with label_sets), no "
        "zipped.safetensors."))
    label_sets: list[Annotated[list[Annotated[int, Field(ge=0, lt=100_000)]], Field(min_length=1, max_length=100_000)]] | None = Field(
        None, min_length=2, max_length=2, description=(
            "The classes A and B were trained on (two checkpoints), disjoint, e.g. [[0,1,2,3,4],[5,6,7,8,9]]. The "
            "result gains `joint_accuracy` on the evaluation data's examples of those classes: each head scores its "
            "own classes and the prediction is the arg max over the union (ZipIt!): `ensemble` (A and B), "
            "`full_merge` (the merged model) and, with merge_until, `zipped`."))


class JobCreate(BaseModel):
    """Exactly one of ``architecture`` and ``permutation_spec``; ``dataset`` is required by activation and
    STE matching; ``checkpoints`` are distinct."""

    model_config = ConfigDict(
        extra="forbid",
        # JSON Schema's if/then/else (generators that do not know them, e.g. openapi-python-client, skip them).
        json_schema_extra={
            "allOf": [
                {
                    "if": {"required": ["architecture"], "properties": {"architecture": {"type": "object"}}},
                    "then": {"properties": {"permutation_spec": {"type": "null"}}},
                    "else": {"required": ["permutation_spec"], "properties": {"permutation_spec": {"type": "object"}}},
                },
                {
                    "if": {"required": ["method"], "properties": {"method": {"enum": ["activation_matching", "ste_matching", "auto", "zip"]}}},
                    "then": {"required": ["dataset"], "properties": {"dataset": {"type": "string"}}},
                },
            ],
        },
    )

    method: Method = Field("weight_matching", description=(
        "zip: ZipIt! (Stoica et al., ICLR 2024) for two models trained on different tasks: features merged greedily by "
        "activation correlation on the dataset, across and within the models (options alpha, beta), the merge and "
        "unmerge folded into the weights; with options.merge_until, each cut's trunk is zipped."))
    checkpoints: list[str] = Field(min_length=2, max_length=64, json_schema_extra={"uniqueItems": True},
                                   description="A first; more than two = MergeMany. Distinct.")
    architecture: ArchitectureRef | None = Field(None, description="a registered architecture (GET /v1/architectures); "
                                                 "exactly one of this and permutation_spec")
    permutation_spec: dict[str, Any] | None = Field(None, description='{"axes_to_perm": {name: ["P_0", null, ...]}}: '
                                                    "weight matching only; exactly one of this and architecture")
    dataset: str | None = Field(None, description="dataset id; required by activation_matching, ste_matching, zip and auto "
                                "(auto: runs weight, activation and, with options.time_budget_s, STE matching, each "
                                "evaluated on the held-out split with the job's statistics correction, and keeps the "
                                "lowest barrier; every candidate is in the result's 'auto')")
    eval_dataset: str | None = Field(None, description="dataset id for the barrier report (held-out split if it has one)")
    options: JobOptions = Field(default_factory=JobOptions)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description=(
        "auto: the worker's device; cpu; cuda or cuda:N: a GPU worker (each runs on its own GPU). Refused when "
        "the embedded server's machine has no such GPU; with a broker, the job waits for a GPU worker."))
    callback_url: HttpUrl | None = None
    mlflow: MlflowExport | None = Field(None, description="log the job as an MLflow run once it succeeds; a failed export "
                                        "leaves a warning in the result, retried with POST /v1/jobs/{id}/exports")

    @model_validator(mode="after")
    def _consistent(self):
        if (self.architecture is None) == (self.permutation_spec is None):
            raise ValueError("give exactly one of 'architecture' and 'permutation_spec'")
        if self.method != "weight_matching" and self.dataset is None:
            raise ValueError(f"{self.method} needs a 'dataset' ("
                             + ("it compares the candidates on its held-out split)" if self.method == "auto"
                                else "activations are computed on it)"))
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
    result: Annotated[dict[str, Any] | None, schema_ref(JobResult, nullable=True)] = Field(
        description="a succeeded job's report; null before"
    )
    artifacts: list[ArtifactOut]
    error: Annotated[dict[str, Any] | None, schema_ref(Problem, nullable=True)] = Field(
        description="why a failed job failed; null otherwise"
    )
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


KeyScope = Literal["read", "write", "admin"]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
    name: str = Field("", max_length=255)
    scope: KeyScope = "write"
    expires_in_s: int | None = Field(None, strict=True, ge=60, le=100 * 365 * 86400, description="the key stops working this long after creation")


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_s: int = Field(3600, strict=True, ge=0, le=30 * 86400, description="how long the old secret keeps working")


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    tenant: str
    name: str
    scope: KeyScope
    status: Literal["active", "rotating", "revoked", "expired"] = Field(
        description="rotating: replaced, works until revoked_at"
    )
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_to: str | None


class KeyCreated(KeyOut):
    secret: str = Field(description="the key itself: shown this once, only its hash is stored")


class AuditEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    created_at: datetime
    tenant: str | None = Field(description="null: the caller was not identified")
    principal: str | None = Field(description="key id, env:<digest prefix>, oidc:<subject>, or open")
    action: str = Field(description="the operation id, e.g. create_job")
    method: str
    path: str
    object_id: str | None
    status_code: int
    client: str | None = Field(description="the client's address")
    request_id: str | None
