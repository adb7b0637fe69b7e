"""The log side of the agent's cycle: mine, embed, fit a profile, score, export.

Called from the agent's jobs (see :mod:`aiops_plugin.agent`): every inference cycle mines the
records accepted since the last one (Drain3), embeds the templates that are new or changed (each
template once), and scores every entity group that has log mappings on the group's step grid. The
raw log score of a step comes from :mod:`aiops_plugin.logs.features`. Logs are sparse (a step
without records has no score of its own), so the statistic that is calibrated is the largest raw
step score over the last ``score_window`` steps. As for the metric detectors, calibration is on
data the model did not learn: the template profile is fitted on the records of the earlier
``1 - calibration_fraction`` of the fit window, and a
:class:`~aiops_plugin.calibration.TailCalibrator` on the statistic over the later part (when that
part has no records the whole window is used, in-sample, and the log says so). The p-value feeds
the fused score (:meth:`LogPipeline.p_values`); ``aiops_log_anomaly_score`` is its exported score
(1.0 = the configured false-alarm rate); an entity known from the fit window that has been quiet
over the span exports 0 and has no log p-value (it is fused from its metrics alone).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from aiops_plugin.calibration import TailCalibrator, score_from_p
from aiops_plugin.config import Config
from aiops_plugin.exporter import Exporter
from aiops_plugin.logs.embedder import TemplateEmbedder, embed_pending_templates
from aiops_plugin.logs.features import LogBatch, LogProfile, LogStepFeatures, step_features
from aiops_plugin.logs.templates import LogTemplateMiner, template_vectors
from aiops_plugin.sharding import miner_key, owned_condition, store_group
from aiops_plugin.sources.prometheus import align_start
from aiops_plugin.store import Store
from aiops_plugin.store.models import LogRecordRow, LogTemplateRow
from aiops_plugin.windows import LogInputs, Windows

log = logging.getLogger(__name__)

LOG_DETECTOR = "logs"
#: Records mined per pass of the mining job (one pass is a few seconds of Drain3 on a CPU).
MINING_PASS_RECORDS = 10_000


@dataclass
class LogModel:
    """A group's fitted log profile and the calibrator of its window statistic."""

    profile: LogProfile
    calibrator: TailCalibrator
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
            {
                "profile": state,
                "calibrator": self.calibrator.state_dict(),
                "entities": self.entity_keys,
            },
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> LogModel:
        payload = torch.load(io.BytesIO(blob), weights_only=True)
        profile = LogProfile()
        profile.load_state_dict(payload["profile"])
        calibrator = TailCalibrator.from_state_dict(payload["calibrator"])
        return cls(profile, calibrator, list(payload["entities"]))


def window_statistic(score: np.ndarray, window: int) -> np.ndarray:
    """Largest raw step score over the trailing ``window`` steps (NaN where none scored)."""
    filled = np.where(np.isnan(score), -np.inf, score)
    n_time = filled.shape[1]
    out = np.full(filled.shape, -np.inf)
    for lag in range(min(window, n_time)):
        out[:, lag:] = np.maximum(out[:, lag:], filled[:, : n_time - lag])
    return np.where(np.isfinite(out), out, np.nan)


def load_log_batch(
    store: Store, group: str, start: float, end: float, shard: int = 0, shards: int = 1
) -> LogBatch:
    """Mined records of ``group`` with ``start < observed_at <= end`` (Unix seconds), of the
    entities ``shard`` of ``shards`` owns."""
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
            owned_condition(LogRecordRow.entity_hash, shard, shards),
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
    """Owns the template miner, the (lazily loaded) embedder and the fitted log models.

    ``shard`` of ``shards``: a sharded agent mines, embeds, fits and scores the records of its
    own entities only, and stores its log models under its shard's group name
    (:mod:`aiops_plugin.sharding`)."""

    def __init__(
        self, config: Config, store: Store, exporter: Exporter, shard: int = 0, shards: int = 1
    ) -> None:
        self.config = config
        self.store = store
        self.exporter = exporter
        self.shard, self.shards = shard, shards
        self.miner = LogTemplateMiner(store, config.logs.templates, shard, shards)
        #: the other live shards' trees, whose templates those shards embed
        self._other_miners = {miner_key(i, shards) for i in range(shards)} - {self.miner.miner}
        self._embedder: TemplateEmbedder | None = None
        self._vectors: dict[int, np.ndarray] = {}
        self.models: dict[str, LogModel] = {}
        self._processing = threading.Lock()
        self.groups = sorted({mapping.group for mapping in config.logs.entities})
        #: per group, entity key -> the log p-value of the last scoring (for the fused score)
        self.latest_p: dict[str, dict[str, float]] = {}
        #: per group, entity key -> the most anomalous templates of the last scoring's window
        #: (``[{"template", "count", "score"}]``, for the anomaly events)
        self.latest_templates: dict[str, dict[str, list[dict]]] = {}
        #: age of the oldest record waiting to be mined at the last count (seconds)
        self.lag_seconds = 0.0

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
            "calibration_fraction": self.config.calibration.calibration_fraction,
            "tail_fraction": self.config.calibration.tail_fraction,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def mine_backlog(
        self, should_stop: Callable[[], bool] | None = None, limit: int = MINING_PASS_RECORDS
    ) -> int:
        """Mine (and embed) until none of this agent's accepted records waits, in passes of
        ``limit`` records, updating the backlog gauges after each; returns records mined.
        ``should_stop`` is asked between passes (shutdown)."""
        total = 0
        while True:
            mined = self.process_pending(limit)
            total += mined
            self.update_backlog()
            if mined < limit or (should_stop is not None and should_stop()):
                return total

    def update_backlog(self) -> None:
        """``aiops_log_mining_backlog_records`` and ``aiops_log_mining_lag_seconds`` from the
        store, and :meth:`scores_stale`'s view of them."""
        count, oldest = self.miner.backlog()
        self.lag_seconds = 0.0 if oldest is None else max(0.0, time.time() - oldest.timestamp())
        self.exporter.log_mining_backlog.set(count)
        self.exporter.log_mining_lag.set(self.lag_seconds)

    def scores_stale(self) -> bool:
        """Records older than one step wait to be mined: a log score now would be computed from
        an incomplete window (and read low), so it is withheld instead."""
        return self.lag_seconds > self.config.prometheus.step

    def process_pending(self, limit: int = MINING_PASS_RECORDS) -> int:
        """Mine up to ``limit`` new records and embed new or changed templates; counters into
        the exporter; returns records mined.

        Called from the mining job, the fit and the infer job (different scheduler threads);
        the Drain3 miner takes one caller at a time, so the whole step runs under one lock.
        """
        with self._processing:
            mined = self.miner.mine_pending(limit)
            self.exporter.log_lines_mined.inc(mined.records)
            for group, overflow in mined.overflow_by_group().items():
                self.exporter.log_templates_overflow.labels(entity_group=group).inc(overflow)
            if mined.records or not self._vectors:
                embedded = embed_pending_templates(self.store, self.embedder, self._other_miners)
                self.exporter.log_templates_embedded.inc(embedded.embedded)
                self._vectors = template_vectors(self.store, self.embedder.model_id)
            return mined.records

    def load_models(self) -> int:
        for group in self.groups:
            version = self.store.latest_model_version(
                LOG_DETECTOR, self._stored(group), self.model_hash()
            )
            if version is not None:
                self.models[group] = LogModel.from_bytes(version.state)
        return len(self.models)

    def _stored(self, group: str) -> str:
        return store_group(group, self.shard, self.shards)

    def _batch(self, group: str, start: float, end: float) -> LogBatch:
        return load_log_batch(self.store, group, start, end, self.shard, self.shards)

    def _grid(self, start: float, end: float) -> np.ndarray:
        step = self.config.prometheus.step
        first, last = align_start(start, step) + step, align_start(end, step)
        return np.arange(first, last + step / 2, step)

    def fit(self, group: str, start: float, end: float) -> LogModel | None:
        """Profile from the earlier records of ``(start, end]``, calibrator from the later
        steps (module docstring); None without records."""
        started = time.perf_counter()
        self.process_pending()
        batch = self._batch(group, start, end)
        if not len(batch):
            log.warning("logs of group %r: no mined records in the fit window, not fitted", group)
            return None
        features = self.config.logs.features
        grid = self._grid(start, end)
        split = end - self.config.calibration.calibration_fraction * (end - start)
        earlier = batch.timestamps <= split
        if not earlier.any():
            earlier = np.ones(len(batch), dtype=bool)
        profile = LogProfile(features.embedding_dim, features.rare_template_fraction).fit(
            batch.select(earlier), self._vectors
        )
        keys = sorted(set(batch.entity_keys.tolist()))
        steps = step_features(
            batch, profile, self._vectors, keys, grid, self.config.prometheus.step
        )
        statistic = window_statistic(steps.score, features.score_window)
        calibration = statistic[:, grid > split]
        if not np.isfinite(calibration).any():
            log.warning(
                "logs of group %r: no records in the calibration part of the fit window; "
                "calibrating on the whole window (in-sample)",
                group,
            )
            calibration = statistic
        calibrator = TailCalibrator(tail_fraction=self.config.calibration.tail_fraction).fit(
            calibration, keys
        )
        model = LogModel(profile, calibrator, keys)
        self.store.save_model_version(
            detector=LOG_DETECTOR,
            group=self._stored(group),
            config_hash=self.model_hash(),
            state=model.to_bytes(),
            training_metrics={
                "records": float(len(batch)),
                "templates": float(len(profile.template_ids_)),
                "calibration_steps": float(np.isfinite(calibration).sum()),
            },
            n_entities=len(keys),
            n_features=len(steps.features),
        )
        self.store.prune_model_versions(LOG_DETECTOR, self._stored(group))
        self.models[group] = model
        self.exporter.model_last_fit.labels(entity_group=group, detector=LOG_DETECTOR).set(
            time.time()
        )
        self.exporter.observe_fit(group, LOG_DETECTOR, time.perf_counter() - started)
        return model

    def score(self, group: str, now: float) -> LogStepFeatures | None:
        """Step features over the last ``score_window`` steps of ``group``; ``score`` holds, at
        the latest step, the log p-value of the window statistic (NaN: no records)."""
        model = self.models.get(group)
        if model is None:
            return None
        step = self.config.prometheus.step
        window = self.config.logs.features.score_window
        start = align_start(now, step) - window * step
        batch = self._batch(group, start, now)
        keys = sorted(set(model.entity_keys) | set(batch.entity_keys.tolist()))
        steps = step_features(
            batch, model.profile, self._vectors, keys, self._grid(start, now), step
        )
        with np.errstate(all="ignore"):
            statistic = np.where(np.isnan(steps.score), -np.inf, steps.score).max(axis=1)
        statistic = np.where(np.isfinite(statistic), statistic, np.nan)
        p = model.calibrator.p_values(statistic, keys)
        steps.score = p[:, None].astype(np.float64)
        self.latest_p[group] = dict(zip(keys, p.tolist(), strict=True))
        # the templates behind this log score: the records of its window
        self.latest_templates[group] = self._top_templates(batch, model.profile)
        return steps

    def _top_templates(self, batch: LogBatch, profile: LogProfile) -> dict[str, list[dict]]:
        """Per entity, its templates in ``batch`` with their count and highest record score
        (template surprisal + severity, nats), most anomalous first, ``top_log_templates``
        of them; the texts are read in one query."""
        if not len(batch):
            return {}
        scores = profile.record_scores(batch.template_id, batch.severity_number, self._vectors)
        pairs, inverse, counts = np.unique(
            np.stack([np.unique(batch.entity_keys, return_inverse=True)[1], batch.template_id]),
            axis=1,
            return_inverse=True,
            return_counts=True,
        )
        inverse = inverse.ravel()
        best = np.full(pairs.shape[1], -np.inf)
        np.maximum.at(best, inverse, scores)
        entity_names = np.unique(batch.entity_keys)
        ids = sorted({int(t) for t in pairs[1]})
        with Session(self.store.engine) as session:
            texts = dict(
                session.execute(
                    select(LogTemplateRow.id, LogTemplateRow.template).where(
                        LogTemplateRow.id.in_(ids)
                    )
                ).all()
            )
        limit = self.config.events.top_log_templates
        top: dict[str, list[dict]] = {}
        for j in np.lexsort((-counts, -best)):
            entry = top.setdefault(str(entity_names[pairs[0, j]]), [])
            if len(entry) < limit:
                entry.append(
                    {
                        "template": texts.get(int(pairs[1, j]), f"template {int(pairs[1, j])}"),
                        "count": int(counts[j]),
                        "score": float(best[j]) if np.isfinite(best[j]) else 0.0,
                    }
                )
        return top

    def step_inputs(self, group: str, windows: Windows) -> LogInputs | None:
        """The log features of ``windows``' entities on its step grid, for the detectors that
        read logs (None: the group has no log model yet). An entity has logs when the log
        model knows it or it has records in the span."""
        model = self.models.get(group)
        if model is None or not len(windows.timestamps):
            return None
        step = self.config.prometheus.step
        timestamps = windows.timestamps
        batch = self._batch(group, float(timestamps[0]) - step, timestamps[-1])
        keys = windows.keys
        steps = step_features(batch, model.profile, self._vectors, keys, timestamps, step)
        known = set(model.entity_keys) | set(batch.entity_keys.tolist())
        has_logs = np.array([key in known for key in keys], dtype=bool)
        return LogInputs(steps.values, steps.features, has_logs)

    def p_values(self, group: str, keys: list[str]) -> np.ndarray | None:
        """The last scoring's log p-values for the metric entities ``keys`` (NaN: no logs);
        None when the group has no log model."""
        latest = self.latest_p.get(group)
        if latest is None:
            return None
        return np.array([latest.get(key, np.nan) for key in keys], dtype=np.float64)

    def export(self, group: str, steps: LogStepFeatures) -> None:
        p = steps.score[:, -1]
        scores = score_from_p(p, self.config.calibration.false_alarm_rate)
        scores = np.where(np.isfinite(scores), scores, 0.0).astype(np.float32)
        self.exporter.publish_log_scores(
            group, [json.loads(key) for key in steps.entity_keys], scores
        )
