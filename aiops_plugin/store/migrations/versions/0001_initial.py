"""Initial schema: entities, model versions, job runs, anomaly events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "entities",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_name", sa.String(length=200), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_entities"),
        sa.UniqueConstraint("group_name", "key", name="uq_entities_group_name_key"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("detector", sa.String(length=100), nullable=False),
        sa.Column("group_name", sa.String(length=200), nullable=False),
        sa.Column("config_hash", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("training_metrics", sa.JSON(), nullable=False),
        sa.Column("n_entities", sa.Integer(), nullable=False),
        sa.Column("n_features", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
    )
    op.create_index(
        "ix_model_versions_detector_group_name_config_hash_created_at",
        "model_versions",
        ["detector", "group_name", "config_hash", "created_at"],
    )
    op.create_table(
        "job_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=50), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_job_runs"),
    )
    op.create_index("ix_job_runs_kind_started_at", "job_runs", ["kind", "started_at"])
    op.create_index("ix_job_runs_status", "job_runs", ["status"])
    op.create_table(
        "anomaly_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("entity_id", sa.Integer(), nullable=False),
        sa.Column("group_name", sa.String(length=200), nullable=False),
        sa.Column("detector", sa.String(length=100), nullable=False),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("peak_score", sa.Float(), nullable=False),
        sa.Column("peak_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["entity_id"], ["entities.id"], name="fk_anomaly_events_entity_id_entities"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_anomaly_events"),
    )
    op.create_index("ix_anomaly_events_entity_id", "anomaly_events", ["entity_id"])
    op.create_index(
        "ix_anomaly_events_group_name_detector_end_at",
        "anomaly_events",
        ["group_name", "detector", "end_at"],
    )
    op.create_index("ix_anomaly_events_start_at", "anomaly_events", ["start_at"])


def downgrade() -> None:
    op.drop_table("anomaly_events")
    op.drop_table("job_runs")
    op.drop_table("model_versions")
    op.drop_table("entities")
