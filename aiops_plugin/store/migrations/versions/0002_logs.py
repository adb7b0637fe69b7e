"""Log pipeline: templates with their embeddings, accepted log records, Drain3 state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "log_templates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("template", sa.Text(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("embedding_model", sa.String(length=500), nullable=True),
        sa.Column("embedded_template", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_log_templates"),
    )
    op.create_table(
        "log_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("entity_group", sa.String(length=200), nullable=False),
        sa.Column("entity_key", sa.Text(), nullable=False),
        sa.Column("severity_number", sa.Integer(), nullable=False),
        sa.Column("severity_text", sa.String(length=64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("template_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_log_records"),
    )
    op.create_index(
        "ix_log_records_entity_key_observed_at",
        "log_records",
        ["entity_key", "observed_at"],
    )
    op.create_index("ix_log_records_template_id", "log_records", ["template_id"])
    op.create_index("ix_log_records_received_at", "log_records", ["received_at"])
    op.create_table(
        "log_miner_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_log_miner_state"),
    )


def downgrade() -> None:
    op.drop_table("log_miner_state")
    op.drop_index("ix_log_records_received_at", table_name="log_records")
    op.drop_index("ix_log_records_template_id", table_name="log_records")
    op.drop_index("ix_log_records_entity_key_observed_at", table_name="log_records")
    op.drop_table("log_records")
    op.drop_table("log_templates")
