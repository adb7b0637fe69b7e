"""Persistent agent state (SQLite by default, PostgreSQL in a cluster), migrated by Alembic."""

from aiops_plugin.store.repo import (
    FEEDBACK_LABELS,
    AnomalyEvent,
    CalibrationVersion,
    EventNotFound,
    FeedbackLabel,
    InvalidFeedback,
    ModelVersion,
    Store,
    StoreError,
)

__all__ = [
    "FEEDBACK_LABELS",
    "AnomalyEvent",
    "CalibrationVersion",
    "EventNotFound",
    "FeedbackLabel",
    "InvalidFeedback",
    "ModelVersion",
    "Store",
    "StoreError",
]
