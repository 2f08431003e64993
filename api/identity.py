"""Who is calling: managed API keys (hashed in the database), REBASIN_API_KEYS keys, and their scopes.

A managed key's secret is high-entropy random text, so a fast keyed hash (HMAC-SHA256 with the server's
pepper) is enough to store it and lets the key be found by its hash: nothing compares secrets byte by byte.
Each replica keeps what it has checked for ``auth_cache_s`` seconds; a revocation bumps a version in Redis
that every replica reads at most twice a second, so it takes effect everywhere at once (within the cache
time on the embedded default, where the one process also forgets at once).
"""

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.config import Settings
from storage.models import ApiKey, WebSession, utcnow

log = logging.getLogger("rebasin.api")
SCOPES = ("read", "write", "admin")
SECRET_PREFIX = "rbk_"
REVOCATION_VERSION_KEY = "rebasin:auth:version"
VERSION_POLL_S = 0.5
CACHE_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Principal:
    tenant: str
    scope: str
    id: str  # a managed key's id, "env:<digest prefix>", "oidc:<subject>", or "open"

    def allows(self, scope: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)


def env_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def secret_hash(settings: Settings, secret: str) -> str:
    return hmac.new(b"rebasin-api-key\0" + settings.key_pepper.encode(), secret.encode(), "sha256").hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


class Revocations:
    """A version number shared through Redis (when there is one), bumped by every revocation or sign-out."""

    def __init__(self, redis_url: str | None):
        self._redis = None
        if redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._local = 0

    def bump(self) -> None:
        self._local += 1
        if self._redis is not None:
            try:
                self._redis.incr(REVOCATION_VERSION_KEY)
            except Exception as error:  # noqa: BLE001 - replicas still forget within auth_cache_s
                log.warning("could not tell the other replicas of a revocation through Redis (%s); they forget "
                            "within REBASIN_AUTH_CACHE_S", error)

    def current(self) -> tuple[int, bytes | None]:
        if self._redis is None:
            return self._local, None
        try:
            return self._local, self._redis.get(REVOCATION_VERSION_KEY)
        except Exception:  # noqa: BLE001 - Redis down: the cache time still bounds a revocation's delay
            return self._local, b"unreachable"


@dataclass
class _Checked:
    principal: Principal | None
    valid_until: datetime | None  # a key's expiry or scheduled revocation (rotation overlap)
    checked_at: float


class KeyStore:
    """Checks presented keys: REBASIN_API_KEYS first (in memory), then managed keys (cached database rows)."""

    def __init__(self, settings: Settings, sessionmaker, revocations: Revocations):
        self.settings, self._sessionmaker, self.revocations = settings, sessionmaker, revocations
        self.env_keys = {env_key_digest(key): ts for key, ts in settings.scoped_keys().items()}
        self._cache: dict[str, _Checked] = {}
        self._lock = threading.Lock()
        self._version, self._version_read_at = None, 0.0
        self._has_managed: tuple[bool, float] | None = None

    def _forget_if_revoked(self) -> None:
        now = time.monotonic()
        if now - self._version_read_at < VERSION_POLL_S:
            return
        self._version_read_at = now
        version = self.revocations.current()
        if version != self._version:
            with self._lock:
                self._cache.clear()
                self._has_managed = None
            self._version = version

    def forget(self) -> None:
        """Drop what this process has cached and tell the other replicas to (after a revocation)."""
        self.revocations.bump()
        with self._lock:
            self._cache.clear()
            self._has_managed = None

    def has_managed_keys_cached(self) -> bool | None:
        """``has_managed_keys`` if known without I/O, else None."""
        cached = self._has_managed
        if cached is not None and time.monotonic() - cached[1] < max(self.settings.auth_cache_s, 1):
            return cached[0]
        return None

    def has_managed_keys(self) -> bool:
        """Whether any key was ever made in the database: then the server is not in open mode. Blocking."""
        self._forget_if_revoked()
        cached = self.has_managed_keys_cached()
        if cached is not None:
            return cached
        with self._sessionmaker() as session:
            found = session.scalar(select(ApiKey.id).limit(1)) is not None
        self._has_managed = (found, time.monotonic())
        return found

    def principal(self, presented: str) -> Principal | None:
        """The caller a key stands for, or None. Blocking (may read the database): call from a thread."""
        env = self.env_keys.get(env_key_digest(presented))
        if env is not None:
            return Principal(tenant=env[0], scope=env[1], id=f"env:{env_key_digest(presented)[:12]}")
        if not presented.startswith(SECRET_PREFIX) or len(presented) > 200:
            return None
        self._forget_if_revoked()
        digest = secret_hash(self.settings, presented)
        checked = self._cache.get(digest)
        if checked is None or time.monotonic() - checked.checked_at >= self.settings.auth_cache_s:
            checked = self._lookup(digest)
        if checked.principal is None or (checked.valid_until is not None and utcnow() >= checked.valid_until):
            return None
        return checked.principal

    def _lookup(self, digest: str) -> _Checked:
        with self._sessionmaker() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.secret_hash == digest))
        principal = valid_until = None
        if row is not None:
            principal = Principal(tenant=row.tenant, scope=row.scope, id=row.id)
            valid_until = min((t for t in (row.revoked_at, row.expires_at) if t is not None), default=None)
        checked = _Checked(principal, valid_until, time.monotonic())
        with self._lock:
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[digest] = checked
        return checked


# --- Key management: shared by `rebasin keys` and the admin API ------------------------------------------


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``45s`` (or plain seconds)."""
    text = text.strip().lower()
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 90d, 12h, 30m)") from None
    if not 0 < seconds <= 100 * 365 * 86400:
        raise ValueError(f"duration out of range: {text!r}")
    return timedelta(seconds=seconds)


def create_key(session: Session, settings: Settings, tenant: str, scope: str, name: str = "",
               expires_in: timedelta | None = None) -> tuple[ApiKey, str]:
    """A new key and its secret (shown once: only its hash is stored)."""
    secret = new_secret()
    row = ApiKey(tenant=tenant, scope=scope, name=name, secret_hash=secret_hash(settings, secret),
                 expires_at=utcnow() + expires_in if expires_in else None)
    session.add(row)
    session.commit()
    return row, secret


def end_sessions_of(session: Session, principal_id: str) -> None:
    session.execute(update(WebSession).where(WebSession.principal == principal_id, WebSession.ended_at.is_(None))
                    .values(ended_at=utcnow()))


def revoke_key(session: Session, row: ApiKey) -> ApiKey:
    """Revoke now; the key's browser sessions end with it."""
    now = utcnow()
    if row.revoked_at is None or row.revoked_at > now:
        row.revoked_at = now
    end_sessions_of(session, row.id)
    session.commit()
    return row


def rotate_key(session: Session, settings: Settings, row: ApiKey, overlap: timedelta) -> tuple[ApiKey, str]:
    """A new key with the same tenant, name, scope and expiry; the old one keeps working for ``overlap``."""
    remaining = row.expires_at - utcnow() if row.expires_at else None
    new, secret = create_key(session, settings, row.tenant, row.scope, row.name, remaining)
    row.rotated_to = new.id
    if row.revoked_at is None or row.revoked_at > utcnow() + overlap:
        row.revoked_at = utcnow() + overlap
    session.commit()
    return new, secret


def key_status(row: ApiKey) -> str:
    now = utcnow()
    if row.revoked_at is not None and row.revoked_at <= now:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "rotating" if row.revoked_at is not None else "active"


def key_record(row: ApiKey, secret: str | None = None) -> dict:
    """What the CLI and the admin API show of a key (the secret only right after it was made)."""
    out = {
        "id": row.id, "tenant": row.tenant, "name": row.name, "scope": row.scope, "status": key_status(row),
        "created_at": row.created_at, "expires_at": row.expires_at, "revoked_at": row.revoked_at, "rotated_to": row.rotated_to,
    }
    return out | ({"secret": secret} if secret else {})
