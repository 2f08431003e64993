"""Per-tenant quotas: active jobs, stored bytes and request rate, each answered with 429 and Retry-After.

Job and storage counts come from the database, so every API replica enforces the
same limit. The request rate is a token bucket per API process: with N replicas
behind a load balancer a tenant gets up to N times the rate (size it per replica).
"""

import math
import threading
import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.problems import Problem
from core.config import Settings
from core.schemas import Quotas, Usage, UsageOut
from storage.models import ACTIVE_STATUSES, Artifact, Blob, Job

# When to try again after a refusal that only time or the tenant's own action lifts.
ACTIVE_JOBS_RETRY_AFTER_S = 30
STORAGE_RETRY_AFTER_S = 300


def over_quota(what: str, detail: str, retry_after_s: float, **extra) -> Problem:
    retry_after = str(max(1, math.ceil(retry_after_s)))
    return Problem(429, "Quota exceeded", detail, kind=f"quota-{what}", headers={"Retry-After": retry_after}, quota=what, **extra)


class RequestRateLimiter:
    """Token buckets, one per tenant: ``rate`` requests a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, monotonic time)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _refill(self, tenant: str, now: float) -> float:
        tokens, then = self._buckets.get(tenant, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - then) * self.rate)

    def take(self, tenant: str) -> float:
        """Spend one request; 0 when allowed, else the seconds until one is."""
        if not self.enabled:
            return 0.0
        with self._lock:
            now = time.monotonic()
            tokens = self._refill(tenant, now)
            if tokens >= 1:
                self._buckets[tenant] = (tokens - 1, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (1 - tokens) / self.rate

    def available(self, tenant: str) -> int | None:
        if not self.enabled:
            return None
        with self._lock:
            return int(self._refill(tenant, time.monotonic()))


def check_request_rate(limiter: RequestRateLimiter, tenant: str) -> None:
    wait_s = limiter.take(tenant)
    if wait_s > 0:
        raise over_quota(
            "request-rate",
            f"Tenant {tenant!r} sent more than {limiter.burst} requests at once or {limiter.rate:g} a second "
            "on average. Slow down: poll less often, or use GET /v1/jobs/{id}/events instead of polling.",
            wait_s,
        )


def _limit(value: float) -> int | float | None:
    return value if value > 0 else None


def job_counts(session: Session, tenant: str) -> dict[str, int]:
    rows = session.execute(
        select(Job.status, func.count()).where(Job.tenant == tenant, Job.status.in_(ACTIVE_STATUSES)).group_by(Job.status)
    ).all()
    return dict(rows)


def stored_bytes(session: Session, tenant: str) -> int:
    # Blobs, not checkpoint rows: identical uploads share one stored object and are counted once.
    return int(session.scalar(select(func.coalesce(func.sum(Blob.size_bytes), 0)).where(Blob.tenant == tenant)))


def check_active_jobs(session: Session, tenant: str, settings: Settings) -> None:
    limit = settings.tenant_max_active_jobs
    if limit <= 0:
        return
    active = sum(job_counts(session, tenant).values())
    if active >= limit:
        raise over_quota(
            "active-jobs",
            f"Tenant {tenant!r} has {active} jobs queued or running, the limit is {limit} "
            "(REBASIN_TENANT_MAX_ACTIVE_JOBS). Submit more once some have finished.",
            ACTIVE_JOBS_RETRY_AFTER_S,
            limit=limit,
            used=active,
        )


def check_storage(session: Session, tenant: str, settings: Settings, incoming_bytes: int = 0) -> None:
    """Refuse an upload that would take the tenant past its stored-bytes quota (before a byte is stored)."""
    limit = settings.tenant_max_stored_bytes
    if limit <= 0:
        return
    used = stored_bytes(session, tenant)
    if used + max(0, incoming_bytes) > limit:
        raise over_quota(
            "stored-bytes",
            f"Tenant {tenant!r} stores {used} bytes of checkpoints and datasets; with this upload "
            f"({incoming_bytes} bytes) it would pass its quota of {limit} bytes (REBASIN_TENANT_MAX_STORED_BYTES). "
            "Delete checkpoints or datasets that are no longer needed.",
            STORAGE_RETRY_AFTER_S,
            limit=limit,
            used=used,
        )


def usage(session: Session, tenant: str, settings: Settings, limiter: RequestRateLimiter) -> UsageOut:
    counts = job_counts(session, tenant)
    artifact_bytes = session.scalar(
        select(func.coalesce(func.sum(Artifact.size_bytes), 0)).join(Job, Job.id == Artifact.job_id).where(Job.tenant == tenant)
    )
    return UsageOut(
        tenant=tenant,
        quotas=Quotas(
            active_jobs=_limit(settings.tenant_max_active_jobs),
            stored_bytes=_limit(settings.tenant_max_stored_bytes),
            requests_per_s=_limit(settings.tenant_requests_per_s),
            request_burst=limiter.burst if limiter.enabled else None,
        ),
        usage=Usage(
            queued_jobs=counts.get("queued", 0),
            running_jobs=counts.get("running", 0),
            active_jobs=sum(counts.values()),
            stored_bytes=stored_bytes(session, tenant),
            artifact_bytes=int(artifact_bytes),
            requests_available=limiter.available(tenant),
        ),
    )
