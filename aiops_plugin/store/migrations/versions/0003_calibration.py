"""Calibration versions: a calibrator's state, versioned apart from the model weights it fits.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 14:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_calibration_versions_group_detector_hash_created_at"


def upgrade() -> None:
    op.create_table(
        "calibration_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_name", sa.String(length=200), nullable=False),
        sa.Column("detector", sa.String(length=100), nullable=False),
        sa.Column("settings_hash", sa.String(length=64), nullable=False),
        sa.Column("model_versions", sa.JSON(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("slice_start", sa.Float(), nullable=True),
        sa.Column("slice_end", sa.Float(), nullable=True),
        sa.Column("n_steps", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_calibration_versions"),
    )
    op.create_index(
        INDEX,
        "calibration_versions",
        ["group_name", "detector", "settings_hash", "created_at"],
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="calibration_versions")
    op.drop_table("calibration_versions")
