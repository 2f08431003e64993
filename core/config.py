"""All configuration, read once from the environment (prefix ``REBASIN_``) or a ``.env`` file.

The defaults give the embedded mode: everything lives under ``data_dir`` and
nothing else has to be installed or running.
"""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REBASIN_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path(".rebasin"), description="Root of the embedded SQLite file, artifacts and broker queue.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file under data_dir.")
    artifact_uri: str | None = Field(None, description="file:///path or s3://bucket/prefix; default: data_dir/artifacts.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, R2); unset for AWS.")
    broker_url: str | None = Field(None, description="Celery broker, e.g. redis://host:6379/0; default: filesystem queue under data_dir.")
    api_keys: str = Field(
        "",
        description="Comma-separated tenant:key pairs, each optionally ending in :read, :write (the default) or :admin; "
        "with no keys here, none managed in the database (rebasin keys create) and no OIDC issuer: open mode, loopback only.",
    )
    key_pepper: str = Field(
        "",
        description="Server secret mixed into the stored hashes of managed API keys (HMAC-SHA256): a copy of the "
        "database alone cannot check guessed keys. Every replica needs the same; changing it voids every managed key.",
    )
    auth_cache_s: float = Field(
        3, ge=0, le=60, description="Seconds an API replica trusts a managed key it has checked; a revocation "
        "reaches every replica within this (at once through Redis when REBASIN_BROKER_URL is redis://).",
    )
    session_idle_s: int = Field(2 * 3600, ge=60, description="A browser session unused this long ends.")
    session_max_s: int = Field(12 * 3600, ge=60, description="A browser session ends this long after sign-in, used or not.")
    oidc_issuer: str | None = Field(
        None, description="OIDC issuer URL: bearer JWTs it signs are accepted (JWKS found through its discovery document)."
    )
    oidc_audience: str = Field("rebasin", description="The aud a token must carry.")
    oidc_tenant_claim: str = Field("tenant", description="Claim naming the token's tenant (dots reach into objects).")
    oidc_scope_claim: str = Field(
        "scope", description="Claim with the token's scopes (space-separated or a list); rebasin:read, rebasin:write or "
        "rebasin:admin, the highest wins."
    )
    oidc_jwks_cache_s: int = Field(3600, ge=10, description="Seconds the issuer's signing keys are kept before they are fetched again.")
    audit_retention_days: int = Field(90, ge=0, description="Audit rows older than this are deleted (0 = kept for ever).")
    max_upload_bytes: int = Field(8 * 1024**3, gt=0, description="Largest accepted upload, in bytes.")
    archive_max_members: int = Field(
        10_000, ge=1, description="Most members in an uploaded model-folder archive (.tar, .tar.gz, .zip)."
    )
    archive_max_unpacked_bytes: int = Field(
        32 * 1024**3, gt=0, description="Most bytes an uploaded model-folder archive may unpack to, in all."
    )
    stale_upload_after_s: int = Field(
        24 * 3600,
        ge=60,
        description="Age in seconds after which abandoned upload temporaries are removed: staging files of "
        "interrupted uploads, local .tmp-* files, incomplete S3 multipart uploads, and direct uploads never "
        "completed (their presigned part URLs are valid this long).",
    )
    storage_sweep_interval_s: int = Field(
        3600, ge=1, description="Seconds between two sweeps of abandoned upload temporaries by the API process."
    )
    direct_upload_part_bytes: int = Field(
        64 * 1024**2,
        ge=5 * 1024**2,
        le=5 * 1024**3,
        description="Default part size of direct-to-S3 multipart uploads (S3 allows 5 MiB to 5 GiB, at most 10000 parts).",
    )
    job_max_attempts: int = Field(3, ge=1, description="Deliveries of a job before it fails for good (a worker that dies counts).")
    worker_device: str = Field("auto", description="Default device for jobs that ask for 'auto': auto, cpu or cuda:N.")
    job_time_limit_s: int = Field(6 * 3600, ge=60, description="A job running longer than this fails (soft limit; hard kill 60 s later).")
    job_heartbeat_timeout_s: float = Field(30, gt=0, description="A running job whose worker sent no heartbeat for this long is handed to another worker.")
    job_sweep_interval_s: float = Field(
        10,
        gt=0,
        description="Seconds between two sweeps by every worker for lost jobs: running jobs of dead workers, and "
        "queued jobs the broker has no message for (e.g. Redis restarted empty), which are sent again.",
    )
    tenant_max_active_jobs: int = Field(
        100, ge=0, description="Jobs a tenant may have queued or running at once; more answer 429 (0 = unlimited)."
    )
    tenant_max_stored_bytes: int = Field(
        100 * 1024**3,
        ge=0,
        description="Bytes of checkpoints and datasets a tenant may store (identical files counted once); an upload "
        "past it answers 429 (0 = unlimited).",
    )
    tenant_requests_per_s: float = Field(
        50, ge=0, description="Sustained API requests a second per tenant, shared by all API replicas through Redis when "
        "REBASIN_BROKER_URL is redis:// (else per process); faster answers 429 (0 = unlimited)."
    )
    tenant_request_burst: int = Field(200, ge=1, description="Requests a tenant may send at once before the rate limit applies.")
    s3_max_attempts: int = Field(
        10,
        ge=1,
        description="Attempts of each S3 request (botocore standard retry mode: exponential backoff with jitter, "
        "up to 20 s apart) before an error; rides out S3 answering 500/503/SlowDown for about a minute.",
    )
    worker_memory_bytes: int | None = Field(
        None, gt=0, description="Memory the worker's jobs may use, in bytes; unset: the worker's cgroup limit, else the "
        "machine's physical memory. Divided among the jobs a worker runs at once (--concurrency). A job whose estimated "
        "peak is larger fails at once (problem memory-budget) instead of being killed by the OOM killer.",
    )
    worker_max_memory_per_child_mb: int = Field(0, ge=0, description="Replace a worker process after a job once it holds this much memory (0 = never).")
    callback_secret: str | None = Field(None, description="HMAC-SHA256 key that signs job callbacks; callback_url is refused while unset.")
    log_format: Literal["auto", "text", "json"] = Field(
        "auto", description="Log lines as text or JSON; auto: text when stderr is a terminal, JSON otherwise."
    )
    callback_allow_private: bool = Field(False, description="Allow callbacks to loopback, link-local and private addresses (off: no SSRF).")
    import_s3_buckets: str = Field("", description="Comma-separated S3 buckets checkpoints may be imported from (s3://bucket/key), "
                                   "read with the deployment's credentials; empty: no S3 imports.")
    import_http_hosts: str = Field("", description="Comma-separated host names (or IP literals) checkpoints may be imported from "
                                   "over https://; empty: no HTTPS imports.")
    import_http_allowed_networks: str = Field(
        "", description="Comma-separated CIDRs an import may connect to although they are loopback, link-local or private "
        "(an internal model store); every other such address is refused, checked on the resolved address.")
    import_allow_plain_http: bool = Field(False, description="Allow http:// imports (unencrypted) from the allowed hosts.")
    import_timeout_s: float = Field(30, gt=0, description="Connect and read timeout of each request an import makes.")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking server for models:/ and runs:/ imports and the "
                                            "jobs' mlflow export (needs the rebasin[mlflow] extra).")

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'rebasin.db').resolve()}"

    def resolved_artifact_uri(self) -> str:
        return self.artifact_uri or (self.data_dir / "artifacts").resolve().as_uri()

    def import_buckets(self) -> set[str]:
        return {b.strip() for b in self.import_s3_buckets.split(",") if b.strip()}

    def import_hosts(self) -> set[str]:
        return {h.strip().lower().strip("[]") for h in self.import_http_hosts.split(",") if h.strip()}

    def tenant_keys(self) -> dict[str, str]:
        """Map of API key -> tenant."""
        return {key: tenant for key, (tenant, _) in self.scoped_keys().items()}

    def scoped_keys(self) -> dict[str, tuple[str, str]]:
        """Map of API key -> (tenant, scope) from REBASIN_API_KEYS."""
        pairs = [p.strip() for p in self.api_keys.split(",") if p.strip()]
        keys = {}
        for pair in pairs:
            tenant, sep, key = pair.partition(":")
            scope = "write"
            head, _, last = key.rpartition(":")
            if head and last in ("read", "write", "admin"):
                key, scope = head, last
            if not sep or not tenant or not key:
                raise ValueError("REBASIN_API_KEYS must be comma-separated tenant:key pairs (each may end in :read, :write or :admin)")
            keys[key] = (tenant, scope)
        return keys

    def redis_url(self) -> str | None:
        """Redis shared by the replicas (the broker's), for limits and revocations; None on the embedded default."""
        url = self.broker_url or ""
        return url if url.startswith(("redis://", "rediss://")) else None


@lru_cache
def get_settings() -> Settings:
    return Settings()
