"""The agent's state in SQL: entities, model and calibration versions, job runs, anomaly events
and the feedback engineers give on them.

``Store`` is the only place that opens sessions. Every public method is one transaction, so a
crash leaves either all of a call's writes or none. Database failures surface as ``StoreError``
with the URL (password masked), which the agent catches at the job boundary.
"""

from __future__ import annotations

import copy
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import (
    Connection,
    Select,
    case,
    create_engine,
    delete,
    event,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from aiops_plugin.store.models import (
    AnomalyEventRow,
    AnomalyFeedbackRow,
    CalibrationVersionRow,
    Entity,
    JobRun,
    ModelVersionRow,
)
from aiops_plugin.windows import entity_display_name, entity_key

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
FINISHED_STATUSES = ("succeeded", "failed", "interrupted")
INTERRUPTED_ERROR = "the agent stopped before the job finished"
#: values of ``list_anomaly_events(state=...)``: open while ``end_at`` is NULL
EVENT_STATES = ("open", "closed")
#: What an engineer may say of an anomaly event (``POST /api/v1/anomalies/{id}/feedback``).
FEEDBACK_LABELS = ("true_positive", "false_positive")
#: Longest feedback ``user`` (like Alertmanager's silence ``createdBy``) and ``comment``.
FEEDBACK_USER_MAX_CHARS = 200
FEEDBACK_COMMENT_MAX_CHARS = 2000
#: What ``track_anomaly_events(details=...)`` accepts per entity and step.
EVENT_DETAIL_FIELDS = (
    "probability",
    "contributions",
    "detector_scores",
    "log_templates",
    "warning_scores",
)

# Largest integer primary key a driver accepts (SQLite: 64-bit rowid).
_MAX_ROW_ID = 2**63 - 1
# Rows per INSERT .. ON CONFLICT statement: 5 parameters a row stays far below SQLite's limit.
_UPSERT_CHUNK = 500
#: Seconds an SQLite connection waits for another process's write lock.
SQLITE_BUSY_SECONDS = 30.0
# Key of the PostgreSQL advisory lock that serialises migrations of shards starting together.
_MIGRATION_LOCK_KEY = 0x41_49_4F_50
# Alembic's ``context`` and ``op`` are process-global proxies: one migration at a time per process.
_ALEMBIC_LOCK = threading.Lock()


class StoreError(Exception):
    """The store cannot be reached, migrated or written; the message names the masked URL."""


class EventNotFound(KeyError):
    """No anomaly event has this id: feedback or a root cause for it is refused."""

    def __init__(self, event_id: int) -> None:
        super().__init__(event_id)
        self.event_id = event_id

    def __str__(self) -> str:
        return f"no anomaly event {self.event_id}"


class InvalidFeedback(ValueError):
    """A feedback field the store refuses; ``field`` names it, the message says why."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        super().__init__(f"{name}: {reason}, got {value!r}")
        self.field = name
        self.value = value
        self.reason = reason


@dataclass(frozen=True)
class ModelVersion:
    """A saved, complete training result of one detector for one entity group."""

    id: int
    detector: str
    group_name: str
    config_hash: str
    created_at: datetime
    state: bytes
    training_metrics: dict
    n_entities: int
    n_features: int


@dataclass(frozen=True)
class CalibrationVersion:
    """A saved calibrator state of one detector (or "fused" / "probability") of a group.

    ``model_versions`` maps each detector name to the id of the model version the calibrator was
    fitted for; ``slice_start`` / ``slice_end`` bound the calibration slice in unix seconds.
    """

    id: int
    group_name: str
    detector: str
    settings_hash: str
    model_versions: dict[str, int]
    method: str
    state: dict[str, Any]
    slice_start: float | None
    slice_end: float | None
    n_steps: int
    created_at: datetime


@dataclass(frozen=True)
class AnomalyEvent:
    """A span during which an entity was anomalous; open while ``end_at`` is None.

    ``n_steps`` counts the scored steps from ``start_at`` up to the run of quiet steps that
    closed it (or is closing it). ``top_metrics`` (``[{"metric", "share"}]``: each metric's part
    of the score-weighted contributions summed over the event, shares of all metrics, so the top
    ones sum to at most 1) and ``log_templates`` (``[{"template", "count", "score"}]``, highest
    score first, then most frequent) are cut to the store's ``event_top_metrics`` /
    ``event_top_log_templates``. ``detector_scores`` are the detectors' scores at the peak step;
    ``root_cause`` is the ranking last set by ``Store.set_event_root_cause``. ``feedback``
    (``[{"user", "label", "comment", "created_at", "updated_at"}]``, oldest first) is filled by
    ``Store.get_anomaly_event`` only and is empty in lists. ``warning_scores`` (horizon ->
    the early-warning scores of the steps before the event opened, oldest first, finite ones
    only) is what the early warning said before it: with feedback, the evidence that came
    before confirmed incidents and false alarms (:mod:`aiops_plugin.feedback`).
    """

    id: int
    group_name: str
    entity_key: str
    entity_labels: dict[str, str]
    detector: str
    start_at: datetime
    end_at: datetime | None
    peak_score: float
    peak_at: datetime
    peak_probability: float | None = None
    n_steps: int = 1
    top_metrics: list[dict[str, Any]] = field(default_factory=list)
    detector_scores: dict[str, float] = field(default_factory=dict)
    log_templates: list[dict[str, Any]] = field(default_factory=list)
    root_cause: list[dict[str, Any]] = field(default_factory=list)
    feedback: list[dict[str, Any]] = field(default_factory=list)
    warning_scores: dict[str, list[float]] = field(default_factory=dict)

    @property
    def duration_seconds(self) -> float | None:
        """Seconds from start to end; None while open, so that a stored event does not change
        with the clock (the HTTP API shows an open event's duration up to the request)."""
        if self.end_at is None:
            return None
        return (self.end_at - self.start_at).total_seconds()


@dataclass(frozen=True)
class FeedbackLabel:
    """One user's label on one anomaly event, as stored.

    ``replaced_label`` is set by ``Store.save_feedback`` only: the label this write replaced
    when it changed one, None when the row was created or the same label was posted again.
    """

    id: int
    event_id: int
    user: str
    label: str
    comment: str | None
    created_at: datetime
    updated_at: datetime
    replaced_label: str | None = None


@dataclass(frozen=True)
class _StepDetails:
    """What one scored step said about an entity's anomaly, finite values only."""

    probability: float | None
    contributions: dict[str, float]
    detector_scores: dict[str, float]
    log_templates: dict[str, tuple[int, float]]
    warning_scores: dict[str, list[float]]


class Store:
    """SQLite (default, one file) or PostgreSQL (a cluster of shards) through one interface.

    ``event_top_metrics`` / ``event_top_log_templates`` (``events.top_metrics`` /
    ``events.top_log_templates``) cut every anomaly event read from the store, so the agent
    and the HTTP API show the same events.
    """

    def __init__(
        self, url: str, *, event_top_metrics: int = 5, event_top_log_templates: int = 5
    ) -> None:
        """Create the engine; does not touch the schema (``open`` does)."""
        for name, value in (
            ("event_top_metrics", event_top_metrics),
            ("event_top_log_templates", event_top_log_templates),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.event_top_metrics = event_top_metrics
        self.event_top_log_templates = event_top_log_templates
        try:
            self.url: URL = make_url(url)
        except ArgumentError:
            raise StoreError(
                "the store URL is not a SQLAlchemy URL "
                "(expected e.g. sqlite:////var/lib/aiops/aiops.db or postgresql://user@host/db)"
            ) from None
        self.display_url = self.url.render_as_string(hide_password=True)
        backend = self.url.get_backend_name()
        # Refuse NaN/Infinity in JSON columns on every backend: PostgreSQL rejects them anyway.
        options: dict[str, Any] = {"json_serializer": partial(json.dumps, allow_nan=False)}
        in_memory = _sqlite_in_memory(self.url)
        if backend == "sqlite":
            options["connect_args"] = {
                "check_same_thread": False,
                "timeout": SQLITE_BUSY_SECONDS,
            }
            if in_memory:
                options["poolclass"] = StaticPool  # one shared connection, else one DB each
            elif self.url.database and not self.url.query.get("uri"):
                self._create_folder(Path(self.url.database).expanduser().parent)
        elif backend == "postgresql":
            options["pool_pre_ping"] = True
            if self.url.get_driver_name() == "psycopg2" and "connect_timeout" not in self.url.query:
                options["connect_args"] = {"connect_timeout": 10}
        else:
            raise StoreError(f"unsupported store {self.display_url}: use sqlite or postgresql")
        try:
            self.engine = create_engine(self.url, **options)
        except (SQLAlchemyError, ImportError) as exc:
            raise StoreError(f"cannot create an engine for {self.display_url}: {exc}") from exc
        if backend == "sqlite":
            event.listen(self.engine, "connect", partial(_configure_sqlite, wal=not in_memory))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _create_folder(self, folder: Path) -> None:
        """SQLite creates the database file but not its folder (e.g. a fresh data_dir)."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the folder {folder} of the store {self.display_url}: {exc}"
            ) from exc

    @classmethod
    def open(
        cls, url: str, *, event_top_metrics: int = 5, event_top_log_templates: int = 5
    ) -> Store:
        """A store whose schema is migrated to the newest version: what the agent starts with."""
        store = cls(
            url,
            event_top_metrics=event_top_metrics,
            event_top_log_templates=event_top_log_templates,
        )
        try:
            store.upgrade()
        except BaseException:
            store.close()
            raise
        return store

    def upgrade(self) -> None:
        """Run ``alembic upgrade head``; idempotent, and safe when several shards start at once."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.set_main_option("path_separator", "os")
        url = self.url.render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        try:
            with _ALEMBIC_LOCK, self.engine.begin() as connection:
                _lock_for_migration(connection)
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        except (SQLAlchemyError, CommandError, OSError) as exc:
            raise StoreError(
                f"cannot migrate the store {self.display_url}: {self._reason(exc)}"
            ) from exc

    def ping(self) -> bool:
        """True when the database answers ``SELECT 1`` (``aiops_source_up{source="store"}``)."""
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def upsert_entities(
        self, group: str, labels: list[dict[str, str]], seen_at: datetime
    ) -> dict[str, int]:
        """Record label sets seen at ``seen_at``; returns entity key -> id, stable across calls.

        ``last_seen`` only moves forward, so a late or replayed call cannot age an entity.
        """
        seen_at = _as_utc(seen_at, "seen_at")
        with self._transaction(f"upserting entities of group {group!r}") as session:
            return self._upsert_entities(session, group, labels, seen_at)

    def save_model_version(
        self,
        *,
        detector: str,
        group: str,
        config_hash: str,
        state: bytes,
        training_metrics: dict,
        n_entities: int,
        n_features: int,
    ) -> ModelVersion:
        """Write a trained model in one transaction: either the complete row or nothing.

        ``training_metrics`` must be plain JSON (no NaN / Infinity).
        """
        with self._transaction(f"saving a {detector!r} model of group {group!r}") as session:
            row = ModelVersionRow(
                detector=detector,
                group_name=group,
                config_hash=config_hash,
                created_at=_now(),
                state=bytes(state),
                training_metrics=training_metrics,
                n_entities=int(n_entities),
                n_features=int(n_features),
            )
            session.add(row)
            session.flush()
            return _model_version(row)

    def latest_model_version(
        self, detector: str, group: str, config_hash: str | None = None
    ) -> ModelVersion | None:
        """Newest saved model; with ``config_hash``, only one trained under that configuration,
        so a changed configuration never loads incompatible weights."""
        query = select(ModelVersionRow).where(
            ModelVersionRow.detector == detector, ModelVersionRow.group_name == group
        )
        if config_hash is not None:
            query = query.where(ModelVersionRow.config_hash == config_hash)
        query = query.order_by(ModelVersionRow.created_at.desc(), ModelVersionRow.id.desc())
        with self._transaction(f"reading the latest {detector!r} model") as session:
            row = session.scalars(query.limit(1)).first()
            return None if row is None else _model_version(row)

    def prune_model_versions(self, detector: str, group: str, keep: int = 5) -> int:
        """Delete all but the ``keep`` newest versions (any config hash); returns rows deleted."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        mine = (ModelVersionRow.detector == detector, ModelVersionRow.group_name == group)
        with self._transaction(f"pruning {detector!r} models of group {group!r}") as session:
            kept = session.scalars(
                select(ModelVersionRow.id)
                .where(*mine)
                .order_by(ModelVersionRow.created_at.desc(), ModelVersionRow.id.desc())
                .limit(keep)
            ).all()
            result = session.execute(
                delete(ModelVersionRow).where(*mine, ModelVersionRow.id.not_in(kept))
            )
            return result.rowcount

    def save_calibration_version(
        self,
        *,
        group: str,
        detector: str,
        settings_hash: str,
        model_versions: dict[str, int],
        method: str,
        state: dict,
        slice_start: float | None,
        slice_end: float | None,
        n_steps: int,
    ) -> CalibrationVersion:
        """Write a fitted calibrator's state in one transaction: either the complete row or nothing.

        ``state`` must be plain JSON: dicts with string keys, lists, strings, ints, finite floats,
        booleans and None; floats come back bit for bit. NaN and Infinity are rejected, not
        converted (JSON cannot hold them portably and a calibrator should never produce them):
        a ValueError naming the group, the detector and where in ``state`` the value sits is
        raised before the database is touched. The slice bounds must be finite too.
        """
        where = f"calibration of detector {detector!r} of group {group!r}"
        _check_plain_json(state, f"{where}: state")
        if not all(isinstance(k, str) and type(v) is int for k, v in model_versions.items()):
            raise ValueError(f"{where}: model_versions must map detector names to integer ids")
        for name, bound in (("slice_start", slice_start), ("slice_end", slice_end)):
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"{where}: {name} is {bound}, expected finite unix seconds")
        with self._transaction(f"saving the {where}") as session:
            row = CalibrationVersionRow(
                group_name=group,
                detector=detector,
                settings_hash=settings_hash,
                model_versions=dict(model_versions),
                method=method,
                state=state,
                slice_start=None if slice_start is None else float(slice_start),
                slice_end=None if slice_end is None else float(slice_end),
                n_steps=int(n_steps),
                created_at=_now(),
            )
            session.add(row)
            session.flush()
            return _calibration_version(row)

    def latest_calibration_version(
        self, group: str, detector: str, settings_hash: str
    ) -> CalibrationVersion | None:
        """Newest saved calibration fitted under ``settings_hash``; None when there is none, so a
        changed setting or a retrained model never loads a calibration fitted for another."""
        query = (
            select(CalibrationVersionRow)
            .where(
                CalibrationVersionRow.group_name == group,
                CalibrationVersionRow.detector == detector,
                CalibrationVersionRow.settings_hash == settings_hash,
            )
            .order_by(CalibrationVersionRow.created_at.desc(), CalibrationVersionRow.id.desc())
        )
        action = f"reading the latest calibration of detector {detector!r} of group {group!r}"
        with self._transaction(action) as session:
            row = session.scalars(query.limit(1)).first()
            return None if row is None else _calibration_version(row)

    def prune_calibration_versions(self, group: str, detector: str, keep: int = 5) -> int:
        """Delete all but the ``keep`` newest calibrations (any settings hash); returns rows
        deleted."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        mine = (
            CalibrationVersionRow.group_name == group,
            CalibrationVersionRow.detector == detector,
        )
        action = f"pruning calibrations of detector {detector!r} of group {group!r}"
        with self._transaction(action) as session:
            kept = session.scalars(
                select(CalibrationVersionRow.id)
                .where(*mine)
                .order_by(CalibrationVersionRow.created_at.desc(), CalibrationVersionRow.id.desc())
                .limit(keep)
            ).all()
            result = session.execute(
                delete(CalibrationVersionRow).where(*mine, CalibrationVersionRow.id.not_in(kept))
            )
            return result.rowcount

    def start_job(self, kind: str, detail: dict | None = None) -> int:
        """Record a job as running; returns its id for ``finish_job``."""
        with self._transaction(f"starting a {kind!r} job") as session:
            row = JobRun(kind=kind, started_at=_now(), status="running", detail=detail)
            session.add(row)
            session.flush()
            return row.id

    def finish_job(
        self, job_id: int, status: str, error: str | None = None, detail: dict | None = None
    ) -> None:
        """Close a job with a final status; ``detail`` is merged into what ``start_job`` stored."""
        if status not in FINISHED_STATUSES:
            raise ValueError(f"a job finishes as one of {FINISHED_STATUSES}, not {status!r}")
        with self._transaction(f"finishing job {job_id}") as session:
            row = session.get(JobRun, job_id)
            if row is None:
                raise LookupError(f"no job run with id {job_id} in {self.display_url}")
            row.finished_at = _now()
            row.status = status
            row.error = error
            if detail is not None:
                row.detail = {**(row.detail or {}), **detail}

    def mark_running_jobs_interrupted(self) -> int:
        """At start-up: jobs a killed process left 'running' become 'interrupted'; returns how
        many."""
        with self._transaction("marking running jobs interrupted") as session:
            result = session.execute(
                update(JobRun)
                .where(JobRun.status == "running")
                .values(status="interrupted", finished_at=_now(), error=INTERRUPTED_ERROR)
            )
            return result.rowcount

    def recent_jobs(self, kind: str | None = None, limit: int = 20) -> list[dict]:
        """Newest job runs first, as plain dicts for the API and the CLI."""
        query = select(JobRun)
        if kind is not None:
            query = query.where(JobRun.kind == kind)
        query = query.order_by(JobRun.started_at.desc(), JobRun.id.desc()).limit(limit)
        with self._transaction("reading recent jobs") as session:
            return [
                {
                    "id": row.id,
                    "kind": row.kind,
                    "started_at": row.started_at,
                    "finished_at": row.finished_at,
                    "status": row.status,
                    "error": row.error,
                    "detail": row.detail,
                }
                for row in session.scalars(query)
            ]

    def track_anomaly_events(
        self,
        *,
        group: str,
        detector: str,
        timestamp: datetime,
        scores: dict[str, float],
        labels: dict[str, dict[str, str]],
        threshold: float = 1.0,
        close_score: float | None = None,
        close_after_steps: int = 1,
        details: dict[str, dict[str, Any]] | None = None,
    ) -> list[AnomalyEvent]:
        """Turn one step of scores into events, in one transaction; returns events opened or
        closed now.

        Per entity key in ``scores``, with hysteresis so that a score flapping around the
        threshold stays one event: at or above ``threshold`` opens an event. While it is open, a
        score below ``close_score`` (default: ``threshold``) starts or extends a run of quiet
        steps and one at or above it ends the run; ``close_after_steps`` quiet steps in a row
        close the event with ``end_at`` = the first of them (when it went quiet, not when that
        became sure). The defaults close at the first step below the threshold. Entities absent
        from ``scores``, or with a NaN score (no data says nothing), keep their events as they
        are. Only entities with an open event or a score that opens one are touched: those that
        open one are upserted from ``labels`` (a key neither there nor already stored is a
        ValueError); the quiet rest of a large group costs no row.

        ``details`` (entity key -> any of ``EVENT_DETAIL_FIELDS``) is what this step says about
        each anomaly: ``"probability"``, ``"contributions"`` (metric -> share of the score),
        ``"detector_scores"`` (detector -> score), ``"log_templates"`` (``[{"template",
        "count", "score"}]``) and ``"warning_scores"`` (horizon -> the early-warning scores of
        the steps before this one). Steps at or above ``close_score`` add theirs to the open
        event: the highest probability is kept, detector scores are those of the peak step,
        contributions are summed weighted by the step's score (a step whose score is infinite
        adds none), log templates are merged by text (counts summed, the highest score kept);
        the warning scores are those of the step that opened it.
        Quiet steps add nothing. NaN and infinite values are dropped; an unknown field or a
        value that is not a number is a ValueError.
        """
        if close_after_steps < 1:
            raise ValueError(f"close_after_steps must be at least 1, got {close_after_steps}")
        close_at = threshold if close_score is None else close_score
        if close_at > threshold:
            raise ValueError(f"close_score ({close_at}) must not exceed threshold ({threshold})")
        timestamp = _as_utc(timestamp, "timestamp")
        scored = {key: float(score) for key, score in scores.items() if not math.isnan(score)}
        steps = {
            key: _step_details(key, raw) for key, raw in (details or {}).items() if key in scored
        }
        action = f"tracking {detector!r} anomaly events of group {group!r}"
        with self._transaction(action) as session:
            open_rows = session.execute(
                select(AnomalyEventRow, Entity.key)
                .join(Entity)
                .where(
                    AnomalyEventRow.group_name == group,
                    AnomalyEventRow.detector == detector,
                    AnomalyEventRow.end_at.is_(None),
                )
                .order_by(AnomalyEventRow.start_at.desc())
            ).all()
            open_by_key: dict[str, AnomalyEventRow] = {}
            for row, key in open_rows:
                open_by_key[key] = row
            # only an entity with an open event or a score that opens one has anything to do:
            # at 10k entities a cycle touches the few anomalous ones, not every row
            relevant = {
                key: score
                for key, score in scored.items()
                if key in open_by_key or score >= threshold
            }
            opening = [key for key in relevant if key not in open_by_key]
            ids = self._entity_ids(session, group, opening, labels, timestamp)
            changed: list[AnomalyEventRow] = []
            for key, score in relevant.items():
                row = open_by_key.get(key)
                if row is None:
                    if score >= threshold:
                        row = _opened_event(ids[key], group, detector, timestamp, score)
                        _add_active_step(row, timestamp, score, steps.get(key), opening=True)
                        session.add(row)
                        changed.append(row)
                elif score >= close_at:
                    row.n_steps += row.below_steps + 1
                    row.below_steps = 0
                    row.below_since = None
                    _add_active_step(row, timestamp, score, steps.get(key), opening=False)
                else:
                    row.below_steps += 1
                    if row.below_since is None:
                        row.below_since = timestamp
                    if row.below_steps >= close_after_steps:
                        row.end_at = row.below_since
                        changed.append(row)
            session.flush()
            return self._events_by_id(session, [row.id for row in changed])

    def set_event_root_cause(self, event_id: int, ranking: list[dict]) -> None:
        """Replace the event's root-cause ranking as a whole (the entities that went first).

        ``ranking`` must be plain JSON like a calibration state (no NaN, no numpy scalars): a
        ValueError naming the event and the place is raised before the database is touched.
        An unknown event is ``EventNotFound``.
        """
        ranking = [dict(item) for item in ranking]
        _check_plain_json(ranking, f"root cause of anomaly event {event_id}")
        if not 0 < event_id <= _MAX_ROW_ID:
            raise EventNotFound(event_id)
        with self._transaction(f"setting the root cause of anomaly event {event_id}") as session:
            result = session.execute(
                update(AnomalyEventRow)
                .where(AnomalyEventRow.id == event_id)
                .values(root_cause=ranking)
            )
            if result.rowcount == 0:
                raise EventNotFound(event_id)

    def save_feedback(
        self, event_id: int, user: str, label: str, comment: str | None = None
    ) -> tuple[FeedbackLabel, bool]:
        """Record ``user``'s label on an event; returns the stored label and True when created.

        Idempotent per (event, user): posting again updates that user's row, whose label and
        comment become the posted ones; the same label again changes only ``updated_at``
        (``replaced_label`` None), a different one replaces it (``replaced_label`` the old one).
        A bad field is ``InvalidFeedback`` (a ValueError naming it), an unknown event
        ``EventNotFound``; ``user`` is stripped of surrounding blanks, an empty comment is None.
        """
        user, label, comment = _checked_feedback(user, label, comment)
        if not 0 < event_id <= _MAX_ROW_ID:
            raise EventNotFound(event_id)
        now = _now()
        with self._transaction(f"saving feedback on anomaly event {event_id}") as session:
            # FOR UPDATE on the event (PostgreSQL) serialises two posts of one user, which
            # would otherwise both find no row and both insert.
            found = session.scalar(
                select(AnomalyEventRow.id).where(AnomalyEventRow.id == event_id).with_for_update()
            )
            if found is None:
                raise EventNotFound(event_id)
            row = session.scalars(
                select(AnomalyFeedbackRow).where(
                    AnomalyFeedbackRow.event_id == event_id, AnomalyFeedbackRow.user == user
                )
            ).first()
            if row is None:
                row = AnomalyFeedbackRow(
                    event_id=event_id,
                    user=user,
                    label=label,
                    comment=comment,
                    created_at=now,
                    updated_at=now,
                )
                session.add(row)
                session.flush()
                return _feedback_label(row, None), True
            replaced = row.label if row.label != label else None
            row.label, row.comment, row.updated_at = label, comment, now
            session.flush()
            return _feedback_label(row, replaced), False

    def labelled_events(
        self, group: str, since: datetime | None = None, until: datetime | None = None
    ) -> list[tuple[AnomalyEvent, str]]:
        """The group's events that have feedback and overlap [since, until], oldest first, each
        with its label, for the next fit: where users disagree, the label updated last wins
        (the newest judgement, e.g. after a postmortem). One query."""
        query = (
            select(AnomalyEventRow, Entity, AnomalyFeedbackRow.label)
            .join(Entity, AnomalyEventRow.entity_id == Entity.id)
            .join(AnomalyFeedbackRow, AnomalyFeedbackRow.event_id == AnomalyEventRow.id)
            .where(AnomalyEventRow.group_name == group)
        )
        query = _overlapping(query, since, until).order_by(
            AnomalyEventRow.start_at,
            AnomalyEventRow.id,
            AnomalyFeedbackRow.updated_at,
            AnomalyFeedbackRow.id,
        )
        with self._transaction(f"reading labelled anomaly events of group {group!r}") as session:
            # Rows come per feedback, latest last: the last row of an event holds its label.
            latest = {row.id: (row, entity, label) for row, entity, label in session.execute(query)}
            return [(self._event(row, entity), label) for row, entity, label in latest.values()]

    def open_anomaly_events(self, group: str | None = None) -> list[AnomalyEvent]:
        """Events still open (the entity is anomalous now), oldest first."""
        query = select(AnomalyEventRow, Entity).join(Entity).where(AnomalyEventRow.end_at.is_(None))
        if group is not None:
            query = query.where(AnomalyEventRow.group_name == group)
        query = query.order_by(AnomalyEventRow.start_at, AnomalyEventRow.id)
        with self._transaction("reading open anomaly events") as session:
            return [self._event(row, entity) for row, entity in session.execute(query)]

    def anomaly_events(
        self, *, since: datetime | None = None, limit: int = 100
    ) -> list[AnomalyEvent]:
        """Newest first; with ``since``, events still open or that ended at or after it."""
        query = select(AnomalyEventRow, Entity).join(Entity)
        if since is not None:
            since = _as_utc(since, "since")
            query = query.where(
                or_(AnomalyEventRow.end_at.is_(None), AnomalyEventRow.end_at >= since)
            )
        query = query.order_by(AnomalyEventRow.start_at.desc(), AnomalyEventRow.id.desc())
        with self._transaction("reading anomaly events") as session:
            return [self._event(row, entity) for row, entity in session.execute(query.limit(limit))]

    def list_anomaly_events(
        self,
        *,
        group: str | None = None,
        entity: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        state: str | None = None,
        limit: int = 100,
        after: tuple[datetime, int] | None = None,
    ) -> list[AnomalyEvent]:
        """Events newest first (``start_at`` desc, then ``id`` desc), filtered, one page.

        ``entity`` is a display name (``aiops_plugin.windows.entity_display_name``: the label
        values joined by '/'); ``since`` / ``until`` keep the events that overlap that span (an
        open event lasts until now and beyond); ``state`` is ``"open"`` or ``"closed"``;
        ``after`` is the ``(start_at, id)`` of the last event of the previous page (keyset
        pagination: a page is stable while events are written). The entities are joined in the
        same query.
        """
        if state not in (None, *EVENT_STATES):
            raise ValueError(f"state must be one of {', '.join(EVENT_STATES)}, got {state!r}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        query = select(AnomalyEventRow, Entity).join(Entity)
        if group is not None:
            query = query.where(AnomalyEventRow.group_name == group)
        query = _overlapping(query, since, until)
        if state == "open":
            query = query.where(AnomalyEventRow.end_at.is_(None))
        elif state == "closed":
            query = query.where(AnomalyEventRow.end_at.is_not(None))
        if after is not None:
            after_start, after_id = _as_utc(after[0], "after"), after[1]
            query = query.where(
                or_(
                    AnomalyEventRow.start_at < after_start,
                    (AnomalyEventRow.start_at == after_start) & (AnomalyEventRow.id < after_id),
                )
            )
        query = query.order_by(AnomalyEventRow.start_at.desc(), AnomalyEventRow.id.desc())
        with self._transaction("reading anomaly events") as session:
            if entity is not None:
                # The display name is computed from the labels, so it cannot be matched in SQL:
                # find the matching entities first (one query), then filter the events by id.
                entities = select(Entity.id, Entity.labels)
                if group is not None:
                    entities = entities.where(Entity.group_name == group)
                entity_ids = [
                    row.id
                    for row in session.execute(entities)
                    if entity_display_name(row.labels) == entity
                ]
                if not entity_ids:
                    return []
                query = query.where(AnomalyEventRow.entity_id.in_(entity_ids))
            return [
                self._event(row, entity_row)
                for row, entity_row in session.execute(query.limit(limit))
            ]

    def get_anomaly_event(self, event_id: int) -> AnomalyEvent | None:
        """One event with its entity and its feedback (oldest first), or None when there is no
        such event."""
        if not 0 < event_id <= _MAX_ROW_ID:
            return None  # no row has it, and drivers refuse integers beyond 64 bits
        with self._transaction(f"reading anomaly event {event_id}") as session:
            events = self._events_by_id(session, [event_id])
            if not events:
                return None
            feedback = session.scalars(
                select(AnomalyFeedbackRow)
                .where(AnomalyFeedbackRow.event_id == event_id)
                .order_by(AnomalyFeedbackRow.created_at, AnomalyFeedbackRow.id)
            )
            return replace(events[0], feedback=[_feedback_json(row) for row in feedback])

    @contextmanager
    def _transaction(self, action: str) -> Iterator[Session]:
        """One session, committed on success, rolled back on any error; DB errors -> StoreError."""
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise StoreError(f"{action} failed on {self.display_url}: {self._reason(exc)}") from exc

    def _reason(self, exc: BaseException) -> str:
        """The driver's first message line, never the password even if a driver echoes it."""
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        message = reason[0] if reason else type(exc).__name__
        if self.url.password:
            message = message.replace(str(self.url.password), "***")
        return message

    def _upsert_entities(
        self, session: Session, group: str, labels: Iterable[dict[str, str]], seen_at: datetime
    ) -> dict[str, int]:
        """INSERT .. ON CONFLICT (group_name, key) DO UPDATE last_seen, RETURNING key, id."""
        by_key = {entity_key(entity): dict(entity) for entity in labels}
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        table = Entity.__table__
        items = list(by_key.items())
        ids: dict[str, int] = {}
        for start in range(0, len(items), _UPSERT_CHUNK):
            statement = insert(table).values(
                [
                    {
                        "group_name": group,
                        "key": key,
                        "labels": entity,
                        "first_seen": seen_at,
                        "last_seen": seen_at,
                    }
                    for key, entity in items[start : start + _UPSERT_CHUNK]
                ]
            )
            later = statement.excluded.last_seen > table.c.last_seen
            statement = statement.on_conflict_do_update(
                index_elements=[table.c.group_name, table.c.key],
                set_={
                    "last_seen": case(
                        (later, statement.excluded.last_seen), else_=table.c.last_seen
                    )
                },
            ).returning(table.c.key, table.c.id)
            ids.update({row.key: row.id for row in session.execute(statement)})
        return ids

    def _entity_ids(
        self,
        session: Session,
        group: str,
        keys: Iterable[str],
        labels: dict[str, dict[str, str]],
        seen_at: datetime,
    ) -> dict[str, int]:
        """Ids of ``keys``: upserted from ``labels`` where given, else looked up."""
        keys = list(keys)
        ids = self._upsert_entities(
            session, group, [labels[k] for k in keys if k in labels], seen_at
        )
        missing = [key for key in keys if key not in ids]
        if missing:
            found = session.execute(
                select(Entity.key, Entity.id).where(
                    Entity.group_name == group, Entity.key.in_(missing)
                )
            )
            ids.update({row.key: row.id for row in found})
        unknown = [key for key in keys if key not in ids]
        if unknown:
            raise ValueError(f"no labels given for unknown entities of group {group!r}: {unknown}")
        return ids

    def _events_by_id(self, session: Session, event_ids: list[int]) -> list[AnomalyEvent]:
        if not event_ids:
            return []
        rows = session.execute(
            select(AnomalyEventRow, Entity)
            .join(Entity)
            .where(AnomalyEventRow.id.in_(event_ids))
            .order_by(AnomalyEventRow.id)
        )
        return [self._event(row, entity) for row, entity in rows]

    def _event(self, row: AnomalyEventRow, entity: Entity) -> AnomalyEvent:
        """The event as callers see it: details ranked and cut to the store's limits."""
        return AnomalyEvent(
            id=row.id,
            group_name=row.group_name,
            entity_key=entity.key,
            entity_labels=dict(entity.labels),
            detector=row.detector,
            start_at=row.start_at,
            end_at=row.end_at,
            peak_score=row.peak_score,
            peak_at=row.peak_at,
            peak_probability=row.peak_probability,
            n_steps=row.n_steps,
            top_metrics=_top_metrics(row.contributions, self.event_top_metrics),
            detector_scores=dict(row.detector_scores),
            log_templates=copy.deepcopy(row.log_templates[: self.event_top_log_templates]),
            root_cause=copy.deepcopy(row.root_cause or []),
            warning_scores=copy.deepcopy(row.warning_scores or {}),
        )


def _lock_for_migration(connection: Connection) -> None:
    """Serialise migrations of processes starting together: the second waits, then finds the
    schema at head. PostgreSQL: a transaction-scoped advisory lock; SQLite: the write lock."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_in_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _configure_sqlite(dbapi_connection: Any, _record: Any, *, wal: bool) -> None:
    """Enforce foreign keys; WAL lets the API read while a job writes.

    Switching a new database file to WAL needs its exclusive lock, and SQLite answers "database
    is locked" at once, without waiting out the busy timeout, while another process (a shard
    starting at the same moment) holds it: the switch is retried for as long as that timeout."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        if wal:
            deadline = time.monotonic() + SQLITE_BUSY_SECONDS
            while True:
                try:
                    cursor.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
    finally:
        cursor.close()


def _now() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime, name: str) -> datetime:
    """Refuse naive datetimes: a local time stored as UTC would shift every event silently."""
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _model_version(row: ModelVersionRow) -> ModelVersion:
    return ModelVersion(
        id=row.id,
        detector=row.detector,
        group_name=row.group_name,
        config_hash=row.config_hash,
        created_at=row.created_at,
        state=bytes(row.state),
        training_metrics=dict(row.training_metrics),
        n_entities=row.n_entities,
        n_features=row.n_features,
    )


def _check_plain_json(value: Any, path: str) -> None:
    """Raise ValueError at the first value JSON cannot hold exactly on every backend: NaN,
    Infinity, a non-string key or a non-JSON type (numpy scalars included: convert them first)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path} is {value}: JSON cannot hold NaN or Infinity")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path} has the key {key!r}: JSON keys must be strings")
            _check_plain_json(item, f"{path}[{key!r}]")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_plain_json(item, f"{path}[{index}]")
    elif not isinstance(value, str | int | None):
        raise ValueError(f"{path} is a {type(value).__name__}, not a JSON value")


def _calibration_version(row: CalibrationVersionRow) -> CalibrationVersion:
    return CalibrationVersion(
        id=row.id,
        group_name=row.group_name,
        detector=row.detector,
        settings_hash=row.settings_hash,
        model_versions=dict(row.model_versions),
        method=row.method,
        state=copy.deepcopy(row.state),
        slice_start=row.slice_start,
        slice_end=row.slice_end,
        n_steps=row.n_steps,
        created_at=row.created_at,
    )


def _overlapping(query: Select, since: datetime | None, until: datetime | None) -> Select:
    """Keep the events that overlap [since, until]; an open event lasts until now and beyond."""
    if since is not None:
        since = _as_utc(since, "since")
        query = query.where(or_(AnomalyEventRow.end_at.is_(None), AnomalyEventRow.end_at >= since))
    if until is not None:
        until = _as_utc(until, "until")
        query = query.where(AnomalyEventRow.start_at <= until)
    return query


def _opened_event(
    entity_id: int, group: str, detector: str, timestamp: datetime, score: float
) -> AnomalyEventRow:
    return AnomalyEventRow(
        entity_id=entity_id,
        group_name=group,
        detector=detector,
        start_at=timestamp,
        peak_score=score,
        peak_at=timestamp,
        peak_probability=None,
        below_steps=0,
        n_steps=1,
        contributions={},
        detector_scores={},
        log_templates=[],
        warning_scores={},
    )


def _add_active_step(
    row: AnomalyEventRow,
    timestamp: datetime,
    score: float,
    step: _StepDetails | None,
    *,
    opening: bool,
) -> None:
    """A step at or above close_score: raise the peak, add the step's details to the event.

    The JSON columns are assigned new objects: SQLAlchemy does not see changes made in place.
    """
    if opening or score > row.peak_score:
        row.peak_score = score
        row.peak_at = timestamp
        row.detector_scores = dict(step.detector_scores) if step is not None else {}
    if step is None:
        return
    if opening and step.warning_scores:
        row.warning_scores = {horizon: list(v) for horizon, v in step.warning_scores.items()}
    if step.probability is not None and (
        row.peak_probability is None or step.probability > row.peak_probability
    ):
        row.peak_probability = step.probability
    if step.contributions and math.isfinite(score):
        summed = dict(row.contributions)
        for metric, share in step.contributions.items():
            summed[metric] = summed.get(metric, 0.0) + share * score
        row.contributions = summed
    if step.log_templates:
        stored = {item["template"]: (item["count"], item["score"]) for item in row.log_templates}
        row.log_templates = _ranked_templates(_merge_templates(stored, step.log_templates))


def _merge_templates(
    into: dict[str, tuple[int, float]], more: dict[str, tuple[int, float]]
) -> dict[str, tuple[int, float]]:
    """Template text -> (count, score): counts summed, the highest score kept."""
    merged = dict(into)
    for template, (count, score) in more.items():
        before_count, before_score = merged.get(template, (0, score))
        merged[template] = (before_count + count, max(before_score, score))
    return merged


def _ranked_templates(templates: dict[str, tuple[int, float]]) -> list[dict[str, Any]]:
    """Highest score first, then most frequent, then by text (a stable order)."""
    ranked = sorted(templates.items(), key=lambda item: (-item[1][1], -item[1][0], item[0]))
    return [
        {"template": template, "count": count, "score": score}
        for template, (count, score) in ranked
    ]


def _top_metrics(contributions: dict[str, float], top: int) -> list[dict[str, Any]]:
    """The ``top`` metrics by summed contribution, as shares of all metrics' (summing to 1 when
    every metric is kept)."""
    positive = {metric: value for metric, value in contributions.items() if value > 0}
    total = math.fsum(positive.values())
    if not total > 0:
        return []
    ranked = sorted(positive.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [{"metric": metric, "share": value / total} for metric, value in ranked]


def _step_details(key: str, raw: dict[str, Any]) -> _StepDetails:
    """One entity's ``details`` of a step, checked, with NaN and infinite values dropped."""
    where = f"details[{key!r}]"
    unknown = sorted(set(raw) - set(EVENT_DETAIL_FIELDS))
    if unknown:
        raise ValueError(
            f"{where}: unknown fields {unknown} (known: {', '.join(EVENT_DETAIL_FIELDS)})"
        )
    probability = raw.get("probability")
    if probability is not None:
        probability = _number(probability, f"{where}['probability']")
        if not math.isfinite(probability):
            probability = None
    templates: dict[str, tuple[int, float]] = {}
    for index, item in enumerate(raw.get("log_templates") or []):
        place = f"{where}['log_templates'][{index}]"
        missing = [name for name in ("template", "count", "score") if name not in item]
        if missing:
            raise ValueError(f"{place} lacks {', '.join(missing)}")
        score = _number(item["score"], f"{place}['score']")
        count = _number(item["count"], f"{place}['count']")
        if math.isfinite(score) and math.isfinite(count) and count >= 0:
            templates = _merge_templates(templates, {str(item["template"]): (int(count), score)})
    return _StepDetails(
        probability=probability,
        contributions=_finite_values(raw.get("contributions"), f"{where}['contributions']"),
        detector_scores=_finite_values(raw.get("detector_scores"), f"{where}['detector_scores']"),
        log_templates=templates,
        warning_scores=_finite_lists(raw.get("warning_scores"), f"{where}['warning_scores']"),
    )


def _finite_lists(values: dict[str, Any] | None, where: str) -> dict[str, list[float]]:
    """Name -> the finite numbers of a list (a NaN step said nothing); empty lists dropped."""
    lists: dict[str, list[float]] = {}
    for name, items in (values or {}).items():
        if not isinstance(items, list | tuple):
            raise ValueError(f"{where}[{name!r}] must be a list of numbers, got {items!r}")
        numbers = [_number(value, f"{where}[{name!r}][{i}]") for i, value in enumerate(items)]
        finite = [value for value in numbers if math.isfinite(value)]
        if finite:
            lists[str(name)] = finite
    return lists


def _finite_values(values: dict[str, Any] | None, where: str) -> dict[str, float]:
    numbers = {
        str(name): _number(value, f"{where}[{name!r}]") for name, value in (values or {}).items()
    }
    return {name: value for name, value in numbers.items() if math.isfinite(value)}


def _number(value: Any, where: str) -> float:
    """``value`` as a float (numpy scalars included); a ValueError naming ``where`` if it is
    not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is {value!r}, not a number") from None


def _checked_feedback(user: object, label: object, comment: object) -> tuple[str, str, str | None]:
    """The fields of a feedback post, validated: ``InvalidFeedback`` names the first bad one."""
    if not isinstance(label, str) or label not in FEEDBACK_LABELS:
        raise InvalidFeedback("label", label, f"must be one of {', '.join(FEEDBACK_LABELS)}")
    if not isinstance(user, str) or not 1 <= len(user.strip()) <= FEEDBACK_USER_MAX_CHARS:
        raise InvalidFeedback(
            "user", user, f"must be a string of 1 to {FEEDBACK_USER_MAX_CHARS} characters"
        )
    if comment is not None and (
        not isinstance(comment, str) or len(comment) > FEEDBACK_COMMENT_MAX_CHARS
    ):
        raise InvalidFeedback(
            "comment",
            comment,
            f"must be a string of at most {FEEDBACK_COMMENT_MAX_CHARS} characters",
        )
    return user.strip(), label, comment or None


def _feedback_label(row: AnomalyFeedbackRow, replaced_label: str | None) -> FeedbackLabel:
    return FeedbackLabel(
        id=row.id,
        event_id=row.event_id,
        user=row.user,
        label=row.label,
        comment=row.comment,
        created_at=row.created_at,
        updated_at=row.updated_at,
        replaced_label=replaced_label,
    )


def _feedback_json(row: AnomalyFeedbackRow) -> dict[str, Any]:
    return {
        "user": row.user,
        "label": row.label,
        "comment": row.comment,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }
