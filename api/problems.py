"""RFC 9457 problem details for every error the API answers."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("rebasin.api")
PROBLEM_BASE = "https://rebasin.dev/problems/"
MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, kind: str | None = None, headers: dict | None = None, **extra):
        self.status, self.title, self.detail = status, title, detail
        self.kind = kind or title.lower().replace(" ", "-")
        self.headers = headers
        self.extra = extra

    def body(self, instance: str | None = None) -> dict:
        body = {"type": PROBLEM_BASE + self.kind, "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            body["instance"] = instance
        return body | self.extra


def not_found(what: str, resource_id: str) -> Problem:
    return Problem(404, "Not found", f"No {what} with id {resource_id!r}.", kind="not-found")


def problem_response(problem: Problem, request: Request) -> JSONResponse:
    return JSONResponse(problem.body(request.url.path), status_code=problem.status, media_type=MEDIA_TYPE, headers=problem.headers)


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part not in ("body",)) or "request"


def routes_of(app) -> list:
    """Every route with its full path, also those of included routers (which newer FastAPI keeps nested)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def allowed_methods(app, path: str) -> list[str]:
    matching = [route for route in routes_of(app)
                if getattr(route, "path_regex", None) is not None and getattr(route, "methods", None) and route.path_regex.match(path)]
    # A fixed path (/v1/checkpoints/imports) names its own resource, not a value of a neighbour's parameter
    # (/v1/checkpoints/{resource_id}): the Allow header is the fixed path's, as the document says.
    fixed = [route for route in matching if not getattr(route, "param_convertors", None)]
    return sorted(set().union(*(route.methods for route in fixed or matching)))


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, problem: Problem):
        return problem_response(problem, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError):
        errors = [{"field": _location(e["loc"]), "message": e["msg"]} for e in error.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(Problem(422, "Invalid request", detail, kind="validation", errors=errors), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        title = {400: "Malformed body", 404: "Not found", 405: "Method not allowed"}.get(error.status_code, "HTTP error")
        headers = error.headers
        if error.status_code == 405:
            # Starlette names only the first route of the path; a path has one route per method.
            headers = (headers or {}) | {"Allow": ", ".join(allowed_methods(request.app, request.url.path))}
        return problem_response(Problem(error.status_code, title, str(error.detail), headers=headers), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return problem_response(Problem(500, "Internal error", "The server failed to handle the request.", kind="internal"), request)
