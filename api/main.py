"""The FastAPI application."""

import uuid

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core import __version__
from core.config import Settings, get_settings
from api.audit import AuditLog
from api.identity import KeyStore, Revocations
from api.oidc import OidcVerifier
from core.logs import request_id_var
from api.metrics import RequestMetrics, create_registry
from api.openapi import install_openapi, operation_id
from api.problems import MEDIA_TYPE, install_problem_handlers
from api.availability import install_outage_handlers
from api.quotas import make_rate_limiter
from api.routers import architectures, audit, exports, files, health, imports, jobs, keys, uploads, usage
from api.routers.web import install_web
from api.uploads import too_large
from storage.artifacts import open_store
from storage.db import get_sessionmaker
from worker.app import configure_celery

MULTIPART_OVERHEAD = 1024 * 1024

DESCRIPTION = """Merge neural-network checkpoints modulo permutation symmetries (Git Re-Basin).

Upload checkpoints, start a merge job, poll it, download the aligned and merged
models with a report of the loss barrier before and after."""


class RequestSizeLimit:
    """Refuse a body announced as too large before a byte of it is read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                problem = too_large(self.limit - MULTIPART_OVERHEAD)
                response = JSONResponse(problem.body(scope["path"]), status_code=413, media_type=MEDIA_TYPE)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestId:
    """Tags each request (and its log lines) with an id, taken from X-Request-ID or made up."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        token = request_id_var.set(request_id)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_celery(settings)
    app = FastAPI(title="rebasin", version=__version__, description=DESCRIPTION, docs_url=None, redoc_url=None,
                  generate_unique_id_function=operation_id)
    app.state.settings = settings
    # Only digests of the API keys are kept: a memory dump does not reveal them.
    sessionmaker = get_sessionmaker(settings.resolved_database_url())
    app.state.keys = KeyStore(settings, sessionmaker, Revocations(settings.redis_url()))
    app.state.oidc = OidcVerifier(settings) if settings.oidc_issuer else None
    app.state.store = open_store(settings.resolved_artifact_uri(), settings.s3_endpoint_url, settings.s3_max_attempts)
    app.state.rate_limiter = make_rate_limiter(settings)
    registry, latency = create_registry(settings.resolved_database_url())
    install_problem_handlers(app)
    install_openapi(app)
    install_outage_handlers(app)
    app.add_middleware(RequestSizeLimit, limit=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(RequestMetrics, latency=latency)
    app.add_middleware(AuditLog, sessionmaker=sessionmaker)
    app.add_middleware(RequestId)
    for router in (imports.router, files.checkpoints, files.datasets, uploads.router, jobs.router, exports.router,
                   architectures.router, health.router, usage.router, keys.router, audit.router):
        app.include_router(router)
    install_web(app)

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
