"""Dependencies injected into the routers: settings, DB session, artifact store, the caller's tenant."""

import hashlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from core.config import Settings
from api.problems import Problem
from api.quotas import check_request_rate
from api.sessions import check_csrf, check_same_origin, session_tenant
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


async def get_tenant(request: Request) -> str:
    tenant = _authenticated_tenant(request)
    check_request_rate(request.app.state.rate_limiter, tenant)
    return tenant


def _authenticated_tenant(request: Request) -> str:
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
        check_csrf(request)
        return tenant
    raise Problem(
        401, "Unauthorized", "Send a valid API key as 'Authorization: Bearer <key>'.", headers={"WWW-Authenticate": "Bearer"}
    )


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
TenantDep = Annotated[str, Depends(get_tenant)]
