"""One log format for every process and library (ours, uvicorn, Celery): text on a terminal, JSON lines
otherwise, or as ``REBASIN_LOG_FORMAT`` (``auto``, ``text``, ``json``) says. Lines carry the request id and the job
id they belong to."""

import json
import logging
import sys
import time
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)


def _context() -> dict:
    return {name: value for name, var in (("request_id", request_id_var), ("job_id", job_id_var)) if (value := var.get()) is not None}


class JsonFormatter(logging.Formatter):
    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        } | _context()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context()
        return line + "".join(f" [{k}={v}]" for k, v in context.items()) if context and "\n" not in line else line


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Our handler on the root logger, so uvicorn's and Celery's loggers (which propagate) share it;
    warnings (e.g. Celery's about running as root) become log lines too."""
    handler = logging.StreamHandler(sys.stderr)
    text = fmt == "text" or (fmt == "auto" and sys.stderr.isatty())
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("rebasin", "uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Celery's per-task line says "succeeded" for a task whose job failed: the worker logs each ending itself.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    # Alembic announces each of its plugins on import (seven lines per process start): noise, not news.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.captureWarnings(True)
