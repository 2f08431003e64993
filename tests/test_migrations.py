"""Schema migrations: upgrade from empty on SQLite and PostgreSQL, models == migration head, stale schema refused."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from cli.errors import UsageError
from cli.service import prepare_database
from core.config import Settings
from storage import db
from storage.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    yield url
    db.get_engine(url).dispose()


def test_upgrade_from_empty_and_models_match_head(empty_database):
    db.upgrade(empty_database)
    current, head = db.schema_status(empty_database)
    assert current == head
    with db.get_engine(empty_database).connect() as connection:
        assert set(Base.metadata.tables) <= set(inspect(connection).get_table_names())
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_and_upgrade_again(empty_database):
    db.upgrade(empty_database)
    from alembic import command

    command.downgrade(db.alembic_config(empty_database), "base")
    db.upgrade(empty_database)
    assert db.schema_status(empty_database)[0] == db.schema_status(empty_database)[1]


def test_server_refuses_an_out_of_date_schema(empty_database, tmp_path):
    db.upgrade(empty_database, "0001")
    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=empty_database)
    with pytest.raises(UsageError) as exit_info:
        prepare_database(settings)
    assert "rebasin db upgrade" in str(exit_info.value) and "0001" in str(exit_info.value)
    db.upgrade(empty_database)
    prepare_database(settings)  # up to date: no exit


def test_embedded_default_upgrades_itself(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    prepare_database(settings)
    current, head = db.schema_status(settings.resolved_database_url())
    assert current == head
