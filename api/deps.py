"""Dependencies injected into the routers: settings, DB session, artifact store, the caller's tenant."""

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from core.config import Settings
from api.problems import Problem
from storage.artifacts import ArtifactStore
from storage.db import get_sessionmaker

OPEN_MODE_TENANT = "default"


# Dependencies that do no I/O are async: FastAPI would run a plain def in the thread pool.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


async def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> AsyncIterator[Session]:
    # Opening a session does no I/O (it connects on first use); closing it does, in the thread pool.
    session = get_sessionmaker(settings.resolved_database_url())()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


SESSION_COOKIE = "rebasin_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
SESSION_MAX_AGE_S = 12 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _session_secret(settings: Settings) -> bytes:
    # Derived from all the keys: replicas agree without configuration, a tenant (who knows one key) cannot
    # forge it, and changing the keys ends every session.
    return hashlib.sha256(b"rebasin-session\0" + settings.api_keys.encode()).digest()


def make_session_token(settings: Settings, key_digest: str) -> str:
    """A signed cookie value naming the key by its digest (the key itself never reaches the browser again)."""
    payload = _b64(json.dumps({"k": key_digest, "e": int(time.time()) + SESSION_MAX_AGE_S}).encode())
    return f"{payload}.{_b64(hmac.new(_session_secret(settings), payload.encode(), 'sha256').digest())}"


def read_session_token(settings: Settings, token: str) -> str | None:
    """The key digest of a valid, unexpired session token, else None."""
    payload, _, signature = token.partition(".")
    expected = _b64(hmac.new(_session_secret(settings), payload.encode(), "sha256").digest())
    if not hmac.compare_digest(signature.encode(), expected.encode()):  # bytes: a cookie may hold any text
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    return claims.get("k") if isinstance(claims, dict) and claims.get("e", 0) > time.time() else None


def csrf_token(settings: Settings, session_token: str) -> str:
    """Bound to the session: a page on another origin can neither read it nor compute it."""
    return _b64(hmac.new(_session_secret(settings), b"csrf\0" + session_token.encode(), "sha256").digest())


def check_same_origin(request: Request) -> None:
    """Browsers name the page that sent a request: a state change asked for by another site's page is refused.
    Clients that are not browsers send neither header and are not affected."""
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("origin")
    # Host only: behind a TLS-terminating proxy the scheme seen here may be http while the page's is https.
    cross = origin is not None and urlsplit(origin).netloc != request.headers.get("host", "")
    if cross or request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        raise Problem(403, "Cross-origin request refused", "State-changing requests must come from this server's own pages.", kind="cross-origin")


def session_tenant(request: Request) -> str | None:
    """The tenant of the request's session cookie, if it holds a valid session for a current key."""
    token = request.cookies.get(SESSION_COOKIE)
    digest = token and read_session_token(request.app.state.settings, token)
    return request.app.state.tenant_by_key_digest.get(digest) if digest else None


async def get_tenant(request: Request) -> str:
    tenants = request.app.state.tenant_by_key_digest
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and presented.strip():
        if not tenants:
            return OPEN_MODE_TENANT
        tenant = tenants.get(hash_key(presented.strip()))
        if tenant is not None:
            return tenant
    elif not tenants:
        check_same_origin(request)
        return OPEN_MODE_TENANT
    elif (tenant := session_tenant(request)) is not None:
        if request.method not in SAFE_METHODS:
            check_same_origin(request)
            given = request.headers.get(CSRF_HEADER, "")
            expected = csrf_token(request.app.state.settings, request.cookies[SESSION_COOKIE])
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise Problem(403, "CSRF token missing", f"Send the session's CSRF token in the {CSRF_HEADER} header.", kind="csrf")
        return tenant
    raise Problem(
        401, "Unauthorized", "Send a valid API key as 'Authorization: Bearer <key>'.", headers={"WWW-Authenticate": "Bearer"}
    )


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
TenantDep = Annotated[str, Depends(get_tenant)]
