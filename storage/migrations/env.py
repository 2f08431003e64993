from alembic import context

from storage.db import get_engine
from storage.models import Base

url = context.config.get_main_option("sqlalchemy.url")
with get_engine(url).connect() as connection:
    # Batch mode lets later migrations alter columns on SQLite too.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
