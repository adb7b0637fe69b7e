"""SQLAlchemy tables of the agent's state.

``migrations/versions`` must describe exactly these tables: a test compares the migrated schema
with this metadata. Change both together.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aiops_plugin.sharding import entity_hash

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    PostgreSQL keeps the offset, SQLite stores text without one and hands back naive values; this
    type stores UTC everywhere and always returns aware UTC datetimes, and it refuses naive input
    so that a local-time bug cannot be written silently.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with named constraints, so migrations can refer to them by name."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Entity(Base):
    """One monitored label set (a host, a pod, ...) of an entity group."""

    __tablename__ = "entities"
    __table_args__ = (UniqueConstraint("group_name", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_name: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(Text, doc="aiops_plugin.windows.entity_key(labels)")
    labels: Mapped[dict[str, Any]]
    first_seen: Mapped[datetime]
    last_seen: Mapped[datetime]


class ModelVersionRow(Base):
    """A trained detector's serialized state; written only complete, in one transaction."""

    __tablename__ = "model_versions"
    __table_args__ = (Index(None, "detector", "group_name", "config_hash", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    detector: Mapped[str] = mapped_column(String(100))
    group_name: Mapped[str] = mapped_column(String(200))
    config_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
    state: Mapped[bytes] = mapped_column(LargeBinary)
    training_metrics: Mapped[dict[str, Any]]
    n_entities: Mapped[int] = mapped_column(Integer)
    n_features: Mapped[int] = mapped_column(Integer)


class JobRun(Base):
    """One run of a scheduled job (fit, infer, ...), so a crash or a hang is visible afterwards."""

    __tablename__ = "job_runs"
    __table_args__ = (Index(None, "kind", "started_at"), Index(None, "status"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(50))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(20))
    error: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any] | None]


class AnomalyEventRow(Base):
    """A span during which an entity was anomalous; open while end_at is NULL.

    Opened when the score reaches the threshold, closed (hysteresis) after ``close_after_steps``
    consecutive scored steps below ``close_score``: ``below_since`` / ``below_steps`` are that
    run of quiet steps so far, and ``end_at`` becomes ``below_since`` when it completes. The JSON
    columns accumulate what the steps said about the anomaly (see ``Store.track_anomaly_events``).
    """

    __tablename__ = "anomaly_events"
    __table_args__ = (
        Index(None, "group_name", "detector", "end_at"),
        Index(None, "start_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    entity_id: Mapped[int] = mapped_column(ForeignKey("entities.id"), index=True)
    group_name: Mapped[str] = mapped_column(String(200))
    detector: Mapped[str] = mapped_column(String(100))
    start_at: Mapped[datetime]
    end_at: Mapped[datetime | None]
    peak_score: Mapped[float] = mapped_column(Float)
    peak_at: Mapped[datetime]
    peak_probability: Mapped[float | None] = mapped_column(Float)
    below_since: Mapped[datetime | None] = mapped_column(
        doc="first of the consecutive quiet steps while the event is open"
    )
    below_steps: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_steps: Mapped[int] = mapped_column(
        Integer, default=1, server_default="1", doc="scored steps from start_at to the quiet run"
    )
    contributions: Mapped[dict[str, float]] = mapped_column(
        JSON, default=dict, server_default=text("'{}'"), doc="metric -> sum of share x score"
    )
    detector_scores: Mapped[dict[str, float]] = mapped_column(
        JSON, default=dict, server_default=text("'{}'"), doc="detector -> score at the peak"
    )
    log_templates: Mapped[list[dict[str, Any]]] = mapped_column(
        JSON,
        default=list,
        server_default=text("'[]'"),
        doc='[{"template", "count" (summed), "score" (max)}] over the event',
    )
    root_cause: Mapped[list[dict[str, Any]] | None] = mapped_column(
        JSON, doc="ranked entities that went first, replaced as a whole"
    )
    warning_scores: Mapped[dict[str, list[float]]] = mapped_column(
        JSON,
        default=dict,
        server_default=text("'{}'"),
        doc="horizon -> early-warning scores of the steps before the event opened, oldest first",
    )


class AnomalyFeedbackRow(Base):
    """What one user said of one anomaly event (true or false positive); one row per event and
    user, so posting again updates it."""

    __tablename__ = "anomaly_feedback"
    __table_args__ = (UniqueConstraint("event_id", "user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("anomaly_events.id"))
    user: Mapped[str] = mapped_column(String(200))
    label: Mapped[str] = mapped_column(String(20), doc="one of repo.FEEDBACK_LABELS")
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class LogTemplateRow(Base):
    """A Drain3 template (cluster) and its language-model embedding, computed once per template
    text: ``embedded_template`` differs from ``template`` after Drain3 generalised it, which is
    the signal to embed it again."""

    __tablename__ = "log_templates"
    __table_args__ = (UniqueConstraint("miner", "cluster_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, doc="what records refer to")
    miner: Mapped[str] = mapped_column(
        String(64), server_default="", doc="the Drain3 tree: aiops_plugin.sharding.miner_key"
    )
    cluster_id: Mapped[int] = mapped_column(Integer, doc="the cluster id in that tree")
    template: Mapped[str] = mapped_column(Text)
    first_seen: Mapped[datetime]
    last_seen: Mapped[datetime]
    count: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, doc="float32 vector, normalised")
    embedding_model: Mapped[str | None] = mapped_column(String(500))
    embedded_template: Mapped[str | None] = mapped_column(Text)


def _entity_hash_of_row(context: Any) -> int:
    return entity_hash(context.get_current_parameters()["entity_key"])


class LogRecordRow(Base):
    """An accepted OTLP log record, written before the receiver answers, so nothing accepted is
    lost; ``template_id`` is filled in when the record has been mined."""

    __tablename__ = "log_records"
    __table_args__ = (
        Index(None, "entity_key", "observed_at"),
        Index(None, "template_id"),
        Index(None, "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime]
    observed_at: Mapped[datetime] = mapped_column(doc="the record's own time, else observed time")
    entity_group: Mapped[str] = mapped_column(String(200))
    entity_key: Mapped[str] = mapped_column(Text, doc="aiops_plugin.windows.entity_key(labels)")
    severity_number: Mapped[int] = mapped_column(Integer, doc="OTLP SeverityNumber, 0 = unset")
    severity_text: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    template_id: Mapped[int | None] = mapped_column(Integer)
    entity_hash: Mapped[int] = mapped_column(
        BigInteger,
        default=_entity_hash_of_row,
        doc="aiops_plugin.sharding.entity_hash(entity_key), computed on insert: says which "
        "shard mines the record",
    )


class LogMinerStateRow(Base):
    """Drain3's persisted state (one row per tree: per shard), so templates keep their ids
    across restarts."""

    __tablename__ = "log_miner_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    miner: Mapped[str] = mapped_column(
        String(64), unique=True, doc="aiops_plugin.sharding.miner_key of the tree"
    )
    state: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime]


class CalibrationVersionRow(Base):
    """A fitted calibrator's state for one detector (or "fused" / "probability") of a group.

    Versioned apart from the model weights: a calibrator is refitted on a new slice without
    retraining, and ``settings_hash`` (calibration settings and the model versions it was fitted
    for) keeps a calibration from being loaded for weights it was not fitted on.
    """

    __tablename__ = "calibration_versions"
    # Named by hand: the convention's name is longer than PostgreSQL's 63-character limit.
    __table_args__ = (
        Index(
            "ix_calibration_versions_group_detector_hash_created_at",
            "group_name",
            "detector",
            "settings_hash",
            "created_at",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_name: Mapped[str] = mapped_column(String(200))
    detector: Mapped[str] = mapped_column(String(100))
    settings_hash: Mapped[str] = mapped_column(String(64))
    model_versions: Mapped[dict[str, int]] = mapped_column(
        JSON, doc="detector name -> id of the model version it calibrates"
    )
    method: Mapped[str] = mapped_column(Text)
    state: Mapped[dict[str, Any]] = mapped_column(doc="the calibrator's state_dict()")
    slice_start: Mapped[float | None] = mapped_column(Float, doc="unix seconds")
    slice_end: Mapped[float | None] = mapped_column(Float, doc="unix seconds")
    n_steps: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime]
