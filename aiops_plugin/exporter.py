"""The metric contract (DESIGN.md), served from one ``CollectorRegistry`` owned by the exporter.

Per-entity series are produced from the latest published snapshot of each group at scrape time,
so an entity that was skipped or a group whose read failed simply has no series: nothing is
exported that was not computed in the last cycle. ``aiops_anomaly_score{detector}`` is the
detector's score scaled so that 1.0 is the threshold at the configured false-alarm rate;
``aiops_anomaly_probability`` is P(the entity is anomalous now), calibrated from the fused
p-value, and carries no ``detector`` label. Label sets come from one place
(:func:`entity_series_labels`): the entity's identifying labels copied unchanged, plus ``entity``
(its values joined by '/', for annotations and dashboard variables) and ``entity_group``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from aiops_plugin.store.repo import FEEDBACK_LABELS
from aiops_plugin.suppression import SUPPRESSION_REASONS
from aiops_plugin.windows import EntityLabels, entity_display_name

if TYPE_CHECKING:
    from aiops_plugin.detectors.base import Detector, Forecast, ModelGauge

PHASES = ("fetch", "features", "infer", "calibrate", "export")
#: ``reason`` values of ``aiops_entities_skipped_total``.
SKIP_REASONS = ("no_model", "no_recent_data", "too_little_data")
CYCLE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
#: ``reason`` values of ``aiops_logs_rejected_total``. The first three and the last two count
#: records; malformed, unsupported_media_type, too_large and unauthorized count requests, whose
#: records cannot be counted.
LOG_REJECTION_REASONS = (
    "no_entity",
    "label_too_long",
    "too_many_entities",
    "record_too_large",
    "empty_body",
    "malformed",
    "unsupported_media_type",
    "too_large",
    "unauthorized",
    "queue_full",
    "rate_limited",
    "store_unavailable",
)


def entity_series_labels(group: str, labels: EntityLabels) -> dict[str, str]:
    return {**labels, "entity": entity_display_name(labels), "entity_group": group}


def horizon_label(seconds: float) -> str:
    """Prometheus-style duration of a horizon in its largest whole unit: 300 -> ``5m``."""
    whole = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


@dataclass
class GroupSnapshot:
    """The latest exported state of one entity group (only entities that were scored).

    Attributes:
        scores: detector name (including ``fused``) -> ``(entities,)`` scaled scores.
        probability: ``(entities,)`` P(anomalous now) in [0, 1], calibrated from the fused
            p-value; NaN where it is undefined (that entity gets no series), or None.
        uncertainty: detector name -> ``(entities,)`` predictive std on the same scale.
        contributions: ``(entities, features)`` shares of the fused score, or None.
        forecast: forecasts made at ``timestamp`` for the configured metrics (original units),
            entities in the order of ``entities``, or None.
        early_warning: ``(entities, horizons)`` P(the entity becomes anomalous within each of
            ``horizons_seconds``), NaN where undefined, or None.
        early_warning_score: ``(entities, horizons)`` the same evidence before the mixture (tempered
            by the gate), on the anomaly score's scale (1.0 at the configured false-alarm rate),
            or None.
        log_branch: for detectors that read logs, ``(entities,)`` bool: the entity's score used
            its logs (False: its metrics alone).
    """

    group: str
    entities: list[EntityLabels]
    features: list[str]
    timestamp: float
    scores: dict[str, np.ndarray]
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)
    contributions: np.ndarray | None = None
    forecast: Forecast | None = None
    probability: np.ndarray | None = None
    early_warning: np.ndarray | None = None
    early_warning_score: np.ndarray | None = None
    horizons_seconds: list[float] = field(default_factory=list)
    log_branch: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class RootCauseRank:
    """An entity's place in the root-cause ranking of an open anomaly event (1 = went first)."""

    group: str
    labels: EntityLabels
    rank: int
    lead_seconds: float | None


class _AllOf(Collector):
    """The families of several registries as one collector."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self.registries = registries

    def collect(self) -> Iterator[Metric]:
        for registry in self.registries:
            yield from registry.collect()


class _SnapshotCollector(Collector):
    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        snapshots = self.exporter.snapshots()
        score = Metric(
            "aiops_anomaly_score",
            "Anomaly score per entity and detector; 1.0 is the threshold for the configured "
            "false-alarm rate.",
            "gauge",
        )
        probability = Metric(
            "aiops_anomaly_probability",
            "Probability that the entity is anomalous now, calibrated from the fused p-value.",
            "gauge",
        )
        uncertainty = Metric(
            "aiops_anomaly_uncertainty",
            "Predictive standard deviation of the anomaly score, on the score's scale.",
            "gauge",
        )
        contribution = Metric(
            "aiops_metric_contribution",
            "Share of the current anomaly score explained by each input metric (top k).",
            "gauge",
        )
        forecasts = {
            part: Metric(
                f"aiops_forecast{suffix}",
                f"{meaning} of the metric at the horizon after the last scored step, in the "
                "metric's own units.",
                "gauge",
            )
            for part, suffix, meaning in (
                ("mean", "", "Forecast"),
                ("lower", "_lower", "Lower bound of the central forecast interval"),
                ("upper", "_upper", "Upper bound of the central forecast interval"),
            )
        }
        early_warning = Metric(
            "aiops_early_warning_probability",
            "Probability that the entity becomes anomalous within the horizon (forecast, SLO "
            "thresholds and the fused score's trend, held back where the models are unsure).",
            "gauge",
        )
        early_warning_score = Metric(
            "aiops_early_warning_score",
            "Early-warning evidence on the anomaly score's scale: >= 0, 1.0 = the evidence that "
            "normal behaviour gives at the configured false-alarm rate (what AiopsEarlyWarning "
            "alerts on).",
            "gauge",
        )
        inputs = Metric(
            "aiops_detector_entities",
            "Entities a log-reading detector scored this cycle, by what it read: "
            'inputs="metrics+logs", or "metrics" for entities without logs (metric branch alone).',
            "gauge",
        )
        top_k = self.exporter.top_k_contributions
        for snapshot in snapshots:
            for detector, used in snapshot.log_branch.items():
                with_logs = int(np.count_nonzero(used))
                counts = (("metrics+logs", with_logs), ("metrics", len(used) - with_logs))
                for kind, count in counts:
                    inputs.add_sample(
                        "aiops_detector_entities",
                        {"entity_group": snapshot.group, "detector": detector, "inputs": kind},
                        float(count),
                    )
            horizons = [horizon_label(seconds) for seconds in snapshot.horizons_seconds]
            for i, labels in enumerate(snapshot.entities):
                base = entity_series_labels(snapshot.group, labels)
                if snapshot.forecast is not None:
                    _add_forecast_samples(forecasts, snapshot.forecast, i, base)
                for detector, values in snapshot.scores.items():
                    if np.isfinite(values[i]):
                        score.add_sample(
                            "aiops_anomaly_score", {**base, "detector": detector}, float(values[i])
                        )
                if snapshot.probability is not None and np.isfinite(snapshot.probability[i]):
                    probability.add_sample(
                        "aiops_anomaly_probability", base, float(snapshot.probability[i])
                    )
                for family, per_horizon in (
                    (early_warning, snapshot.early_warning),
                    (early_warning_score, snapshot.early_warning_score),
                ):
                    if per_horizon is None:
                        continue
                    for k, horizon in enumerate(horizons):
                        if np.isfinite(per_horizon[i, k]):
                            family.add_sample(
                                family.name, {**base, "horizon": horizon}, float(per_horizon[i, k])
                            )
                for detector, values in snapshot.uncertainty.items():
                    if np.isfinite(values[i]):
                        uncertainty.add_sample(
                            "aiops_anomaly_uncertainty",
                            {**base, "detector": detector},
                            float(values[i]),
                        )
                if snapshot.contributions is not None:
                    shares = snapshot.contributions[i]
                    order = np.argsort(-np.nan_to_num(shares, nan=-1.0))[:top_k]
                    for j in order:
                        if np.isfinite(shares[j]) and shares[j] > 0:
                            contribution.add_sample(
                                "aiops_metric_contribution",
                                {**base, "metric": snapshot.features[j]},
                                float(shares[j]),
                            )
        yield score
        if probability.samples:
            yield probability
        if early_warning.samples:
            yield early_warning
        if early_warning_score.samples:
            yield early_warning_score
        if inputs.samples:
            yield inputs
        yield from self.exporter.root_cause_metrics()
        log_score = Metric(
            "aiops_log_anomaly_score",
            "Log-side anomaly score per entity (template rarity and semantic novelty, severity); "
            "1.0 is the threshold for the configured false-alarm rate.",
            "gauge",
        )
        for group, entities, values in self.exporter.log_scores():
            for labels, value in zip(entities, values, strict=True):
                if np.isfinite(value):
                    log_score.add_sample(
                        "aiops_log_anomaly_score", entity_series_labels(group, labels), float(value)
                    )
        if log_score.samples:
            yield log_score
        yield from self.exporter.model_gauge_metrics()
        if uncertainty.samples:
            yield uncertainty
        if contribution.samples:
            yield contribution
        for metric in forecasts.values():
            if metric.samples:
                yield metric


def _add_forecast_samples(
    metrics: dict[str, Metric], forecast: Forecast, entity: int, base: dict[str, str]
) -> None:
    """One sample per metric, horizon and part (mean, lower, upper) of one entity."""
    for k, seconds in enumerate(forecast.horizons_seconds):
        horizon = horizon_label(float(seconds))
        for j, feature in enumerate(forecast.features):
            for part, metric in metrics.items():
                value = getattr(forecast, part)[entity, k, j]
                if np.isfinite(value):
                    metric.add_sample(
                        metric.name, {**base, "metric": feature, "horizon": horizon}, float(value)
                    )


class Exporter:
    """Owns the registry; the agent publishes snapshots and self-monitoring values into it."""

    def __init__(self, top_k_contributions: int = 3) -> None:
        #: self-monitoring instruments: few series, rendered on every scrape
        self.monitoring = CollectorRegistry(auto_describe=True)
        #: the per-entity families (scores, probabilities, contributions...): up to ~10^5
        #: series, rendered once per change (:meth:`render`) and served as bytes
        self._entity_registry = CollectorRegistry(auto_describe=True)
        #: both, for readers that want every family in one registry
        self.registry = CollectorRegistry(auto_describe=False)
        self.top_k_contributions = top_k_contributions
        self._lock = threading.Lock()
        self._render_lock = threading.Lock()
        #: bumped by every change of what the per-entity families show
        self._version = 0
        self._rendered: tuple[int, bytes] | None = None
        self._snapshots: dict[str, GroupSnapshot] = {}
        #: (group, detector) -> the model gauges of the model in use
        self._model_gauges: dict[tuple[str, str], list[ModelGauge]] = {}
        self.cycle_duration = Histogram(
            "aiops_cycle_duration_seconds",
            "Seconds each phase of an inference cycle took, summed over the cycle's entity "
            "groups and the log side: one observation per phase per cycle.",
            ["phase"],
            buckets=CYCLE_BUCKETS,
            registry=self.monitoring,
        )
        self.fit_duration = Histogram(
            "aiops_fit_duration_seconds",
            "Seconds one model fit took (training and threshold), per entity group and detector.",
            ["entity_group", "detector"],
            buckets=CYCLE_BUCKETS,
            registry=self.monitoring,
        )
        self.last_success = Gauge(
            "aiops_cycle_last_success_timestamp_seconds",
            "Unix time at which the last inference cycle succeeded (freshness of the scores).",
            registry=self.monitoring,
        )
        self.source_up = Gauge(
            "aiops_source_up",
            "1 when the source answered in the last cycle, 0 when it did not.",
            ["source"],
            registry=self.monitoring,
        )
        self.model_last_fit = Gauge(
            "aiops_model_last_fit_timestamp_seconds",
            "Unix time at which the model in use of a detector for an entity group was fitted; "
            "0 while that group and detector have no model.",
            ["entity_group", "detector"],
            registry=self.monitoring,
        )
        self.entities_skipped = Counter(
            "aiops_entities_skipped_total",
            "Entities not scored, counted once per entity per cycle, by reason (no model yet, "
            "no recent data, too little data); an entity whose series vanished counts once.",
            ["entity_group", "reason"],
            registry=self.monitoring,
        )
        self.anomalous_steps = Counter(
            "aiops_anomalous_steps_total",
            "Entity-steps whose fused score reached the alarm level, before suppression rules; "
            "rate(aiops_anomalies_suppressed_total) / rate(this) is the share the rules drop.",
            ["entity_group"],
            registry=self.monitoring,
        )
        self.anomalies_suppressed = Counter(
            "aiops_anomalies_suppressed_total",
            "Anomalous entity-steps dropped by a suppression rule, by reason (direction: every "
            "explaining metric moved the wrong way; min_deviation: the move was too small).",
            ["entity_group", "reason"],
            registry=self.monitoring,
        )
        self.logs_received = Counter(
            "aiops_logs_received_total",
            "Log records accepted on /v1/logs (committed to the store before the answer).",
            registry=self.monitoring,
        )
        self.logs_rejected = Counter(
            "aiops_logs_rejected_total",
            "Log records refused on /v1/logs by reason; requests where records cannot be counted "
            "(malformed, unsupported_media_type, too_large, unauthorized).",
            ["reason"],
            registry=self.monitoring,
        )
        self.log_lines_mined = Counter(
            "aiops_log_lines_mined_total",
            "Log records assigned a Drain3 template.",
            registry=self.monitoring,
        )
        self.log_templates_embedded = Counter(
            "aiops_log_templates_embedded_total",
            "Templates embedded by the language model (each new or changed template once); "
            "1 - rate(this) / rate(aiops_log_lines_mined_total) is the embedding cache hit rate.",
            registry=self.monitoring,
        )
        self.entities_over_limit = Gauge(
            "aiops_entities_over_limit",
            "Entities the last read of a group found beyond its max_entities and left out "
            "(not scored, not exported): raise max_entities, or narrow the queries.",
            ["entity_group"],
            registry=self.monitoring,
        )
        self.foreign_series = Gauge(
            "aiops_read_foreign_series",
            "Series of other shards' entities that the last read of a group received and "
            "skipped: 0 where each query is read restricted to this shard's entities; above 0 "
            "for a query that cannot be (logged at start), whose every answer each shard reads.",
            ["entity_group"],
            registry=self.monitoring,
        )
        self.device_fallback = Gauge(
            "aiops_device_fallback",
            "1 while the agent computes on the CPU although a GPU is configured: 'unavailable' "
            "(none at start) or 'device_error' (the GPU failed during a cycle or a fit).",
            ["reason"],
            registry=self.monitoring,
        )
        self.config_reload_ok = Gauge(
            "aiops_config_last_reload_successful",
            "1 when the last configuration (re)load was applied, 0 when a reload was rejected "
            "(invalid, or a change that needs a restart) and the running configuration kept.",
            registry=self.monitoring,
        )
        self.config_reload_ok.set(1)
        self.config_reload_time = Gauge(
            "aiops_config_last_reload_success_timestamp_seconds",
            "Unix time the running configuration was loaded (start-up or last applied reload).",
            registry=self.monitoring,
        )
        self.config_reload_time.set_to_current_time()
        self.log_mining_backlog = Gauge(
            "aiops_log_mining_backlog_records",
            "Accepted log records of this agent's entities not mined into templates yet.",
            registry=self.monitoring,
        )
        self.log_mining_lag = Gauge(
            "aiops_log_mining_lag_seconds",
            "Age of the oldest accepted log record of this agent's entities not mined yet; 0 "
            "when none waits. While it is over one step, aiops_log_anomaly_score is withheld (a "
            "score of an incompletely mined window would read low) and the fused score uses "
            "the metrics alone.",
            registry=self.monitoring,
        )
        self.model_training_windows = Gauge(
            "aiops_model_training_windows",
            "Windows a deep detector's model in use of an entity group was trained on; few "
            "(AiopsModelTrainedOnLittleData) means it learned from too little history.",
            ["entity_group", "detector"],
            registry=self.monitoring,
        )
        self.log_templates_overflow = Counter(
            "aiops_log_templates_overflow_total",
            "Records of templates beyond logs.templates.max_templates_per_entity for their "
            "entity (a template explosion); still mined and stored.",
            ["entity_group"],
            registry=self.monitoring,
        )
        self.feedback = Counter(
            "aiops_feedback",
            "Feedback labels engineers posted on anomaly events (POST "
            "/api/v1/anomalies/{id}/feedback), by label; a changed label counts again.",
            ["label"],
            registry=self.monitoring,
        )
        for label in FEEDBACK_LABELS:
            self.feedback.labels(label=label)
        self._log_scores: dict[str, tuple[list[EntityLabels], np.ndarray]] = {}
        self._root_causes: list[RootCauseRank] = []
        self._entity_registry.register(_SnapshotCollector(self))
        self.registry.register(_AllOf(self.monitoring, self._entity_registry))

    def _changed(self) -> None:
        """Called under ``_lock`` by every method that changes the per-entity families."""
        self._version += 1

    def render(self) -> None:
        """Render the per-entity families now (the end of a cycle calls it), so that a scrape
        copies bytes instead of formatting every series: 12 MB and 2 s at 10k entities."""
        with self._render_lock:
            with self._lock:
                version = self._version
                if self._rendered is not None and self._rendered[0] == version:
                    return  # rendered while this call waited for the lock (a scrape and a cycle)
            text = generate_latest(self._entity_registry)
            with self._lock:
                if self._rendered is None or self._rendered[0] < version:
                    self._rendered = (version, text)

    def exposition(self) -> bytes:
        """``/metrics``: the self-monitoring families rendered now, then the per-entity ones as
        last rendered (rendered here first if they changed since)."""
        with self._lock:
            rendered, version = self._rendered, self._version
        if rendered is None or rendered[0] != version:
            self.render()
            with self._lock:
                rendered = self._rendered
        assert rendered is not None
        return generate_latest(self.monitoring) + rendered[1]

    def publish_root_causes(self, ranks: list[RootCauseRank]) -> None:
        """Replace the ``aiops_root_cause_rank`` / ``_lead_seconds`` series: the ranked entities
        of the anomaly events open now (an entity in several rankings keeps its best rank)."""
        best: dict[tuple[str, str], RootCauseRank] = {}
        for item in ranks:
            key = (item.group, entity_display_name(item.labels))
            if key not in best or item.rank < best[key].rank:
                best[key] = item
        with self._lock:
            self._root_causes = list(best.values())
            self._changed()

    def root_cause_metrics(self) -> Iterator[Metric]:
        with self._lock:
            ranks = list(self._root_causes)
        rank = Metric(
            "aiops_root_cause_rank",
            "Place of the entity in the root-cause ranking of an anomaly event open now (1 = "
            "became anomalous first and strongest); absent for entities in no ranking.",
            "gauge",
        )
        lead = Metric(
            "aiops_root_cause_lead_seconds",
            "How long before the event's start the ranked entity became anomalous (negative: "
            "after it).",
            "gauge",
        )
        for item in ranks:
            base = entity_series_labels(item.group, item.labels)
            rank.add_sample("aiops_root_cause_rank", base, float(item.rank))
            if item.lead_seconds is not None:
                lead.add_sample("aiops_root_cause_lead_seconds", base, float(item.lead_seconds))
        if rank.samples:
            yield rank
        if lead.samples:
            yield lead

    def publish_model_state(self, group: str, detector_name: str, detector: Detector) -> None:
        """Export the learned state a detector offers (:meth:`Detector.model_gauges`) for the
        model now in use for ``group``, replacing that of the model before it."""
        gauges = detector.model_gauges()
        with self._lock:
            self._model_gauges[(group, detector_name)] = gauges
            self._changed()

    def model_gauge_metrics(self) -> Iterator[Metric]:
        with self._lock:
            items = sorted(self._model_gauges.items())
        families: dict[str, Metric] = {}
        for (group, _), gauges in items:
            for gauge in gauges:
                family = families.setdefault(
                    gauge.name, Metric(gauge.name, gauge.documentation, "gauge")
                )
                for key, value in gauge.values.items():
                    family.add_sample(
                        gauge.name, {"entity_group": group, gauge.label: key}, float(value)
                    )
        yield from families.values()

    def declare_models(self, pairs: list[tuple[str, str]]) -> None:
        """``aiops_model_last_fit_timestamp_seconds`` = 0 for every configured (group, detector)
        until its model exists, so AiopsModelNotFitted can see a model that never came."""
        for group, detector in pairs:
            self.model_last_fit.labels(entity_group=group, detector=detector).set(0)

    def retire_models(self, pairs: list[tuple[str, str]]) -> None:
        """Remove the per-model series of (group, detector) pairs no longer configured (a
        reload removed the group or disabled the detector)."""
        for group, detector in pairs:
            for gauge in (self.model_last_fit, self.model_training_windows):
                with contextlib.suppress(KeyError):
                    gauge.remove(group, detector)

    def observe_fit(self, group: str, detector: str, seconds: float) -> None:
        self.fit_duration.labels(entity_group=group, detector=detector).observe(seconds)

    def declare_groups(self, groups: list[str]) -> None:
        """Create every group's series of the skip, anomalous-step and suppression counters at 0,
        so rates and dashboards see the counters before the first count instead of no series."""
        for group in groups:
            self.entities_over_limit.labels(entity_group=group)
            self.foreign_series.labels(entity_group=group)
            for reason in SKIP_REASONS:
                self.entities_skipped.labels(entity_group=group, reason=reason)
            self.anomalous_steps.labels(entity_group=group)
            for reason in SUPPRESSION_REASONS:
                self.anomalies_suppressed.labels(entity_group=group, reason=reason)

    def count_suppression(self, group: str, anomalous: int, suppressed: dict[str, int]) -> None:
        """Count one cycle of ``group``: ``anomalous`` entities whose fused score reached the
        alarm level, and of those the ``suppressed`` ones per reason (a key of
        :data:`~aiops_plugin.suppression.SUPPRESSION_REASONS`; any other raises ``ValueError``,
        keeping the ``reason`` label bounded)."""
        unknown = sorted(set(suppressed) - set(SUPPRESSION_REASONS))
        if unknown:
            raise ValueError(
                f"suppression reasons {unknown} of group {group!r} are not {SUPPRESSION_REASONS}"
            )
        self.anomalous_steps.labels(entity_group=group).inc(anomalous)
        for reason, count in suppressed.items():
            self.anomalies_suppressed.labels(entity_group=group, reason=reason).inc(count)

    def publish_log_scores(
        self, group: str, entities: list[EntityLabels], scores: np.ndarray
    ) -> None:
        """Replace a group's ``aiops_log_anomaly_score`` series (``scores``: ``(entities,)``)."""
        with self._lock:
            self._log_scores[group] = (entities, scores)
            self._changed()

    def log_scores(self) -> list[tuple[str, list[EntityLabels], np.ndarray]]:
        with self._lock:
            return [(group, *value) for group, value in self._log_scores.items()]

    def publish(self, snapshot: GroupSnapshot) -> None:
        with self._lock:
            self._snapshots[snapshot.group] = snapshot
            self._changed()

    def withdraw(self, group: str) -> None:
        """Stop exporting a group's scores and probabilities (its read failed: old values would
        be stale)."""
        with self._lock:
            if self._snapshots.pop(group, None) is not None:
                self._changed()

    def snapshots(self) -> list[GroupSnapshot]:
        with self._lock:
            return list(self._snapshots.values())

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.cycle_duration.labels(phase=phase).observe(seconds)
