"""The scheduled agent: a ``fit`` job and an ``infer`` job over every entity group.

The inference cycle reads top to bottom as its phases; each phase's time, summed over the
cycle's groups and the log side, is observed once per cycle in
``aiops_cycle_duration_seconds{phase}``::

    fetch      incremental PromQL reads into a bounded per-group buffer
    features   entities with too little observed data are skipped, with a reason
    infer      every fitted detector scores the whole group in one batched call
    calibrate  raw scores -> p-values (calibrated on steps the detectors did not train on) ->
               the exported scale (1.0 = the configured false-alarm rate), the fused score
               (Cauchy combination of the detectors' and the log score's p-values, calibrated
               again), P(anomalous now), suppression rules
    export     publish the snapshot, track anomaly events in the store

Fitting writes a model version in one transaction only once it is complete; a stop request
(SIGTERM/SIGINT) between groups or detectors abandons the fit without writing anything, so the
store never holds a half-written version. On start-up, models fitted under the same configuration
are loaded from the store instead of being refitted, with their group's calibration (the
calibration is versioned apart from the weights: when only the calibration settings changed, the
group is recalibrated on the steps after its models' training, without retraining). While any
(group, detector) has no model (Prometheus was down at start-up, a group had no data yet), the
fit of the groups concerned (only them) is retried with exponential backoff from
``schedule.fit_retry_backoff`` up to ``schedule.fit_retry_max_backoff`` instead of waiting for
``fit_every``.

A failure in one group (a detector raising, the store refusing a write) is reported for that
group; the other groups are still scored and exported.

With logs, a job of its own mines (Drain3) and embeds what the intake accepted, every
``LOG_MINING_INTERVAL_SECONDS`` and until nothing waits, off the metric cycle: a burst of records
never stretches a cycle. The cycle scores the logs already mined; while records older than one
step wait (``aiops_log_mining_lag_seconds``), the log score is withheld rather than computed from
an incomplete window, and the fused score uses the metrics alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from apscheduler.schedulers.background import BackgroundScheduler

from aiops_plugin.calibration import score_from_p
from aiops_plugin.calibration.probability import LabelledProbability
from aiops_plugin.calibration.stage import METHOD, GroupCalibration, RecentProbability
from aiops_plugin.config import Config, ConfigError, EntityGroupConfig, load_config
from aiops_plugin.detectors.base import FitReport, is_device_error, usable_device
from aiops_plugin.detectors.forecaster import resolve_export_metrics
from aiops_plugin.detectors.registry import DETECTORS, FittedModel, build_detector
from aiops_plugin.detectors.training import TrainingFailed, TrainingInterrupted
from aiops_plugin.early_warning import GroupEarlyWarning
from aiops_plugin.exporter import Exporter, GroupSnapshot, RootCauseRank, horizon_label
from aiops_plugin.feedback import (
    TRUE_POSITIVE,
    detector_weights,
    labelled_probability,
    warning_labels,
)
from aiops_plugin.fit_exclusions import (
    ExcludedPeriod,
    alert_periods,
    exclusion_mask,
    incident_periods,
    maintenance_periods,
    without_excluded,
)
from aiops_plugin.grafana import AnnotationWriter, BackgroundAnnotations
from aiops_plugin.logs.intake import LogIntake
from aiops_plugin.logs.pipeline import LogPipeline
from aiops_plugin.memory import return_freed_memory
from aiops_plugin.reload import ReloadRefused, restart_only_changes, stale_groups
from aiops_plugin.rootcause import joined_candidates, rank_root_causes
from aiops_plugin.score_history import ScoreHistory
from aiops_plugin.sharding import resolve_shard, store_group
from aiops_plugin.sources.prometheus import PrometheusReader, SourceUnavailable, merge_windows
from aiops_plugin.store import AnomalyEvent, Store, StoreError
from aiops_plugin.suppression import apply_suppression, expected_values, feature_rules
from aiops_plugin.windows import Windows

log = logging.getLogger(__name__)

FUSED = "fused"
#: A suppressed anomaly's fused score is exported at most at this value (just below the alarm).
SUPPRESSED_SCORE_CAP = 0.999
#: Below this many expected normal exceedances in the calibration slice, the threshold is an
#: extrapolation (measured 2.6-12x too many alarms on ASD and NAB at 0.5 expected exceedances).
MIN_EXPECTED_EXCEEDANCES = 10.0
LOG_FIT_RETRY_SECONDS = 60.0
#: How often ``run`` checks whether its configuration file changed (then reloads it).
CONFIG_WATCH_SECONDS = 5.0
#: Period of the log mining job (each run mines until nothing waits).
LOG_MINING_INTERVAL_SECONDS = 1.0
#: A deep detector trained on fewer windows than this learned from too little history: the fit
#: logs a warning (and aiops_model_training_windows shows it; AiopsModelTrainedOnLittleData).
MIN_TRAINING_WINDOWS = 500
#: A cycle failing for the same reason is logged at ERROR again only after this many seconds.
REPEATED_FAILURE_LOG_SECONDS = 300.0


class StopRequested(Exception):
    """Raised inside a job when the agent is shutting down."""


class CycleFailed(Exception):
    """No group could be scored in an inference cycle."""


class Service(Protocol):
    """Something the agent starts after start-up and stops before closing the store (HTTP)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class PhaseTimer:
    """Seconds per phase summed over one cycle (all groups and the log side), so that
    ``aiops_cycle_duration_seconds{phase}`` gets one observation per phase per cycle."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started


@dataclass
class GroupResult:
    """What one inference cycle produced for one group (also what ``score --once`` prints)."""

    group: str
    entities: list[dict[str, str]] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    probability: np.ndarray | None = None
    #: ``(entities, horizons)`` P(anomalous within each of ``calibration.horizons``)
    early_warning: np.ndarray | None = None
    timestamp: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def check_startable(config: Config) -> None:
    """What an agent needs from its machine beyond a valid file, checked before it starts (a
    ValueError names what is missing): its shard, and the embedder's local model folder when
    logs are on (otherwise every cycle's log side would fail on it)."""
    resolve_shard(config.sharding.shards, config.sharding.shard)
    for name in ("tls_cert_file", "tls_key_file"):
        value = getattr(config.server, name)
        if value is not None and not _is_file(value):
            raise ValueError(f"server.{name}: {value!r} is not a readable file")
    if config.logs.enabled:
        from aiops_plugin.logs.embedder import EmbedderError, resolve_model_path

        try:
            resolve_model_path(config.logs.embedder.model)
        except EmbedderError as exc:
            raise ValueError(str(exc)) from None


class Agent:
    """Owns the reader, the store, the fitted models and the exporter."""

    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        reader: PrometheusReader | None = None,
        exporter: Exporter | None = None,
    ) -> None:
        self.config = config
        self.device, why = usable_device(config.detectors.device)
        self.store = store or Store.open(
            config.store.resolved_url(),
            event_top_metrics=config.events.top_metrics,
            event_top_log_templates=config.events.top_log_templates,
        )
        #: this agent's shard of ``config.sharding.shards`` (0 of 1 when not sharded)
        self.shard = resolve_shard(config.sharding.shards, config.sharding.shard)
        self.shards = config.sharding.shards
        self.reader = reader or PrometheusReader(config.prometheus, self.shard, self.shards)
        self.exporter = exporter or Exporter()
        if why is not None:
            log.error("%s; computing on the CPU instead", why)
            self.exporter.device_fallback.labels(reason="unavailable").set(1)
        self.exporter.declare_groups([group.name for group in config.entities])
        self.exporter.declare_models(
            [
                (group.name, detector)
                for group in config.entities
                for detector in config.detectors.enabled_names()
            ]
        )
        self.models: dict[tuple[str, str], FittedModel] = {}
        #: per group: the calibrators of its detectors (fitted with its models, or recalibrated)
        self.calibrations: dict[str, GroupCalibration] = {}
        #: per group: the anomaly probability, refitted every cycle on recent fused p-values
        self.probabilities: dict[str, RecentProbability] = {}
        #: per group: P(anomalous within each horizon), fitted with the calibration
        self.early_warnings: dict[str, GroupEarlyWarning] = {}
        #: per group: the recent cycles' fused scores (early-warning trend, root cause)
        self.histories: dict[str, ScoreHistory] = {}
        #: per group and horizon: the recent cycles' early-warning scores, so that an event
        #: keeps those of the steps before it opened (what feedback teaches the early warning)
        self.warning_histories: dict[str, list[ScoreHistory]] = {}
        self.buffers: dict[str, Windows] = {}
        #: entity keys seen at the last fit, so an entity whose series vanished is reported
        self.fitted_entities: dict[str, dict[str, dict[str, str]]] = {}
        #: per group, entities already reported as vanished (reported once, not every cycle)
        self.vanished: dict[str, set[str]] = {}
        #: why the last fit left models missing, and the delay before the next try (backoff)
        self.last_fit_error: str | None = None
        self._fit_retry_delay: float | None = None
        self._last_failure_logged: tuple[str, float] | None = None
        self.stop_event = threading.Event()
        self._models_lock = threading.Lock()
        #: held by an inference cycle and by a reload, so a cycle sees one configuration
        self._config_lock = threading.RLock()
        #: bumped by every applied reload: a fit that started before one does not install
        self._generation = 0
        self._reload_requested = threading.Event()
        self.cycle_succeeded = False
        self.scheduler: BackgroundScheduler | None = None
        #: the durable log queue behind /v1/logs; opened by ``run`` when logs are enabled
        self.log_intake: LogIntake | None = None
        self._log_fit_tried: dict[str, float] = {}
        #: whether the scheduler's mining job mines the logs (else each cycle does)
        self._background_mining = False
        #: mining, embedding, fitting and scoring of the accepted logs
        self.logs: LogPipeline | None = (
            LogPipeline(config, self.store, self.exporter, self.shard, self.shards)
            if config.logs.enabled
            else None
        )
        #: anomaly events opened or closed in a cycle, written to Grafana (grafana.annotations)
        self.annotations: BackgroundAnnotations | None = (
            BackgroundAnnotations(AnnotationWriter.from_config(config.grafana))
            if config.grafana.annotations
            else None
        )

    # ----------------------------------------------------------------- state
    @property
    def groups(self) -> list[EntityGroupConfig]:
        return self.config.entities

    @property
    def detector_names(self) -> list[str]:
        return self.config.detectors.enabled_names()

    def missing_models(self) -> list[tuple[str, str]]:
        """(detector, group) pairs without a usable model: none fitted, or its group has no
        calibration yet."""
        return [
            (detector, group.name)
            for group in self.groups
            for detector in self.detector_names
            if (detector, group.name) not in self.models or group.name not in self.calibrations
        ]

    def readiness(self) -> tuple[bool, str]:
        if not self.models:
            reason = "no model fitted yet"
            if self.last_fit_error:
                reason += f" (last fit: {self.last_fit_error})"
            return False, reason
        if not self.cycle_succeeded:
            return False, "no inference cycle has succeeded yet"
        return True, "ready"

    def load_models(self, now: float | None = None, groups: set[str] | None = None) -> int:
        """Models fitted under the current configuration, from the store, with their group's
        calibration (``groups``: of these only); returns how many models were loaded.

        A group whose models are all there but whose calibration settings changed is
        recalibrated on the history after its models' training (no retraining); one that cannot
        be (too little such history, Prometheus down) is left to the fit.
        """
        loaded = 0
        for group in self.groups:
            if groups is not None and group.name not in groups:
                continue
            models: dict[str, FittedModel] = {}
            versions: dict[str, int] = {}
            for detector in self.detector_names:
                version = self.store.latest_model_version(
                    detector,
                    self._stored(group.name),
                    self.config.model_hash(detector, group.name),
                )
                if version is None:
                    continue
                try:
                    model = FittedModel.from_bytes(
                        version.state, self.config.detectors, self.device
                    )
                except Exception:  # noqa: BLE001 - an unreadable version is refitted, not fatal
                    log.exception(
                        "model version %d of %s/%s cannot be loaded; it will be refitted",
                        version.id,
                        detector,
                        group.name,
                    )
                    continue
                models[detector] = model
                versions[detector] = version.id
                with self._models_lock:
                    self.models[(detector, group.name)] = model
                self.exporter.publish_model_state(group.name, detector, model.detector)
                self.exporter.model_last_fit.labels(entity_group=group.name, detector=detector).set(
                    version.created_at.timestamp()
                )
                windows = (version.training_metrics or {}).get("train_windows")
                if isinstance(windows, float | int):
                    self.exporter.model_training_windows.labels(
                        entity_group=group.name, detector=detector
                    ).set(windows)
                loaded += 1
            if len(models) == len(self.detector_names):
                self._load_or_recalibrate(group, models, versions, now)
        log.info("loaded %d model version(s) from the store", loaded)
        return loaded

    def _load_or_recalibrate(
        self,
        group: EntityGroupConfig,
        models: dict[str, FittedModel],
        versions: dict[str, int],
        now: float | None,
    ) -> None:
        settings_hash = self.config.calibration_hash(group.name, versions)
        stored = self.store.latest_calibration_version(
            self._stored(group.name), FUSED, settings_hash
        )
        if stored is not None:
            try:
                calibration = GroupCalibration.from_state_dict(stored.state["calibration"])
                probability = self._new_probability().seed(
                    np.asarray(stored.state["probability_seed"], dtype=np.float64)
                )
                if "labelled_probability" in stored.state:
                    probability.labelled = LabelledProbability()
                    probability.labelled.load_state_dict(stored.state["labelled_probability"])
                early_warning = None
                if self.config.early_warning.enabled:
                    early_warning = GroupEarlyWarning.from_state_dict(stored.state["early_warning"])
            except Exception:  # noqa: BLE001 - an unreadable calibration is redone, not fatal
                log.exception(
                    "calibration version %d of group %r cannot be loaded; recalibrating",
                    stored.id,
                    group.name,
                )
            else:
                self._install_calibration(group.name, calibration, probability, early_warning)
                return
        try:
            self.recalibrate(group, models, versions, now)
        except (SourceUnavailable, ValueError) as exc:
            log.warning(
                "group %r: models loaded but not recalibrated (%s); the group will be refitted",
                group.name,
                exc,
            )

    def recalibrate(
        self,
        group: EntityGroupConfig,
        models: dict[str, FittedModel],
        versions: dict[str, int],
        now: float | None = None,
    ) -> GroupCalibration:
        """Fit the group's calibration on the steps of the fit window after its models'
        training (scored with the context reaching back before it), without retraining."""
        now = now if now is not None else time.time()
        read = self._read(group, now - self.config.schedule.fit_window, now)
        if read is None:
            raise ValueError("no data in the fit window")
        train_end = max(model.train_end or -np.inf for model in models.values())
        first = int(np.searchsorted(read.timestamps, train_end, side="right"))
        if read.timestamps.size - first < 2:
            raise ValueError(f"only {read.timestamps.size - first} steps after the training")
        excluded, _ = exclusion_mask(
            read, self._excluded_periods(group, read.timestamps[0], now), self._margin
        )
        read = without_excluded(read, excluded)
        raw = {
            name: np.where(excluded[:, first:], np.nan, model.score(read).score[:, first:])
            for name, model in models.items()
        }
        return self._fit_calibration(
            group, raw, read, first, versions, models, self._labelled_events(group, read, now)
        )

    def _new_probability(self) -> RecentProbability:
        return RecentProbability(self.config.calibration.recent_p_values)

    @property
    def _margin(self) -> float:
        return self.config.fit_exclusions.margin

    def _horizon_steps(self) -> list[int]:
        step = self.config.prometheus.step
        return [max(1, math.ceil(h / step - 1e-9)) for h in self.config.calibration.horizons]

    def _fit_calibration(
        self,
        group: EntityGroupConfig,
        raw: dict[str, np.ndarray],
        read: Windows,
        first: int,
        versions: dict[str, int],
        models: dict[str, FittedModel],
        labelled: list[tuple[AnomalyEvent, str]],
    ) -> GroupCalibration:
        """Fit, save (a calibration version) and install a group's calibration: the detectors'
        and the fused one (weighted by feedback), the anomaly probability (labelled when there
        are enough labels) and the early warning. ``raw``: the detectors' raw scores of the
        slice ``read.timestamps[first:]``."""
        rate = self.config.calibration.false_alarm_rate
        weights = detector_weights(labelled, list(raw))
        calibration = GroupCalibration(
            list(raw), tail_fraction=self.config.calibration.tail_fraction, weights=weights
        ).fit(raw, read.keys)
        probability = self._new_probability().seed(calibration.fused_calibration_p_)
        probability.labelled = labelled_probability(
            labelled,
            rate,
            calibration.fused_calibration_p_,
            self.config.feedback.min_labelled_events,
        )
        state: dict = {
            "calibration": calibration.state_dict(),
            "probability": probability.state_dict(),
            "probability_seed": list(probability.recent),
            "feedback": {"labelled_events": len(labelled), "weights": weights},
        }
        if probability.labelled is not None:
            state["labelled_probability"] = probability.labelled.state_dict()
        method = f"{METHOD}; probability: {probability.method}"
        early_warning = None
        if self.config.early_warning.enabled:
            forecaster = models.get("forecaster")
            early_warning = GroupEarlyWarning(
                self._horizon_steps(),
                self.config.early_warning,
                group.slo,
                rate,
                tail_fraction=self.config.calibration.tail_fraction,
                recent_capacity=self.config.calibration.recent_p_values,
            ).fit(
                score_from_p(calibration.fused_calibration_p_, rate),
                read,
                first,
                forecaster.detector if forecaster is not None else None,
                warning_labels(
                    labelled,
                    [horizon_label(h) for h in self.config.calibration.horizons],
                    self.config.feedback.min_labelled_events,
                ),
            )
            state["early_warning"] = early_warning.state_dict()
            method += f"; early warning: {early_warning.method}"
        self.store.save_calibration_version(
            group=self._stored(group.name),
            detector=FUSED,
            settings_hash=self.config.calibration_hash(group.name, versions),
            model_versions=versions,
            method=method,
            state=state,
            slice_start=float(read.timestamps[first]),
            slice_end=float(read.timestamps[-1]),
            n_steps=calibration.n_steps_,
        )
        self.store.prune_calibration_versions(self._stored(group.name), FUSED)
        self._install_calibration(group.name, calibration, probability, early_warning)
        log.info(
            "calibrated group %r on %d steps the detectors did not train on (%d labelled event(s))",
            group.name,
            calibration.n_steps_,
            len(labelled),
        )
        expected = rate * calibration.n_steps_
        if expected < MIN_EXPECTED_EXCEEDANCES:
            log.warning(
                "group %r: %d calibration steps hold %.1f expected normal steps beyond the "
                "threshold at false_alarm_rate %g; the threshold is extrapolated by the fitted "
                "tail and alarms may come more often than configured (lengthen "
                "schedule.fit_window or raise the rate)",
                group.name,
                calibration.n_steps_,
                expected,
                rate,
            )
        return calibration

    def _install_calibration(
        self,
        group: str,
        calibration: GroupCalibration,
        probability: RecentProbability,
        early_warning: GroupEarlyWarning | None,
    ) -> None:
        with self._models_lock:
            self.calibrations[group] = calibration
            self.probabilities[group] = probability
            if early_warning is not None:
                self.early_warnings[group] = early_warning
            else:
                self.early_warnings.pop(group, None)

    def _labelled_events(
        self, group: EntityGroupConfig, read: Windows, now: float
    ) -> list[tuple[AnomalyEvent, str]]:
        """The group's events labelled by feedback within the fit window (none when the store
        cannot say: the fit goes on unweighted rather than not at all)."""
        try:
            return self.store.labelled_events(
                group.name,
                since=datetime.fromtimestamp(float(read.timestamps[0]), UTC),
                until=datetime.fromtimestamp(now, UTC),
            )
        except StoreError as exc:
            log.error("group %r: feedback labels not read, fitting without them: %s", group, exc)
            return []

    def _excluded_periods(
        self, group: EntityGroupConfig, start: float, end: float
    ) -> list[ExcludedPeriod]:
        """Periods of ``group`` no fit may learn from (:mod:`aiops_plugin.fit_exclusions`)."""
        settings = self.config.fit_exclusions
        periods = maintenance_periods(settings)
        if settings.alerts and settings.alert_names:
            try:
                series = self.reader.alert_series(settings.alert_names, start, end)
            except Exception as exc:  # noqa: BLE001 - no ALERTS is no reason not to fit
                log.warning(
                    "group %r: firing periods of %s not read (%s); fitting without excluding them",
                    group.name,
                    settings.alert_names,
                    exc,
                )
            else:
                periods += alert_periods(
                    series, group.name, group.labels, self.config.prometheus.step
                )
        if settings.confirmed_incidents:
            try:
                labelled = self.store.labelled_events(
                    group.name,
                    since=datetime.fromtimestamp(start, UTC),
                    until=datetime.fromtimestamp(end, UTC),
                )
            except StoreError as exc:
                log.error("group %r: confirmed incidents not read: %s", group.name, exc)
                labelled = []
            periods += incident_periods(
                [
                    (
                        event.start_at.timestamp(),
                        None if event.end_at is None else event.end_at.timestamp(),
                        event.group_name,
                        event.entity_labels,
                    )
                    for event, label in labelled
                    if label == TRUE_POSITIVE
                ],
                end,
            )
        return periods

    def _stored(self, group: str) -> str:
        """The name this agent's model and calibration rows of ``group`` are stored under: a
        shard's models are its own (:func:`~aiops_plugin.sharding.store_group`)."""
        return store_group(group, self.shard, self.shards)

    def _check_stop(self) -> None:
        if self.stop_event.is_set():
            raise StopRequested

    @contextlib.contextmanager
    def _job(self, kind: str) -> Iterator[dict]:
        """A job run recorded in the store. A store that cannot record it does not stop the job
        (scoring goes on without its bookkeeping); the failure is logged and counted as the
        store being down."""
        detail: dict = {}
        job_id = self._record_job_start(kind)
        try:
            yield detail
        except StopRequested:
            self._record_job_end(job_id, "interrupted", detail=detail)
            log.warning("%s job interrupted by shutdown; nothing half-written was kept", kind)
            raise
        except Exception as exc:
            self._record_job_end(job_id, "failed", error=str(exc), detail=detail)
            raise
        else:
            self._record_job_end(job_id, "succeeded", detail=detail)

    def _record_job_start(self, kind: str) -> int | None:
        try:
            return self.store.start_job(kind)
        except StoreError as exc:
            self.exporter.source_up.labels(source="store").set(0)
            log.error("%s job not recorded: %s", kind, exc)
            return None

    def _record_job_end(self, job_id: int | None, status: str, **fields: object) -> None:
        if job_id is None:
            return
        try:
            self.store.finish_job(job_id, status, **fields)
        except StoreError as exc:
            self.exporter.source_up.labels(source="store").set(0)
            log.error("end of job %d (%s) not recorded: %s", job_id, status, exc)

    # ------------------------------------------------------------------- fit
    def fit(self, now: float | None = None, groups: set[str] | None = None) -> dict[str, dict]:
        """Fit every enabled detector on each group's ``fit_window`` of history (``groups``:
        only these), then the group's calibration on the later part the detectors did not
        train on (:mod:`aiops_plugin.calibration.stage`)."""
        now = now if now is not None else time.time()
        start = now - self.config.schedule.fit_window
        summary: dict[str, dict] = {}
        with self._job("fit") as detail:
            # the log models first: the detectors that read logs train on their features
            if self.logs is not None:
                for group in self.logs.groups:
                    if groups is not None and group not in groups:
                        continue
                    self._check_stop()
                    model = self.logs.fit(group, start, now)
                    summary.setdefault(group, {})["logs"] = (
                        {"entities": len(model.entity_keys)} if model else {"error": "no records"}
                    )
            generation = self._generation
            for group in self.groups:
                if groups is not None and group.name not in groups:
                    continue
                self._check_stop()
                if generation != self._generation:
                    log.warning("configuration reloaded during the fit; fitting again")
                    break
                read = self._read(group, start, now)
                if read is None:
                    summary[group.name] = {"error": "no data in the fit window"}
                    log.warning("group %r: no data in the fit window, not fitted", group.name)
                    continue
                self.fitted_entities[group.name] = dict(zip(read.keys, read.entities, strict=True))
                self.store.upsert_entities(group.name, read.entities, datetime.now(UTC))
                self._fit_group(group, read, now, summary.setdefault(group.name, {}), generation)
            detail.update(summary)
        return summary

    def _fit_group(
        self,
        group: EntityGroupConfig,
        read: Windows,
        now: float,
        summary: dict,
        generation: int | None = None,
    ) -> None:
        """Every detector on one group's history without its excluded periods (alerts that
        fired, maintenance, confirmed incidents), then the group's calibration over the
        detectors that fitted. Nothing of the group is installed unless its calibration is."""
        fraction = self.config.calibration.calibration_fraction
        excluded, counts = exclusion_mask(
            read, self._excluded_periods(group, float(read.timestamps[0]), now), self._margin
        )
        if excluded.any():
            summary["excluded_steps"] = {reason: n for reason, n in counts.items() if n}
            log.info(
                "group %r: %d entity-steps left out of the fit (%s)",
                group.name,
                int(excluded.sum()),
                summary["excluded_steps"],
            )
        read = self._with_logs(group.name, without_excluded(read, excluded), self.detector_names)
        fitted: dict[str, FittedModel] = {}
        raw: dict[str, np.ndarray] = {}
        versions: dict[str, int] = {}
        for detector_name in self.detector_names:
            self._check_stop()
            detector = build_detector(detector_name, self.config.detectors, self.device)
            detector.stop_event = self.stop_event
            try:
                model, raw[detector_name] = FittedModel.fit_split(detector, read, fraction)
            except TrainingInterrupted as exc:
                raise StopRequested from exc
            except TrainingFailed as exc:
                log.error("fitting %s on group %r failed: %s", detector_name, group.name, exc)
                summary[detector_name] = {"error": str(exc)}
                continue
            except Exception as exc:  # noqa: BLE001 - one detector's failure is its own
                log.exception("fitting %s on group %r failed", detector_name, group.name)
                summary[detector_name] = {"error": str(exc)}
                if self.device.type == "cuda" and is_device_error(exc):
                    self._fall_back_to_cpu(exc)  # the retry (with backoff) fits on the CPU
                continue
            self._check_stop()
            report = model.report
            version = self.store.save_model_version(
                detector=detector_name,
                group=self._stored(group.name),
                config_hash=self.config.model_hash(detector_name, group.name),
                state=model.to_bytes(),
                training_metrics={
                    **(report.metrics if report else {}),
                    "seconds": report.seconds if report else 0.0,
                    "train_end": model.train_end,
                },
                n_entities=len(read.entities),
                n_features=len(read.features),
            )
            self.store.prune_model_versions(detector_name, self._stored(group.name))
            fitted[detector_name] = model
            versions[detector_name] = version.id
            self._check_training_windows(group.name, detector_name, report)
            self.exporter.observe_fit(group.name, detector_name, report.seconds if report else 0.0)
            summary[detector_name] = {
                "version": version.id,
                "entities": len(read.entities),
                "features": len(read.features),
                "steps": len(read.timestamps),
            }
            if detector_name == "forecaster":
                _, problems = resolve_export_metrics(
                    self.config.detectors.forecaster.export_metrics, list(read.features)
                )
                for problem in problems:  # a forecast that would silently never be exported
                    log.error("group %r: %s", group.name, problem)
                if problems:
                    summary[detector_name]["errors"] = problems
            log.info(
                "fitted %s on group %r: %d entities x %d steps x %d features (v%d)",
                detector_name,
                group.name,
                len(read.entities),
                len(read.timestamps),
                len(read.features),
                version.id,
            )
        if not fitted:
            return
        self._check_stop()
        with self._config_lock:  # a reload waits for the install, or voids it first
            if generation is not None and generation != self._generation:
                log.warning(
                    "group %r: configuration reloaded during its fit; not installed", group.name
                )
                summary["error"] = "configuration reloaded during the fit"
                return
            self._calibrate_and_install(group, read, now, summary, excluded, raw, versions, fitted)

    def _calibrate_and_install(
        self,
        group: EntityGroupConfig,
        read: Windows,
        now: float,
        summary: dict,
        excluded: np.ndarray,
        raw: dict[str, np.ndarray],
        versions: dict[str, int],
        fitted: dict[str, FittedModel],
    ) -> None:
        """The group's calibration over the detectors that fitted, then both installed."""
        calibration_start = read.timestamps.size - next(iter(raw.values())).shape[1]
        raw = {
            name: np.where(excluded[:, calibration_start:], np.nan, raw[name]) for name in fitted
        }
        labelled = self._labelled_events(group, read, now)
        self._fit_calibration(group, raw, read, calibration_start, versions, fitted, labelled)
        summary["calibration"] = {
            "steps": int(read.timestamps.size - calibration_start),
            "labelled_events": len(labelled),
        }
        with self._models_lock:
            for detector_name in list(self.models):
                if detector_name[1] == group.name:
                    del self.models[detector_name]
            for detector_name, model in fitted.items():
                self.models[(detector_name, group.name)] = model
        for detector_name, model in fitted.items():
            self.exporter.publish_model_state(group.name, detector_name, model.detector)
            self.exporter.model_last_fit.labels(
                entity_group=group.name, detector=detector_name
            ).set(time.time())

    def _check_training_windows(self, group: str, detector: str, report: FitReport | None) -> None:
        """Export how many windows a deep model trained on, and warn when that is too few to
        have learned normal behaviour (a new deployment, a short fit window, data gaps)."""
        windows = (report.metrics if report else {}).get("train_windows")
        if not isinstance(windows, float | int):
            return  # not a windowed detector
        self.exporter.model_training_windows.labels(entity_group=group, detector=detector).set(
            windows
        )
        if windows < MIN_TRAINING_WINDOWS:
            log.warning(
                "group %r: %s trained on %d windows only (fewer than %d): it has seen too "
                "little history to know normal; its scores are unreliable until a fit on a "
                "longer schedule.fit_window (or once more history exists)",
                group,
                detector,
                int(windows),
                MIN_TRAINING_WINDOWS,
            )

    def _with_logs(self, group: str, windows: Windows, detectors: list[str]) -> Windows:
        """``windows`` joined with the entities' log features on its grid, where one of
        ``detectors`` reads logs and the group has a log model (unchanged otherwise)."""
        if self.logs is None or not any(DETECTORS[name].reads_logs for name in detectors):
            return windows
        return windows.with_logs(self.logs.step_inputs(group, windows))

    def _read(self, group: EntityGroupConfig, start: float, end: float) -> Windows | None:
        try:
            result = self.reader.read_range(group, start, end)
        except SourceUnavailable:
            self.exporter.source_up.labels(source="prometheus").set(0)
            raise
        self.exporter.source_up.labels(source="prometheus").set(1)
        self.exporter.entities_over_limit.labels(entity_group=group.name).set(
            result.dropped_entities
        )
        self.exporter.foreign_series.labels(entity_group=group.name).set(result.foreign_series)
        return result.windows

    # ----------------------------------------------------------------- infer
    def _context_steps(self, group: str) -> int:
        with self._models_lock:
            contexts = [
                model.detector.context_steps
                for (_, group_name), model in self.models.items()
                if group_name == group
            ]
        return max(contexts, default=1)

    def infer(self, now: float | None = None) -> list[GroupResult]:
        """One inference cycle (:meth:`_infer`), never while a reload swaps the configuration."""
        with self._config_lock:
            return self._infer(now)

    def _infer(self, now: float | None = None) -> list[GroupResult]:
        """One inference cycle over every group; a failing group does not stop the others.

        Prometheus found unreachable stops the reads: the groups not read yet fail with the same
        error at once instead of each waiting out the same retries. When no group is scored,
        :class:`CycleFailed` is raised from that :class:`SourceUnavailable`."""
        now = now if now is not None else time.time()
        results: list[GroupResult] = []
        unavailable: SourceUnavailable | None = None
        store_up = self.store.ping()
        self.exporter.source_up.labels(source="store").set(1 if store_up else 0)
        timer = PhaseTimer()
        try:
            with self._job("infer") as detail:
                # the log side first, so this cycle's log p-values join this cycle's fused score
                if self.logs is not None:
                    detail["logs"] = self._infer_logs(now, timer)
                for group in self.groups:
                    self._check_stop()
                    if unavailable is None:
                        try:
                            result = self._infer_group_safely(group, now, timer)
                        except SourceUnavailable as exc:
                            unavailable = exc
                    if unavailable is not None:
                        self.exporter.withdraw(group.name)
                        result = GroupResult(
                            group.name, error=f"prometheus unavailable: {unavailable}"
                        )
                    results.append(result)
                    detail[group.name] = {
                        "scored": len(result.entities),
                        "skipped": len(result.skipped),
                        **({"error": result.error} if result.error else {}),
                    }
                with timer.phase("export"):
                    self._rank_root_causes(now)
                    # the per-entity families rendered once, here, so scrapes are copies
                    self.exporter.render()
                if all(result.error for result in results):
                    raise CycleFailed(
                        "; ".join(f"group {result.group!r}: {result.error}" for result in results)
                    ) from unavailable
        finally:
            for phase, seconds in timer.seconds.items():
                self.exporter.observe_phase(phase, seconds)
        self.exporter.last_success.set(time.time())
        self.cycle_succeeded = True
        return results

    def _infer_group_safely(
        self, group: EntityGroupConfig, now: float, timer: PhaseTimer
    ) -> GroupResult:
        """:meth:`_infer_group`, with any failure of its own reported as the group's error."""
        try:
            return self._infer_group(group, now, timer)
        except (StopRequested, SourceUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - one group's failure must not stop the others
            log.exception("group %r: inference failed", group.name)
            self.exporter.withdraw(group.name)
            if self.device.type == "cuda" and is_device_error(exc):
                self._fall_back_to_cpu(exc)
            return GroupResult(group.name, error=f"{type(exc).__name__}: {exc}")

    def _fall_back_to_cpu(self, error: BaseException) -> None:
        """The GPU failed: every model moves to the CPU and the agent goes on there (slower,
        not crash-looping); ``aiops_device_fallback{reason="device_error"}`` says so until a
        restart tries the GPU again."""
        log.error("the GPU failed (%s); moving every model to the CPU", error)
        cpu = torch.device("cpu")
        with self._models_lock:
            self.device = cpu
            for model in self.models.values():
                model.detector.to_device(cpu)
        self.exporter.device_fallback.labels(reason="device_error").set(1)

    def _infer_group(self, group: EntityGroupConfig, now: float, timer: PhaseTimer) -> GroupResult:
        result = GroupResult(group.name)
        with self._models_lock:
            models = {
                detector: model
                for (detector, group_name), model in self.models.items()
                if group_name == group.name
            }
            calibration = self.calibrations.get(group.name)
            probability = self.probabilities.get(group.name)
            early_warning = self.early_warnings.get(group.name)
            if calibration is None or probability is None:
                models = {}
        context = self._context_steps(group.name)
        keep_steps = 2 * context + 10
        if early_warning is not None:  # the metrics' lines it extrapolates need their span
            keep_steps = max(keep_steps, early_warning.history_steps)
        step = self.config.prometheus.step

        with timer.phase("fetch"):
            buffer = self.buffers.get(group.name)
            overlap = 2 * step
            start = (
                max(buffer.timestamps[-1] - overlap, now - (keep_steps - 1) * step)
                if buffer is not None
                else now - (keep_steps - 1) * step
            )
            window = self._read(group, start, now)
            if window is None:
                self.exporter.withdraw(group.name)
                result.error = "no series returned"
                return result
            buffer = merge_windows(buffer, window, keep_steps)
            self.buffers[group.name] = buffer

        with timer.phase("features"):
            if not models:
                # the entities are known from the read: each one counts as skipped for no_model
                result.error = "no fitted model yet"
                result.skipped = {key: "no_model: no fitted model yet" for key in buffer.keys}
                scored_windows = None
            else:
                scored_windows, result.skipped = self._select_scorable(buffer, context)
                if scored_windows is not None:
                    scored_windows = self._with_logs(group.name, scored_windows, list(models))
            for key in self._newly_vanished(group.name, set(buffer.keys)):
                result.skipped[key] = "no_recent_data: the entity's series returned nothing"
            for reason in result.skipped.values():
                self.exporter.entities_skipped.labels(
                    entity_group=group.name, reason=reason.split(":")[0]
                ).inc()
            if result.skipped and models:
                log.info(
                    "group %r: %d entities skipped this cycle: %s",
                    group.name,
                    len(result.skipped),
                    result.skipped,
                )
            if scored_windows is None:
                self.exporter.withdraw(group.name)
                return result

        with timer.phase("infer"):
            # each detector reads only the history its latest score depends on, and scores
            # the latest step alone
            outputs = {
                name: model.score_latest(scored_windows.tail(model.detector.context_steps + 1))
                for name, model in models.items()
            }

        with timer.phase("calibrate"):
            assert calibration is not None and probability is not None
            calibrated = self._calibrate(group, calibration, probability, outputs, scored_windows)
            latest, uncertainty, fused_probability = calibrated
            contributions = self._fused_contributions(outputs, models, scored_windows, latest)
            forecast = next((o.forecast for o in outputs.values() if o.forecast is not None), None)
            self._suppress(group, scored_windows, latest, fused_probability, contributions)
            history = self._history(group.name)
            history.append(
                float(scored_windows.timestamps[-1]),
                scored_windows.keys,
                scored_windows.entities,
                latest[FUSED],
            )
            early = early_scores = None
            if early_warning is not None:
                forecaster = models.get("forecaster")
                early, early_scores = early_warning.update_scored(
                    history.rows(scored_windows.keys, self.config.early_warning.trend_steps),
                    scored_windows,
                    forecaster.detector if forecaster is not None else None,
                )

        with timer.phase("export"):
            snapshot = GroupSnapshot(
                group=group.name,
                entities=scored_windows.entities,
                features=scored_windows.features,
                timestamp=float(scored_windows.timestamps[-1]),
                scores=latest,
                uncertainty=uncertainty,
                contributions=contributions,
                forecast=forecast,
                probability=fused_probability,
                early_warning=early,
                early_warning_score=early_scores,
                horizons_seconds=list(self.config.calibration.horizons)
                if early is not None
                else [],
                log_branch={
                    name: output.log_branch
                    for name, output in outputs.items()
                    if output.log_branch is not None
                },
            )
            self.exporter.publish(snapshot)
            self._track_events(
                group.name,
                scored_windows,
                snapshot.timestamp,
                latest,
                fused_probability,
                contributions,
            )
            if early_scores is not None:
                self._remember_warnings(group.name, scored_windows, early_scores)
        result.entities = scored_windows.entities
        result.scores = latest
        result.probability = fused_probability
        result.early_warning = early
        result.timestamp = snapshot.timestamp
        return result

    def _calibrate(
        self,
        group: EntityGroupConfig,
        calibration: GroupCalibration,
        probability: RecentProbability,
        outputs: dict,
        windows: Windows,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        """The latest step's raw scores -> exported scores per detector and fused (with the
        log score's p-value where the entity has one), their uncertainty, P(anomalous)."""
        keys = windows.keys
        rate = self.config.calibration.false_alarm_rate
        raw = {name: output.score[:, -1:] for name, output in outputs.items()}
        log_p = self.logs.p_values(group.name, keys) if self.logs is not None else None
        p = calibration.p_values(raw, keys, None if log_p is None else log_p[:, None])
        latest = {
            name: score_from_p(values[:, 0], rate).astype(np.float32) for name, values in p.items()
        }
        uncertainty = {}
        for name, output in outputs.items():
            if output.uncertainty is None:
                continue
            upper = calibration.calibrators_[name].p_values(
                output.score[:, -1:] + output.uncertainty[:, -1:], keys
            )
            spread = score_from_p(upper[:, 0], rate) - latest[name]
            uncertainty[name] = np.maximum(spread, 0.0).astype(np.float32)
        return latest, uncertainty, probability.update(p[FUSED][:, 0])

    def _suppress(
        self,
        group: EntityGroupConfig,
        windows: Windows,
        latest: dict[str, np.ndarray],
        fused_probability: np.ndarray,
        contributions: np.ndarray | None,
    ) -> None:
        """Apply the group's suppression rules to the fused score and probability in place: a
        suppressed anomaly is exported just below the alarm (score and probability of an entity
        at the threshold), and counted with its reason."""
        fused = latest[FUSED]
        anomalous = np.nan_to_num(fused, nan=0.0) >= 1.0
        suppressed: dict[str, int] = {}
        if anomalous.any() and group.suppress:
            rules = feature_rules(windows.features, group.suppress)
            result = apply_suppression(
                anomalous,
                windows.values[:, -1, :],
                expected_values(windows.values, windows.observed),
                contributions,
                rules,
            )
            drop = ~result.keep
            if drop.any():
                at_threshold = float(
                    self.probabilities[group.name].probability(
                        np.array([self.config.calibration.false_alarm_rate])
                    )[0]
                )
                fused[drop] = np.minimum(fused[drop], SUPPRESSED_SCORE_CAP)
                fused_probability[drop] = np.minimum(fused_probability[drop], at_threshold)
            suppressed = result.counts()
        self.exporter.count_suppression(group.name, int(anomalous.sum()), suppressed)

    def _history(self, group: str) -> ScoreHistory:
        history = self.histories.get(group)
        if history is None:
            step = self.config.prometheus.step
            window_steps = math.ceil(self.config.events.root_cause_window / step)
            capacity = max(self.config.early_warning.trend_steps, window_steps) + window_steps + 2
            history = self.histories[group] = ScoreHistory(capacity)
        return history

    def _warning_histories(self, group: str) -> list[ScoreHistory]:
        """The group's early-warning score history per horizon, each as long as its horizon
        (started afresh when the configured horizons change)."""
        capacities = [max(2, steps + 1) for steps in self._horizon_steps()]
        histories = self.warning_histories.get(group)
        if histories is None or [history.capacity for history in histories] != capacities:
            histories = self.warning_histories[group] = [ScoreHistory(c) for c in capacities]
        return histories

    def _remember_warnings(self, group: str, windows: Windows, scores: np.ndarray) -> None:
        """Append this cycle's early-warning scores ``(entities, horizons)``, after the events
        have taken those of the cycles before."""
        timestamp = float(windows.timestamps[-1])
        for j, history in enumerate(self._warning_histories(group)):
            history.append(timestamp, windows.keys, windows.entities, scores[:, j])

    def _warnings_before(
        self, group: str, keys: list[str], timestamp: float
    ) -> dict[str, dict[str, list[float]]]:
        """Per entity of ``keys``: horizon -> the early-warning scores of the cycles within the
        horizon before this one's ``timestamp`` (``[t - horizon, t)``, what could have warned
        of a start at ``t``), oldest first, finite ones only."""
        if not keys:
            return {}
        histories = self._warning_histories(group)
        out: dict[str, dict[str, list[float]]] = {key: {} for key in keys}
        for seconds, history in zip(self.config.calibration.horizons, histories, strict=True):
            rows = history.rows_between(keys, timestamp - seconds - 1e-6, timestamp)
            label = horizon_label(seconds)
            for key, row in zip(keys, rows, strict=True):
                finite = row[np.isfinite(row)]
                if finite.size:
                    out[key][label] = [float(value) for value in finite]
        return out

    def _event_details(
        self,
        group: str,
        windows: Windows,
        latest: dict[str, np.ndarray],
        probability: np.ndarray,
        contributions: np.ndarray | None,
    ) -> dict[str, dict]:
        """What an event keeps of this step, for the entities that may be in one (fused score
        at or above ``events.close_score``): probability, top metrics, detector scores, the
        early-warning scores of the cycles before (kept by an event this step opens) and,
        where the entity has logs, its most anomalous log templates of the step."""
        fused = np.nan_to_num(latest[FUSED], nan=-np.inf)
        rows = np.flatnonzero(fused >= self.config.events.close_score)
        if not rows.size:
            return {}
        top = self.config.events.top_metrics
        templates = self.logs.latest_templates.get(group, {}) if self.logs is not None else {}
        details: dict[str, dict] = {}
        detectors = [name for name in latest if name != FUSED]
        order = None
        if contributions is not None:
            order = np.argsort(-np.nan_to_num(contributions[rows], nan=-1.0), axis=1)[:, :top]
        before = self._warnings_before(
            group, [windows.keys[i] for i in rows], float(windows.timestamps[-1])
        )
        for n, i in enumerate(rows):
            key = windows.keys[i]
            entry: dict = {
                "probability": float(probability[i]),
                "detector_scores": {name: float(latest[name][i]) for name in detectors},
            }
            if before.get(key):
                entry["warning_scores"] = before[key]
            if order is not None and contributions is not None:
                entry["contributions"] = {
                    windows.features[j]: float(contributions[i, j])
                    for j in order[n]
                    if np.isfinite(contributions[i, j]) and contributions[i, j] > 0
                }
            if key in templates:
                entry["log_templates"] = templates[key]
            details[key] = entry
        return details

    def _track_events(
        self,
        group: str,
        windows: Windows,
        timestamp: float,
        latest: dict[str, np.ndarray],
        probability: np.ndarray,
        contributions: np.ndarray | None,
    ) -> None:
        """Open/close anomaly events in the store (and Grafana), with hysteresis and what each
        event keeps of its steps. The scores are already exported; a store that refuses the
        write costs the events of this cycle, not them."""
        keys = windows.keys
        fused = latest[FUSED]
        try:
            events = self.store.track_anomaly_events(
                group=group,
                detector=FUSED,
                timestamp=datetime.fromtimestamp(timestamp, UTC),
                scores={
                    key: float(v) for key, v in zip(keys, fused, strict=True) if np.isfinite(v)
                },
                labels=dict(zip(keys, windows.entities, strict=True)),
                threshold=self.config.schedule.event_min_score,
                close_score=self.config.events.close_score,
                close_after_steps=self.config.events.close_after_steps,
                details=self._event_details(group, windows, latest, probability, contributions),
            )
        except StoreError as exc:
            self.exporter.source_up.labels(source="store").set(0)
            log.error("group %r: anomaly events not recorded this cycle: %s", group, exc)
            return
        if self.annotations is not None:
            self.annotations.submit(events)  # written by its own thread, not in the cycle

    def _aligned_histories(
        self,
    ) -> tuple[np.ndarray, np.ndarray, list[str], list[dict[str, str]], list[str]]:
        """Every group's score history on one time axis (the union of their cycles):
        ``(timestamps, scores (rows, T), keys, labels, groups)``, one row per entity."""
        parts = [(name, *history.window(), history) for name, history in self.histories.items()]
        if not parts:
            return np.zeros(0), np.zeros((0, 0), np.float32), [], [], []
        times = np.unique(np.concatenate([part[1] for part in parts]))
        times = times[np.isfinite(times)]
        blocks, keys, labels, groups = [], [], [], []
        for name, group_times, scores, history in parts:
            block = np.full((scores.shape[0], times.size), np.nan, dtype=np.float32)
            finite = np.isfinite(group_times)
            block[:, np.searchsorted(times, group_times[finite])] = scores[:, finite]
            blocks.append(block)
            keys += history.keys
            labels += history.labels
            groups += [name] * len(history.keys)
        return times, np.concatenate(blocks), keys, labels, groups

    def _rank_root_causes(self, now: float) -> None:
        """Rank the likely root causes of every anomaly event open now (the entities of its
        group, and of groups joined by ``events.root_cause_join_labels``, by how early and how
        strongly they became anomalous around its start). The ranking is refreshed while the
        event is younger than ``events.root_cause_window`` and then kept; the ranked entities
        of all open events are exported as ``aiops_root_cause_rank``."""
        settings = self.config.events
        try:
            events = self.store.open_anomaly_events()
        except StoreError as exc:
            log.error("root causes not ranked this cycle: %s", exc)
            return
        ranks: list[RootCauseRank] = []
        if events:
            times, scores, keys, labels, groups = self._aligned_histories()
            for event in events:
                ranking = list(event.root_cause)
                start = event.start_at.timestamp()
                if times.size and now - start <= settings.root_cause_window:
                    rows = np.flatnonzero(
                        joined_candidates(
                            event.entity_labels,
                            event.group_name,
                            labels,
                            groups,
                            settings.root_cause_join_labels,
                        )
                    )
                    candidates = rank_root_causes(
                        times,
                        scores[rows],
                        [keys[i] for i in rows],
                        [labels[i] for i in rows],
                        [groups[i] for i in rows],
                        event_start=start,
                        window=settings.root_cause_window,
                        threshold=self.config.schedule.event_min_score,
                        top=settings.root_cause_top,
                    )
                    ranking = [candidate.as_dict() for candidate in candidates]
                    try:
                        self.store.set_event_root_cause(event.id, ranking)
                    except StoreError as exc:
                        log.error("root cause of event %d not stored: %s", event.id, exc)
                ranks += self._exported_ranks(event, ranking)
        self.exporter.publish_root_causes(ranks)

    @staticmethod
    def _exported_ranks(event: AnomalyEvent, ranking: list[dict]) -> list[RootCauseRank]:
        """The places of an event's ranking worth a series: entities that became anomalous
        around it, and always the event's own entity (it crossed the threshold at the start by
        definition, even before its run is long enough to count as an onset)."""
        ranks: list[RootCauseRank] = []
        own_listed = False
        for place, item in enumerate(ranking, start=1):
            own = item["group"] == event.group_name and item["entity_key"] == event.entity_key
            own_listed |= own
            if item.get("onset_at") is None and not own:
                continue  # never anomalous around the event: no cause to point at
            lead = item.get("lead_seconds")
            ranks.append(
                RootCauseRank(
                    item["group"], item["entity_labels"], place, 0.0 if lead is None else lead
                )
            )
        if not own_listed:
            place = len(ranking) + 1
            ranks.append(RootCauseRank(event.group_name, event.entity_labels, place, 0.0))
        return ranks

    def _newly_vanished(self, group: str, present: set[str]) -> list[str]:
        """Entities of the last fit whose series are gone from the buffer (no data left in the
        kept span) and were not reported yet: each is reported (and counted as skipped) once;
        one that comes back is reported again if it goes again."""
        gone = self.fitted_entities.get(group, {}).keys() - present
        new = sorted(gone - self.vanished.get(group, set()))
        self.vanished[group] = gone
        for key in new:
            log.info("group %r: entity %s has no data any more; no longer scored", group, key)
        return new

    def _infer_logs(self, now: float, timer: PhaseTimer) -> dict:
        """Mine and embed what arrived, then score and export every group with log mappings.
        A failure here is logged and reported; it does not fail the metric cycle."""
        assert self.logs is not None
        try:
            if self._background_mining:
                self.logs.update_backlog()
            else:  # no mining job (a one-shot cycle): mine here
                with timer.phase("features"):
                    self.logs.mine_backlog(should_stop=self.stop_event.is_set)
            scored: dict[str, object] = {}
            if self.logs.scores_stale():
                return self._withhold_log_scores(scored)
            for group in self.logs.groups:
                if group not in self.logs.models and self._may_try_log_fit(group, now):
                    self.logs.fit(group, now - self.config.schedule.fit_window, now)
                with timer.phase("infer"):
                    steps = self.logs.score(group, now)
                if steps is None:
                    scored[group] = "no log model yet"
                    continue
                with timer.phase("export"):
                    self.logs.export(group, steps)
                scored[group] = len(steps.entity_keys)
            return scored
        except Exception as exc:  # noqa: BLE001 - the log side must not stop metric scoring
            log.exception("log scoring failed")
            return {"error": str(exc)}

    def _withhold_log_scores(self, scored: dict[str, object]) -> dict[str, object]:
        """No log score while mining lags (see the module docstring): absent, not 0."""
        assert self.logs is not None
        reason = f"stale: records wait to be mined (oldest {self.logs.lag_seconds:.0f}s)"
        for group in self.logs.groups:
            self.logs.latest_p.pop(group, None)
            self.logs.latest_templates.pop(group, None)
            self.exporter.publish_log_scores(group, [], np.empty(0, dtype=np.float32))
            scored[group] = reason
        log.warning("log scores withheld: %s", reason)
        return scored

    def _log_mining_job(self) -> None:
        """Mine and embed what the intake accepted, until nothing waits (or a stop)."""
        assert self.logs is not None
        try:
            self.logs.mine_backlog(should_stop=self.stop_event.is_set)
        except Exception:  # noqa: BLE001 - logged; the next run retries from the store
            log.exception("log mining failed; retrying in %g s", LOG_MINING_INTERVAL_SECONDS)

    def _may_try_log_fit(self, group: str, now: float) -> bool:
        """A group whose logs only started arriving after the last fit gets its log model
        without waiting for ``fit_every``; tries are spaced by ``LOG_FIT_RETRY_SECONDS``."""
        last = self._log_fit_tried.get(group)
        if last is not None and now - last < LOG_FIT_RETRY_SECONDS:
            return False
        self._log_fit_tried[group] = now
        return True

    def _select_scorable(
        self, buffer: Windows, context: int
    ) -> tuple[Windows | None, dict[str, str]]:
        """Entities with enough observed data in the scoring context; reasons for the rest."""
        span = buffer.tail(context + 1)
        observed_fraction = span.observed.mean(axis=(1, 2))
        latest_observed = span.observed[:, -1, :].any(axis=1)
        minimum = self.config.schedule.min_observed_fraction
        skipped: dict[str, str] = {}
        keep: list[int] = []
        for i, key in enumerate(span.keys):
            if not latest_observed[i]:
                skipped[key] = "no_recent_data: no sample at the latest step"
            elif observed_fraction[i] < minimum:
                skipped[key] = (
                    f"too_little_data: {observed_fraction[i]:.0%} observed of the last "
                    f"{context + 1} steps, need {minimum:.0%}"
                )
            else:
                keep.append(i)
        if not keep:
            return None, skipped
        return buffer.select_entities(keep), skipped

    @staticmethod
    def _fused_contributions(
        outputs: dict,
        models: dict[str, FittedModel],
        windows: Windows,
        latest: dict[str, np.ndarray],
    ) -> np.ndarray | None:
        """Per entity, the feature shares of the detector with the highest exported score now,
        laid out on the scored windows' features."""
        candidates = []
        for name, output in outputs.items():
            if output.contributions is None:
                continue
            shares = output.contributions[:, -1, :]
            model_features = models[name].features
            position = {feature: j for j, feature in enumerate(model_features)}
            aligned = np.full((shares.shape[0], len(windows.features)), np.nan, dtype=np.float32)
            for j, feature in enumerate(windows.features):
                if feature in position:
                    aligned[:, j] = shares[:, position[feature]]
            candidates.append((np.nan_to_num(latest[name], nan=-np.inf), aligned))
        if not candidates:
            return None
        best = np.argmax(np.stack([score for score, _ in candidates]), axis=0)
        stacked = np.stack([aligned for _, aligned in candidates])
        return stacked[best, np.arange(stacked.shape[1])]

    # ------------------------------------------------------------------- run
    def start_up(self) -> None:
        return_freed_memory()
        interrupted = self.store.mark_running_jobs_interrupted()
        if interrupted:
            log.warning(
                "%d job(s) left running by a previous process marked interrupted", interrupted
            )
        self.load_models()
        if self.logs is not None:
            self.logs.load_models()

    def open_log_intake(self) -> LogIntake | None:
        """Start the log intake's writer when logs are enabled (before the HTTP server)."""
        if self.config.logs.enabled and self.log_intake is None:
            self.log_intake = LogIntake(self.store, self.config.logs.intake, self.exporter)
        return self.log_intake

    def _log_retention_job(self) -> None:
        if self.log_intake is None:
            return
        try:
            self.log_intake.enforce_retention(datetime.now(UTC))
        except StoreError as exc:
            log.error("log retention skipped: %s", exc)

    def _fit_job(self) -> None:
        error: str | None = None
        try:
            # while groups lack a model only they are fitted (the others keep theirs: editing one
            # group refits that group); with none missing, the scheduled refit does them all
            missing = {group for _, group in self.missing_models()} or None
            summary = self.fit(groups=missing)
            error = _first_fit_error(summary)
        except StopRequested:
            return
        except SourceUnavailable as exc:
            error = f"prometheus unavailable: {exc}"
            log.error("fit skipped, Prometheus unavailable: %s", exc)
        except Exception as exc:  # noqa: BLE001 - the job logs and retries, the agent keeps going
            error = f"{type(exc).__name__}: {exc}"
            log.exception("fit failed")
        self._schedule_fit_retry(error)

    def _schedule_fit_retry(self, error: str | None) -> None:
        """While a (group, detector) has no model, try again soon, backing off exponentially,
        rather than at the next ``fit_every`` (a day by default)."""
        missing = self.missing_models()
        if not missing:
            self.last_fit_error = None
            self._fit_retry_delay = None
            return
        schedule = self.config.schedule
        ceiling = min(schedule.fit_retry_max_backoff, schedule.fit_every)
        delay = (
            schedule.fit_retry_backoff
            if self._fit_retry_delay is None
            else min(2 * self._fit_retry_delay, ceiling)
        )
        self._fit_retry_delay = delay
        self.last_fit_error = f"{error or 'no data in the fit window'}; next try in {delay:g}s"
        log.warning("no model yet for %s; fitting again in %g s", _pairs(missing), delay)
        job = self.scheduler.get_job("fit") if self.scheduler is not None else None
        if job is not None:
            job.modify(next_run_time=datetime.fromtimestamp(time.time() + delay, UTC))

    def _infer_job(self) -> None:
        try:
            self.infer()
        except StopRequested:
            pass
        except CycleFailed as exc:
            self._log_cycle_failure(str(exc))
        except Exception:
            log.exception("inference cycle failed")

    def _log_cycle_failure(self, message: str) -> None:
        """A cycle failing for the same reason every ``infer_every`` is logged at ERROR when the
        reason changes and every ``REPEATED_FAILURE_LOG_SECONDS``, at DEBUG in between."""
        now = time.monotonic()
        last = self._last_failure_logged
        if last is None or last[0] != message or now - last[1] >= REPEATED_FAILURE_LOG_SECONDS:
            log.error("inference cycle failed: %s", message)
            self._last_failure_logged = (message, now)
        else:
            log.debug("inference cycle failed: %s", message)

    def start_scheduler(self) -> BackgroundScheduler:
        """Schedule ``fit`` and ``infer``; each never overlaps itself and missed runs coalesce."""
        schedule = self.config.schedule
        scheduler = BackgroundScheduler(
            timezone="UTC",
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        now = datetime.now(UTC)
        scheduler.add_job(
            self._fit_job,
            "interval",
            seconds=schedule.fit_every,
            id="fit",
            next_run_time=now if self.missing_models() else None,
        )
        scheduler.add_job(
            self._infer_job, "interval", seconds=schedule.infer_every, id="infer", next_run_time=now
        )
        if not self.missing_models():
            scheduler.get_job("fit").modify(
                next_run_time=datetime.fromtimestamp(time.time() + schedule.fit_every, UTC)
            )
        if self.logs is not None:
            scheduler.add_job(
                self._log_mining_job,
                "interval",
                seconds=LOG_MINING_INTERVAL_SECONDS,
                id="log_mining",
                next_run_time=now,
            )
            self._background_mining = True
        if self.log_intake is not None:
            scheduler.add_job(
                self._log_retention_job,
                "interval",
                seconds=self.config.logs.intake.retention_every,
                id="log_retention",
                next_run_time=now,
            )
        scheduler.start()
        self.scheduler = scheduler
        return scheduler

    # ---------------------------------------------------------------- reload
    def apply_config(self, new: Config) -> set[str]:
        """Run on ``new`` from now on, without a restart (:mod:`aiops_plugin.reload`); returns
        the groups whose models or calibration were made stale (loaded again from the store, or
        left to the fit). Raises :class:`ReloadRefused` for a change that needs a restart."""
        changed = restart_only_changes(self.config, new)
        if changed:
            raise ReloadRefused(
                f"{', '.join(changed)} changed, which takes effect only at a restart"
            )
        with self._config_lock:
            old = self.config
            stale = stale_groups(old, new)
            names = {group.name for group in new.entities}
            removed = {group.name for group in old.entities} - names
            old_pairs = {(g.name, d) for g in old.entities for d in old.detectors.enabled_names()}
            new_pairs = {(g.name, d) for g in new.entities for d in new.detectors.enabled_names()}
            with self._models_lock:
                for detector, group in list(self.models):
                    if group in stale or (group, detector) not in new_pairs:
                        del self.models[(detector, group)]
                for group in stale | removed:
                    for table in (self.calibrations, self.probabilities, self.early_warnings):
                        table.pop(group, None)
            for group in stale | removed:
                for table in (
                    self.buffers,
                    self.histories,
                    self.warning_histories,
                    self.fitted_entities,
                    self.vanished,
                ):
                    table.pop(group, None)
            if old.prometheus != new.prometheus:
                self.reader = PrometheusReader(new.prometheus, self.shard, self.shards)
                self.buffers.clear()
            self.config = new
            if self.logs is not None:
                self.logs.config = new
                if old.prometheus.step != new.prometheus.step:  # the log models' grid
                    self.logs.models.clear()
                    self.logs.load_models()
            self._generation += 1
            for group in removed:
                self.exporter.withdraw(group)
            self.exporter.retire_models(sorted(old_pairs - new_pairs))
            self.exporter.declare_groups(sorted(names))
            self.exporter.declare_models(sorted(new_pairs - old_pairs))
            if stale:
                self.load_models(groups=stale)
        self._reschedule(old, new)
        log.info(
            "configuration reloaded; %s",
            f"groups {sorted(stale)} refreshed" if stale else "no model affected",
        )
        return stale

    def reload(self, path: Path) -> bool:
        """Read, validate and apply the configuration file ``path``; an invalid file or a
        change that needs a restart is refused with its reason logged, the running
        configuration kept (``aiops_config_last_reload_successful`` 0)."""
        try:
            new = load_config(path)
            check_startable(new)
            self.apply_config(new)
        except (ConfigError, ValueError, ReloadRefused) as exc:
            log.error("configuration %s not applied, the running one is kept: %s", path, exc)
            self.exporter.config_reload_ok.set(0)
            return False
        self.exporter.config_reload_ok.set(1)
        self.exporter.config_reload_time.set_to_current_time()
        return True

    def _reschedule(self, old: Config, new: Config) -> None:
        if self.scheduler is None:
            return
        for job_id, before, after in (
            ("fit", old.schedule.fit_every, new.schedule.fit_every),
            ("infer", old.schedule.infer_every, new.schedule.infer_every),
        ):
            if before != after:
                self.scheduler.reschedule_job(job_id, trigger="interval", seconds=after)
        if self.missing_models():
            self.scheduler.get_job("fit").modify(next_run_time=datetime.now(UTC))

    def request_reload(self, *_: object) -> None:
        self._reload_requested.set()

    def request_stop(self, *_: object) -> None:
        log.info("stop requested; finishing the running job")
        self.stop_event.set()

    def run(
        self, http: Callable[[Agent], Service] | None = None, config_path: Path | None = None
    ) -> None:
        """Start-up, schedule, serve, and block until SIGTERM/SIGINT.

        ``http`` builds the HTTP service once the agent is started up and its log intake is
        open (``aiops_plugin.api.HttpServer.for_agent``); the HTTP layer depends on the agent,
        never the other way round. ``config_path``: the file to reload on SIGHUP and whenever
        its content changes (checked every ``CONFIG_WATCH_SECONDS``; a Kubernetes ConfigMap
        update changes the mounted file without a signal).
        """
        # first, so that an edit made while the agent starts is seen as a change
        watched = _file_digest(config_path) if config_path is not None else None
        self.start_up()
        self.open_log_intake()
        server = http(self) if http is not None else None
        if server is not None:
            server.start()
        previous = {
            sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.request_reload)
        scheduler = self.start_scheduler()
        next_watch = time.monotonic() + CONFIG_WATCH_SECONDS
        try:
            while not self.stop_event.wait(0.5):
                if config_path is None:
                    continue
                if time.monotonic() >= next_watch:
                    next_watch = time.monotonic() + CONFIG_WATCH_SECONDS
                    digest = _file_digest(config_path)
                    if digest != watched:
                        watched = digest
                        self._reload_requested.set()
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    watched = _file_digest(config_path)
                    self.reload(config_path)
        finally:
            scheduler.shutdown(wait=True)
            if server is not None:
                server.stop()
            if self.log_intake is not None:
                self.log_intake.close()  # after the server: no new records, queued ones written
            if self.annotations is not None:
                self.annotations.close()
            self.store.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("agent stopped cleanly")


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except OSError:  # a name too long, or a folder that cannot be read
        return False


def _file_digest(path: Path) -> str | None:
    """The content hash of ``path`` (None while it cannot be read, e.g. mid-update)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _first_fit_error(summary: dict[str, dict]) -> str | None:
    """The first error a fit summary reports (a group without data, a detector that failed)."""
    for group, entry in summary.items():
        if "error" in entry:
            return f"group {group!r}: {entry['error']}"
        for detector, result in entry.items():
            if isinstance(result, dict) and "error" in result:
                return f"{detector} on group {group!r}: {result['error']}"
    return None


def _pairs(missing: list[tuple[str, str]]) -> str:
    return ", ".join(f"{detector}/{group}" for detector, group in missing)
