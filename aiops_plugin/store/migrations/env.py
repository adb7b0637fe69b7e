"""Alembic environment of the store, configured from code (``Store.upgrade``), not an ini file.

``Store.upgrade`` hands its own open connection in ``config.attributes["connection"]`` so that the
migration runs on the engine the agent uses (SQLite pragmas, an in-memory database, a PostgreSQL
advisory lock already held). Without one, for ``alembic`` run by hand with a ``Config`` that sets
``sqlalchemy.url``, an engine is made from that URL.
"""

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from aiops_plugin.store.models import Base


def run_migrations(connection: Connection) -> None:
    """Batch mode lets later migrations alter tables on SQLite, which lacks most ALTER TABLE."""
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Print the SQL instead of running it (``alembic upgrade --sql``), for a DBA to review."""
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=Base.metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    engine = create_engine(
        context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool
    )
    with engine.connect() as connection:
        run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
