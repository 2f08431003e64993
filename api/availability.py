"""Dependency outages answer 503 with Retry-After, never 500: the client did nothing wrong and should retry."""

from fastapi import FastAPI, Request
from sqlalchemy.exc import TimeoutError as PoolTimeout

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

    async def overloaded(request: Request, error: Exception):
        # Every pooled database connection stayed busy for the pool timeout: more requests than this
        # replica can serve. The client should back off; the operator should add replicas.
        log.warning("database connection pool exhausted on %s %s", request.method, request.url.path)
        problem = Problem(
            503,
            "Service overloaded",
            "The server is too busy to take this request now; nothing was changed. Retry after the time in Retry-After.",
            kind="overloaded",
            headers={"Retry-After": "2"},
        )
        return problem_response(problem, request)

    app.add_exception_handler(PoolTimeout, overloaded)
