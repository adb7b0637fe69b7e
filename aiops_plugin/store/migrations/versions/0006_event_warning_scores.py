"""Anomaly events keep the early-warning scores of the steps before they opened.

Existing events get none (``{}``): they cannot teach the early warning's labelled calibration.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot add a NOT NULL column without a default in place
    with op.batch_alter_table("anomaly_events") as batch:
        batch.add_column(
            sa.Column("warning_scores", sa.JSON(), server_default=sa.text("'{}'"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("anomaly_events") as batch:
        batch.drop_column("warning_scores")
