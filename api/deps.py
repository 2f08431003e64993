"""Dependencies injected into the routers: settings, DB session, artifact store, the caller's tenant."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from core.config import Settings
from api.problems import Problem
from api.identity import KeyStore, Principal, env_key_digest
from api.oidc import looks_like_jwt
from api.sessions import SAFE_METHODS, SESSION_COOKIE, check_csrf, check_same_origin, read_session
from storage.artifacts import ArtifactStore
from storage.db import get_sessionmaker

OPEN_MODE_TENANT = "default"
# Not admin: keys are made with `rebasin keys create` (which ends open mode), not by anyone on loopback.
OPEN_MODE_PRINCIPAL = Principal(tenant=OPEN_MODE_TENANT, scope="write", id="open")


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
    return env_key_digest(key)


def open_mode(app) -> bool | None:
    """No keys anywhere and no OIDC issuer: every caller is the default tenant (the server listens on loopback
    only). None when finding out needs the database (call ``open_mode_blocking`` from a thread)."""
    keys: KeyStore = app.state.keys
    if keys.env_keys or app.state.oidc is not None:
        return False
    managed = keys.has_managed_keys_cached()
    return None if managed is None else not managed


def open_mode_blocking(app) -> bool:
    known = open_mode(app)
    return known if known is not None else not app.state.keys.has_managed_keys()


UNAUTHORIZED = "Send a valid API key (or an OIDC token) as 'Authorization: Bearer <key>'."


def _unauthorized() -> Problem:
    return Problem(401, "Unauthorized", UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


def authenticate(request: Request) -> Principal:
    """The caller of a request, from its bearer key or token, or its session cookie. Blocking: runs in a thread."""
    app = request.app
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    presented = presented.strip()
    if open_mode_blocking(app):
        if scheme.lower() != "bearer" or not presented:
            check_same_origin(request)
        return OPEN_MODE_PRINCIPAL
    if scheme.lower() == "bearer" and presented:
        if app.state.oidc is not None and looks_like_jwt(presented):
            return app.state.oidc.verify(presented)
        principal = app.state.keys.principal(presented)
        if principal is not None:
            return principal
        raise _unauthorized()
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        with get_sessionmaker(app.state.settings.resolved_database_url())() as session:
            principal = read_session(session, app.state.settings, app.state.keys.env_keys, token)
        if principal is not None:
            check_csrf(request)
            return principal
    raise _unauthorized()


def _fast_principal(request: Request) -> Principal | None:
    """Open mode and REBASIN_API_KEYS keys are checked without I/O, on the event loop: no thread hop."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    mode = open_mode(request.app)
    if mode is True:
        if scheme.lower() != "bearer" or not presented.strip():
            check_same_origin(request)
        return OPEN_MODE_PRINCIPAL
    if scheme.lower() != "bearer" or mode is None:
        return None
    found = request.app.state.keys.env_keys.get(env_key_digest(presented.strip()))
    return Principal(tenant=found[0], scope=found[1], id=f"env:{env_key_digest(presented.strip())[:12]}") if found else None


def check_scope(principal: Principal, scope: str) -> None:
    if not principal.allows(scope):
        raise Problem(403, "Insufficient scope", f"This key or token has scope {principal.scope!r}; this request needs "
                      f"{scope!r}.", kind="insufficient-scope", scope=scope)


async def get_principal(request: Request) -> Principal:
    principal = _fast_principal(request) or await run_in_threadpool(authenticate, request)
    request.state.principal = principal  # for the audit log
    check_scope(principal, "read" if request.method in SAFE_METHODS else "write")
    await request.app.state.rate_limiter.check(principal.tenant)
    return principal


async def get_tenant(principal: Annotated[Principal, Depends(get_principal)]) -> str:
    return principal.tenant


async def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    check_scope(principal, "admin")
    return principal


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
TenantDep = Annotated[str, Depends(get_tenant)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(get_admin)]
