"""The log side of the agent's cycle: mine, embed, fit a profile, score, export.

Called from the agent's jobs (see :mod:`aiops_plugin.agent`): every inference cycle mines the
records accepted since the last one (Drain3), embeds the templates that are new or changed (each
template once), and scores every entity group that has log mappings on the group's step grid. The
raw log score of a step (:mod:`aiops_plugin.logs.features`) goes through the same
:class:`~aiops_plugin.calibration.ThresholdScaler` as the metric detectors, fitted on the fit
window, so ``aiops_log_anomaly_score`` 1.0 is also the threshold for the configured false-alarm
rate. The exported value is the largest scaled score over the last ``score_window`` steps (logs
are sparse: a step without records has no score of its own); an entity known from the fit window
that has been quiet over that span exports 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from aiops_plugin.calibration import ThresholdScaler
from aiops_plugin.config import Config
from aiops_plugin.exporter import Exporter
from aiops_plugin.logs.embedder import TemplateEmbedder, embed_pending_templates
from aiops_plugin.logs.features import LogBatch, LogProfile, LogStepFeatures, step_features
from aiops_plugin.logs.templates import LogTemplateMiner, template_vectors
from aiops_plugin.sources.prometheus import align_start
from aiops_plugin.store import Store
from aiops_plugin.store.models import LogRecordRow

log = logging.getLogger(__name__)

LOG_DETECTOR = "logs"


@dataclass
class LogModel:
    """A group's fitted log profile and the threshold scaler of its step scores."""

    profile: LogProfile
    scaler: ThresholdScaler
    entity_keys: list[str]

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        state = {
            key: torch.from_numpy(np.ascontiguousarray(value))
            if isinstance(value, np.ndarray)
            else value
            for key, value in self.profile.state_dict().items()
        }
        torch.save(
            {"profile": state, "scaler": self.scaler.state_dict(), "entities": self.entity_keys},
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> LogModel:
        payload = torch.load(io.BytesIO(blob), weights_only=True)
        profile = LogProfile()
        profile.load_state_dict(payload["profile"])
        scaler = ThresholdScaler(payload["scaler"]["false_alarm_rate"])
        scaler.load_state_dict(payload["scaler"])
        return cls(profile, scaler, list(payload["entities"]))


def load_log_batch(store: Store, group: str, start: float, end: float) -> LogBatch:
    """Mined records of ``group`` with ``start < observed_at <= end`` (Unix seconds)."""
    query = (
        select(
            LogRecordRow.entity_key,
            LogRecordRow.observed_at,
            LogRecordRow.severity_number,
            LogRecordRow.template_id,
        )
        .where(
            LogRecordRow.entity_group == group,
            LogRecordRow.template_id.is_not(None),
            LogRecordRow.observed_at > datetime.fromtimestamp(start, UTC),
            LogRecordRow.observed_at <= datetime.fromtimestamp(end, UTC),
        )
        .order_by(LogRecordRow.id)
    )
    with Session(store.engine) as session:
        rows = session.execute(query).all()
    return LogBatch(
        entity_keys=np.array([row[0] for row in rows], dtype=object),
        timestamps=np.array([row[1].timestamp() for row in rows], dtype=np.float64),
        severity_number=np.array([row[2] for row in rows], dtype=np.int64),
        template_id=np.array([row[3] for row in rows], dtype=np.int64),
    )


class LogPipeline:
    """Owns the template miner, the (lazily loaded) embedder and the fitted log models."""

    def __init__(self, config: Config, store: Store, exporter: Exporter) -> None:
        self.config = config
        self.store = store
        self.exporter = exporter
        self.miner = LogTemplateMiner(store, config.logs.templates)
        self._embedder: TemplateEmbedder | None = None
        self._vectors: dict[int, np.ndarray] = {}
        self.models: dict[str, LogModel] = {}
        self._processing = threading.Lock()
        self.groups = sorted({mapping.group for mapping in config.logs.entities})

    @property
    def embedder(self) -> TemplateEmbedder:
        """Loaded on first use: the model takes seconds to load and is not needed without logs."""
        if self._embedder is None:
            self._embedder = TemplateEmbedder(self.config.logs.embedder)
        return self._embedder

    def model_hash(self) -> str:
        """What shapes a log model: a change refits instead of loading an incompatible one."""
        logs = self.config.logs
        payload = {
            "features": logs.features.model_dump(mode="json"),
            "templates": logs.templates.model_dump(mode="json"),
            "embedder": logs.embedder.model_dump(mode="json"),
            "entities": [mapping.model_dump(mode="json") for mapping in logs.entities],
            "step": self.config.prometheus.step,
            "false_alarm_rate": self.config.calibration.false_alarm_rate,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def process_pending(self) -> None:
        """Mine new records and embed new or changed templates; counters into the exporter.

        Called from both the fit and the infer job (different scheduler threads); the Drain3
        miner takes one caller at a time, so the whole step runs under one lock.
        """
        with self._processing:
            mined = self.miner.mine_pending()
            self.exporter.log_lines_mined.inc(mined.records)
            for group, overflow in mined.overflow_by_group().items():
                self.exporter.log_templates_overflow.labels(entity_group=group).inc(overflow)
            if mined.records or not self._vectors:
                embedded = embed_pending_templates(self.store, self.embedder)
                self.exporter.log_templates_embedded.inc(embedded.embedded)
                self._vectors = template_vectors(self.store, self.embedder.model_id)

    def load_models(self) -> int:
        for group in self.groups:
            version = self.store.latest_model_version(LOG_DETECTOR, group, self.model_hash())
            if version is not None:
                self.models[group] = LogModel.from_bytes(version.state)
        return len(self.models)

    def _grid(self, start: float, end: float) -> np.ndarray:
        step = self.config.prometheus.step
        first, last = align_start(start, step) + step, align_start(end, step)
        return np.arange(first, last + step / 2, step)

    def fit(self, group: str, start: float, end: float) -> LogModel | None:
        """Profile + scaler from the records of ``(start, end]``; None without records."""
        started = time.perf_counter()
        self.process_pending()
        batch = load_log_batch(self.store, group, start, end)
        if not len(batch):
            log.warning("logs of group %r: no mined records in the fit window, not fitted", group)
            return None
        features = self.config.logs.features
        profile = LogProfile(features.embedding_dim, features.rare_template_fraction).fit(
            batch, self._vectors
        )
        keys = sorted(set(batch.entity_keys.tolist()))
        steps = step_features(
            batch, profile, self._vectors, keys, self._grid(start, end), self.config.prometheus.step
        )
        scaler = ThresholdScaler(self.config.calibration.false_alarm_rate).fit(steps.score, keys)
        model = LogModel(profile, scaler, keys)
        self.store.save_model_version(
            detector=LOG_DETECTOR,
            group=group,
            config_hash=self.model_hash(),
            state=model.to_bytes(),
            training_metrics={
                "records": float(len(batch)),
                "templates": float(len(profile.template_ids_)),
                "pooled_threshold": float(scaler.pooled_threshold_ or 0.0),
            },
            n_entities=len(keys),
            n_features=len(steps.features),
        )
        self.store.prune_model_versions(LOG_DETECTOR, group)
        self.models[group] = model
        self.exporter.model_last_fit.labels(entity_group=group, detector=LOG_DETECTOR).set(
            time.time()
        )
        self.exporter.observe_fit(group, LOG_DETECTOR, time.perf_counter() - started)
        return model

    def score(self, group: str, now: float) -> LogStepFeatures | None:
        """Step features and scaled scores over the last ``score_window`` steps of ``group``."""
        model = self.models.get(group)
        if model is None:
            return None
        step = self.config.prometheus.step
        window = self.config.logs.features.score_window
        start = align_start(now, step) - window * step
        batch = load_log_batch(self.store, group, start, now)
        keys = sorted(set(model.entity_keys) | set(batch.entity_keys.tolist()))
        steps = step_features(
            batch, model.profile, self._vectors, keys, self._grid(start, now), step
        )
        steps.score = model.scaler.scale(steps.score, keys)
        return steps

    def export(self, group: str, steps: LogStepFeatures) -> None:
        with np.errstate(all="ignore"):
            recent = np.where(np.isnan(steps.score), -np.inf, steps.score).max(axis=1)
        scores = np.where(np.isfinite(recent), recent, 0.0).astype(np.float32)
        self.exporter.publish_log_scores(
            group, [json.loads(key) for key in steps.entity_keys], scores
        )
