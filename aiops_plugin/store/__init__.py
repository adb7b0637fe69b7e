"""Persistent agent state (SQLite by default, PostgreSQL in a cluster), migrated by Alembic."""

from aiops_plugin.store.repo import (
    AnomalyEvent,
    CalibrationVersion,
    ModelVersion,
    Store,
    StoreError,
)

__all__ = ["AnomalyEvent", "CalibrationVersion", "ModelVersion", "Store", "StoreError"]
