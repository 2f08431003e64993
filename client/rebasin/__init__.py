"""Python client of the rebasin service (Git Re-Basin: merge checkpoints modulo permutation symmetries).

Installed alone with ``pip install ./client`` (httpx only); the server's distribution ships it too."""

from rebasin.client import (
    AsyncClient,
    Client,
    Conflict,
    InvalidRequest,
    JobFailed,
    NotFound,
    QuotaExceeded,
    RebasinError,
    ServerError,
    Unauthorized,
)

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "Conflict", "InvalidRequest", "JobFailed", "NotFound", "QuotaExceeded", "RebasinError",
           "ServerError", "Unauthorized"]
