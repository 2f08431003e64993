"""The FastAPI application."""

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from api.config import Settings, get_settings
from api.problems import MEDIA_TYPE, install_problem_handlers
from api.routers import architectures, files, health, jobs, uploads
from api.uploads import too_large
from storage.artifacts import open_store
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_celery(settings)
    app = FastAPI(title="rebasin", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.store = open_store(settings.resolved_artifact_uri(), settings.s3_endpoint_url)
    install_problem_handlers(app)
    app.add_middleware(RequestSizeLimit, limit=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    for router in (files.checkpoints, files.datasets, uploads.router, jobs.router, architectures.router, health.router):
        app.include_router(router)
    return app
