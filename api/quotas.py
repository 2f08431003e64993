"""Per-tenant quotas: active jobs, stored bytes and request rate, each answered with 429 and Retry-After.

Job and storage counts come from the database, so every API replica enforces the
same limit; a job's check and insert happen under a per-tenant lock (a PostgreSQL
advisory lock; a process lock on the embedded default), so concurrent submissions
cannot overshoot. The request rate is one token bucket per tenant: in Redis (a
script, atomic) when the broker is Redis, shared by every replica; in the process
on the embedded default.
"""

import hashlib
import logging
import math
import threading
import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.problems import Problem
from core.config import Settings
from core.schemas import Quotas, Usage, UsageOut
from storage.models import ACTIVE_STATUSES, Artifact, Blob, Job

log = logging.getLogger("rebasin.api")
REDIS_RETRY_S = 5
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

    async def check(self, tenant: str) -> None:
        refuse_if_waiting(self, tenant, self.take(tenant))


# GCRA, the token bucket kept as one number: the theoretical arrival time of the next request. Redis' clock,
# so that replicas with skewed clocks agree. Returns the seconds to wait (as text: Lua numbers become integers).
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat + interval - burst * interval - now
if ARGV[3] == 'peek' then return tostring((now - (tat - burst * interval)) / interval) end
if wait > 0 then return tostring(wait) end
redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', math.ceil(burst * interval * 1000) + 1000)
return '0'
"""


class RedisRateLimiter:
    """The same bucket as RequestRateLimiter, in Redis: every replica spends from one bucket per tenant."""

    def __init__(self, redis_url: str, rate: float, burst: int):
        import redis
        import redis.asyncio

        self.rate, self.burst = rate, max(1, burst)
        self._async = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._sync = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._script = self._async.register_script(GCRA_SCRIPT)
        self._sync_script = self._sync.register_script(GCRA_SCRIPT)
        # Redis unreachable: each process limits on its own (as on the embedded default) rather than refuse
        # every request or let every one through; Redis is tried again after a pause.
        self._local = RequestRateLimiter(rate, burst)
        self._redis_down_until = 0.0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @staticmethod
    def _key(tenant: str) -> str:
        return "rebasin:rate:" + hashlib.sha256(tenant.encode()).hexdigest()[:32]

    async def check(self, tenant: str) -> None:
        if not self.enabled:
            return
        import redis

        wait_s = None
        if time.monotonic() >= self._redis_down_until:
            try:
                wait_s = float(await self._script(keys=[self._key(tenant)], args=[1 / self.rate, self.burst, "take"]))
            except redis.RedisError as error:
                log.warning("request rate: Redis unreachable (%s); limiting per process for %d s", error, REDIS_RETRY_S)
                self._redis_down_until = time.monotonic() + REDIS_RETRY_S
        refuse_if_waiting(self, tenant, self._local.take(tenant) if wait_s is None else wait_s)

    def available(self, tenant: str) -> int | None:
        if not self.enabled:
            return None
        import redis

        try:
            tokens = float(self._sync_script(keys=[self._key(tenant)], args=[1 / self.rate, self.burst, "peek"]))
        except redis.RedisError:
            return self._local.available(tenant)
        return max(0, min(self.burst, int(tokens)))


def make_rate_limiter(settings: Settings):
    redis_url = settings.redis_url()
    if redis_url and settings.tenant_requests_per_s > 0:
        return RedisRateLimiter(redis_url, settings.tenant_requests_per_s, settings.tenant_request_burst)
    return RequestRateLimiter(settings.tenant_requests_per_s, settings.tenant_request_burst)


def refuse_if_waiting(limiter, tenant: str, wait_s: float) -> None:
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


_process_tenant_lock = threading.Lock()


def lock_tenant(session: Session, tenant: str):
    """Serialise the tenant's quota checks with the writes they guard, until the session's transaction ends:
    a PostgreSQL advisory lock (every replica), else a process lock (the embedded default has one API process).
    Returns the process lock to release, or None."""
    if session.get_bind().dialect.name == "postgresql":
        lock_id = int.from_bytes(hashlib.sha256(b"rebasin-quota\0" + tenant.encode()).digest()[:8], "big", signed=True)
        session.execute(select(func.pg_advisory_xact_lock(lock_id)))
        return None
    _process_tenant_lock.acquire()
    return _process_tenant_lock


def check_active_jobs(session: Session, tenant: str, settings: Settings) -> None:
    """Call with the tenant locked (``lock_tenant``) and insert the job in the same transaction."""
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
