"""Metadata tables. The database, not the broker, is the source of truth for jobs."""

import secrets
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


class TensorFile:
    """Columns shared by checkpoints and datasets: an uploaded, validated safetensors file."""

    tenant: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(32))
    num_tensors: Mapped[int] = mapped_column(Integer)
    tensors: Mapped[dict] = mapped_column(JSON)  # name -> {"dtype", "shape"}: job checks need no download
    object_key: Mapped[str] = mapped_column(String(512), index=True)  # a Blob's key, shared by identical bytes
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Checkpoint(TensorFile, Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ckpt"))
    num_parameters: Mapped[int] = mapped_column(BigInteger)


class Dataset(TensorFile, Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    num_examples: Mapped[int] = mapped_column(BigInteger)


class Blob(Base):
    """One stored object per tenant and content (sha256); checkpoints and datasets with identical bytes share it.

    The row is also the lock that orders "add a reference" against "drop the last reference and delete the
    bytes": both take it (SELECT ... FOR UPDATE) before touching the object. There is no counter to drift:
    references are counted from the checkpoint and dataset rows themselves.
    """

    __tablename__ = "blobs"

    object_key: Mapped[str] = mapped_column(String(512), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DirectUpload(Base):
    """A presigned multipart upload straight to S3 that becomes a checkpoint or dataset once completed."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("upl"))
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # checkpoint | dataset
    name: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    part_size: Mapped[int] = mapped_column(BigInteger)
    part_count: Mapped[int] = mapped_column(Integer)
    object_key: Mapped[str] = mapped_column(String(512))  # temporary key the parts are assembled at
    multipart_upload_id: Mapped[str] = mapped_column(String(1024))  # S3's UploadId
    # pending -> completing -> completed | failed; pending -> aborted | expired
    status: Mapped[str] = mapped_column(String(16), index=True, default="pending")
    resource_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class CheckpointImport(Base):
    """A checkpoint fetched by reference (s3://, https://, models:/, runs:/) by a worker, then ingested like an upload."""

    __tablename__ = "checkpoint_imports"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("imp"))
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    source: Mapped[str] = mapped_column(String(2048))
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")  # queued -> running -> succeeded | failed
    checkpoint_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    # fair dispatch asks, per waiting tenant, when its last job started (worker.dispatch.next_job_id)
    __table_args__ = (Index("ix_jobs_tenant_started_at", "tenant", "started_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    method: Mapped[str] = mapped_column(String(32))
    request: Mapped[dict] = mapped_column(JSON)
    progress: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Set once the broker has the job: a queued job without it was lost between commit and send.
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # "host:pid" of the process running the job, and its last sign of life: a redelivered
    # job is taken over only when that process is gone.
    claimed_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    # The device the job ran on ("cpu", "cuda:0"), set by the worker once it has resolved it.
    device_used: Mapped[str | None] = mapped_column(String(64), nullable=True)

    inputs: Mapped[list["JobInput"]] = relationship(cascade="all, delete-orphan")
    artifacts: Mapped[list["Artifact"]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="Artifact.name"
    )


class JobInput(Base):
    """Which checkpoints and datasets a job reads, so that deleting one in use can be refused."""

    __tablename__ = "job_inputs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(40), primary_key=True, index=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str] = mapped_column(String(16))


class Artifact(Base):
    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(512))


class IdempotencyRecord(Base):
    """The first response to a request sent with an Idempotency-Key, replayed for retries of it."""

    __tablename__ = "idempotency_records"

    tenant: Mapped[str] = mapped_column(String(100), primary_key=True)
    scope: Mapped[str] = mapped_column(String(64), primary_key=True)  # which endpoint
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None while the first is in flight
    response: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    location: Mapped[str | None] = mapped_column(String(512), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Worker(Base):
    """A running worker process and its device, refreshed while it lives: the API reads it to tell
    whether any connected worker can run a job that asks for a GPU."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid of the worker's main process
    device: Mapped[str] = mapped_column(String(64))  # "cpu" or "cuda:N"
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")


class ApiKey(Base):
    """A managed API key. Only a keyed hash of its secret is stored (the secret is shown once, at creation)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    scope: Mapped[str] = mapped_column(String(16))  # read | write | admin
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)  # HMAC-SHA256 of the secret, hex
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    rotated_to: Mapped[str | None] = mapped_column(String(40), nullable=True)  # the key that replaced this one
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WebSession(Base):
    """A browser session: the cookie holds a random token, the row its SHA-256, so ending a session is one update."""

    __tablename__ = "web_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    scope: Mapped[str] = mapped_column(String(16))
    # Who signed in: a managed key's id, "env:<digest prefix>" for a REBASIN_API_KEYS key, or "oidc:<subject>".
    principal: Mapped[str] = mapped_column(String(255), index=True)
    key_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)  # REBASIN_API_KEYS keys: checked each time
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)  # absolute lifetime
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class AuditEvent(Base):
    """One state-changing request: who, what, which object, when, from where, and the result."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_tenant_created_at", "tenant", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("aud"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    tenant: Mapped[str | None] = mapped_column(String(100), nullable=True)  # None: the caller was not identified
    principal: Mapped[str | None] = mapped_column(String(255), nullable=True)
    action: Mapped[str] = mapped_column(String(64), index=True)  # the operation id, e.g. create_job
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(1024))
    object_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    status_code: Mapped[int] = mapped_column(Integer)
    client: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
