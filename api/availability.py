"""Dependency outages answer 503 with Retry-After, never 500: the client did nothing wrong and should retry."""

from fastapi import FastAPI, Request

from api.problems import Problem, log, problem_response
from storage.db import DATABASE_UNAVAILABLE

# A database failover or restart usually completes within seconds.
DATABASE_RETRY_AFTER_S = 5


def install_outage_handlers(app: FastAPI) -> None:
    async def database_unavailable(request: Request, error: Exception):
        log.warning("database unreachable on %s %s: %s", request.method, request.url.path, str(error).splitlines()[0][:300])
        problem = Problem(
            503,
            "Service unavailable",
            "The metadata database cannot be reached right now; nothing was changed. Retry after the time in Retry-After.",
            kind="database-unavailable",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        )
        return problem_response(problem, request)

    for error_class in DATABASE_UNAVAILABLE:
        app.add_exception_handler(error_class, database_unavailable)
