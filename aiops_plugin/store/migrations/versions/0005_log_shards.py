"""Sharded logs: each record carries its entity's hash, templates and Drain3 state their tree.

``log_records.entity_hash`` is filled for the existing records (the same BLAKE2b hash as
``aiops_plugin.sharding.entity_hash``, copied here because a migration must not change when the
package does); the existing templates and miner state become the unsharded tree's (``miner``
""), with ``cluster_id`` = their id, which is what it was. Template ids are allocated by the
database from now on: on PostgreSQL the id sequences are moved past the ids written explicitly
before.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 15:00:00
"""

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Records hashed per UPDATE batch.
_CHUNK = 10_000


def _entity_hash(key: str) -> int:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def upgrade() -> None:
    op.add_column("log_records", sa.Column("entity_hash", sa.BigInteger(), nullable=True))
    records = sa.table(
        "log_records",
        sa.column("id", sa.Integer()),
        sa.column("entity_key", sa.Text()),
        sa.column("entity_hash", sa.BigInteger()),
    )
    connection = op.get_bind()
    keys = [row[0] for row in connection.execute(sa.select(records.c.entity_key).distinct())]
    update = (
        records.update()
        .where(records.c.entity_key == sa.bindparam("key"))
        .values(entity_hash=sa.bindparam("hash"))
    )
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        connection.execute(update, [{"key": key, "hash": _entity_hash(key)} for key in chunk])
    with op.batch_alter_table("log_records") as batch:
        batch.alter_column("entity_hash", existing_type=sa.BigInteger(), nullable=False)

    with op.batch_alter_table("log_templates") as batch:
        batch.add_column(sa.Column("miner", sa.String(64), server_default="", nullable=False))
        batch.add_column(sa.Column("cluster_id", sa.Integer(), nullable=True))
    op.execute("UPDATE log_templates SET cluster_id = id")
    with op.batch_alter_table("log_templates") as batch:
        batch.alter_column("cluster_id", existing_type=sa.Integer(), nullable=False)
        batch.create_unique_constraint("uq_log_templates_miner_cluster_id", ["miner", "cluster_id"])

    with op.batch_alter_table("log_miner_state") as batch:
        batch.add_column(sa.Column("miner", sa.String(64), server_default="", nullable=False))
    with op.batch_alter_table("log_miner_state") as batch:
        batch.alter_column("miner", existing_type=sa.String(64), server_default=None)
        batch.create_unique_constraint("uq_log_miner_state_miner", ["miner"])

    if connection.dialect.name == "postgresql":
        for table in ("log_templates", "log_miner_state"):
            op.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
            )


def downgrade() -> None:
    with op.batch_alter_table("log_miner_state") as batch:
        batch.drop_constraint("uq_log_miner_state_miner", type_="unique")
        batch.drop_column("miner")
    with op.batch_alter_table("log_templates") as batch:
        batch.drop_constraint("uq_log_templates_miner_cluster_id", type_="unique")
        batch.drop_column("cluster_id")
        batch.drop_column("miner")
    with op.batch_alter_table("log_records") as batch:
        batch.drop_column("entity_hash")
