"""Anomaly events with hysteresis and details; feedback labels on events.

Existing events keep their rows: they get one scored step, no quiet run and empty details.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENT_COLUMNS = (
    "peak_probability",
    "below_since",
    "below_steps",
    "n_steps",
    "contributions",
    "detector_scores",
    "log_templates",
    "root_cause",
)


def upgrade() -> None:
    # batch mode: SQLite cannot add NOT NULL columns without a default or drop columns in place
    with op.batch_alter_table("anomaly_events") as batch:
        batch.add_column(sa.Column("peak_probability", sa.Float(), nullable=True))
        batch.add_column(sa.Column("below_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("below_steps", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("n_steps", sa.Integer(), server_default="1", nullable=False))
        for name, empty in (("contributions", "{}"), ("detector_scores", "{}")):
            batch.add_column(
                sa.Column(name, sa.JSON(), server_default=sa.text(f"'{empty}'"), nullable=False)
            )
        batch.add_column(
            sa.Column("log_templates", sa.JSON(), server_default=sa.text("'[]'"), nullable=False)
        )
        batch.add_column(sa.Column("root_cause", sa.JSON(), nullable=True))
    op.create_table(
        "anomaly_feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("user", sa.String(length=200), nullable=False),
        sa.Column("label", sa.String(length=20), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["event_id"], ["anomaly_events.id"], name="fk_anomaly_feedback_event_id_anomaly_events"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_anomaly_feedback"),
        sa.UniqueConstraint("event_id", "user", name="uq_anomaly_feedback_event_id_user"),
    )


def downgrade() -> None:
    op.drop_table("anomaly_feedback")
    with op.batch_alter_table("anomaly_events") as batch:
        for name in reversed(EVENT_COLUMNS):
            batch.drop_column(name)
