"""Engine, sessions and schema migrations (Alembic, configured in code: no alembic.ini needed)."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# What the driver raises when the database cannot be reached (down, restarting, network cut):
# worth waiting out, unlike a bad query.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)
# Seconds to wait for a TCP connection to PostgreSQL: an unreachable server fails fast instead of
# holding a request (or a worker) for the kernel's TCP timeout.
CONNECT_TIMEOUT_S = 5


_engines: list[Engine] = []


def _forget_connections_in_child() -> None:
    # A forked process (Celery's pool) must not use the parent's pooled connections or pool locks,
    # which another thread of the parent (the stale-job sweeper) may be holding at the moment of the fork.
    for engine in _engines:
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_connections_in_child)


@lru_cache
def get_engine(url: str) -> Engine:
    engine = _create_engine(url)
    _engines.append(engine)
    return engine


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            # WAL lets the API read while the worker writes; foreign keys are off by default.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if parsed.get_backend_name() == "postgresql" else {}
    # pool_pre_ping: a connection that died with a database restart is replaced, not handed out.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=10, connect_args=connect_args)


@lru_cache
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    with get_sessionmaker(url)() as session:
        yield session


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        # A fresh embedded data dir: the migration's own engine would not create the file's folder.
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def schema_status(url: str) -> tuple[str | None, str]:
    """(revision the database is at, revision the code expects)."""
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with get_engine(url).connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current, head
