"""The Python client, kept importable here for existing code: it lives in the ``rebasin`` package
(client/rebasin, also its own small distribution, ``pip install ./client``)."""

from rebasin.client import TERMINAL, AsyncClient, Client, RebasinError  # noqa: F401
