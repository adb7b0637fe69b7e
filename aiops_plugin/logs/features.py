"""Per-entity, per-step log features on the metric step grid, and the log anomaly score.

At fit time a :class:`LogProfile` learns, from the records of the fit window, how often each
template occurs (per group, Laplace-smoothed), which templates are rare, the language-model vector
of every template seen, and a PCA of those vectors (count-weighted) that reduces a step's
embedding summary to ``embedding_dim`` numbers.

Each record then gets a *surprisal*, ``-log p(template)``. A template never seen in the fit window
has no frequency of its own: its surprisal is that of a single unseen occurrence, scaled by how
far its meaning is from every known template (1 - the best cosine similarity of the embeddings),
so a known message with a new number in it (Drain3 sometimes splits those) is not treated like a
kernel panic nobody has seen before. The severity adds its own surprisal, ``-log p(severity
bucket)`` over the fit window: a FATAL line where FATAL is rare counts more than one of many INFO
lines. A record's score is the sum of the two; the step's log score is the largest record score of
the step (one alarming line is enough). Steps without records have no score. On BGL (see
docs/benchmarks.md) both parts matter: template rarity with semantic novelty alone, and severity
alone, each do worse than their sum.

Features per step, for the fusion detector: record counts by severity (trace/debug, info, warn,
error incl. fatal, unset), counts of new and of rare templates, the Jensen-Shannon divergence of
the step's template distribution from the fitted one, and the embedding summary
(count-weighted mean template vector projected by the PCA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SEVERITY_BUCKETS = ("debug", "info", "warn", "error", "unset")
#: Laplace smoothing pseudo-count of every template, seen or not.
SMOOTHING = 0.5


def severity_bucket(severity_number: np.ndarray) -> np.ndarray:
    """OTLP SeverityNumber (1-4 TRACE, 5-8 DEBUG, 9-12 INFO, 13-16 WARN, 17-24 ERROR/FATAL, 0
    unset) to an index into :data:`SEVERITY_BUCKETS`."""
    severity_number = np.asarray(severity_number)
    bucket = np.full(severity_number.shape, 4, dtype=np.int64)
    bucket[(severity_number >= 1) & (severity_number <= 8)] = 0
    bucket[(severity_number >= 9) & (severity_number <= 12)] = 1
    bucket[(severity_number >= 13) & (severity_number <= 16)] = 2
    bucket[severity_number >= 17] = 3
    return bucket


@dataclass
class LogBatch:
    """Mined log records of one entity group, as parallel arrays (one element per record).

    Attributes:
        entity_keys: ``(n,)`` entity key of each record (``aiops_plugin.windows.entity_key``).
        timestamps: ``(n,)`` record time, Unix seconds.
        severity_number: ``(n,)`` OTLP severity number, 0 = unset.
        template_id: ``(n,)`` Drain3 template id.
    """

    entity_keys: np.ndarray
    timestamps: np.ndarray
    severity_number: np.ndarray
    template_id: np.ndarray

    def __len__(self) -> int:
        return len(self.template_id)

    def select(self, mask: np.ndarray) -> LogBatch:
        return LogBatch(
            self.entity_keys[mask],
            self.timestamps[mask],
            self.severity_number[mask],
            self.template_id[mask],
        )


def _normalise_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class LogProfile:
    """The normal log behaviour of an entity group, learnt from the fit window."""

    def __init__(self, embedding_dim: int = 8, rare_template_fraction: float = 0.001) -> None:
        self.embedding_dim = embedding_dim
        self.rare_template_fraction = rare_template_fraction
        self.template_ids_: np.ndarray = np.zeros(0, dtype=np.int64)
        self.counts_: np.ndarray = np.zeros(0, dtype=np.float64)
        self.vectors_: np.ndarray = np.zeros((0, 0), dtype=np.float32)
        self.pca_mean_: np.ndarray = np.zeros(0, dtype=np.float32)
        self.pca_components_: np.ndarray = np.zeros((0, 0), dtype=np.float32)
        self.severity_probability_: np.ndarray = np.full(len(SEVERITY_BUCKETS), 0.2)

    @property
    def total(self) -> float:
        return float(self.counts_.sum())

    def fit(self, batch: LogBatch, vectors: dict[int, np.ndarray]) -> LogProfile:
        """Template frequencies and embedding PCA from the fit window's records.

        ``vectors``: template id -> embedding (templates without a vector are left out of the
        semantic part; their frequency still counts).
        """
        ids, counts = np.unique(batch.template_id.astype(np.int64), return_counts=True)
        buckets = np.bincount(
            severity_bucket(batch.severity_number), minlength=len(SEVERITY_BUCKETS)
        ).astype(np.float64)
        self.severity_probability_ = (buckets + SMOOTHING) / (
            buckets.sum() + SMOOTHING * len(SEVERITY_BUCKETS)
        )
        self.template_ids_ = ids
        self.counts_ = counts.astype(np.float64)
        known = [(i, vectors[int(t)]) for i, t in enumerate(ids) if int(t) in vectors]
        if known:
            dim = len(known[0][1])
            self.vectors_ = np.zeros((len(ids), dim), dtype=np.float32)
            for i, vector in known:
                self.vectors_[i] = vector
            self.vectors_ = _normalise_rows(self.vectors_)
            weights = self.counts_ / self.counts_.sum()
            mean = (weights[:, None] * self.vectors_).sum(axis=0)
            centred = (self.vectors_ - mean) * np.sqrt(weights)[:, None]
            _, _, components = np.linalg.svd(centred, full_matrices=False)
            k = min(self.embedding_dim, components.shape[0])
            self.pca_mean_ = mean.astype(np.float32)
            self.pca_components_ = components[:k].astype(np.float32)
        return self

    def _lookup(self, template_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index into the fitted templates and whether the template was seen at all."""
        template_id = np.asarray(template_id, dtype=np.int64)
        position = np.searchsorted(self.template_ids_, template_id)
        position = np.clip(position, 0, max(len(self.template_ids_) - 1, 0))
        seen = (
            self.template_ids_[position] == template_id
            if len(self.template_ids_)
            else np.zeros(template_id.shape, dtype=bool)
        )
        return position, seen

    def surprisal(self, template_id: np.ndarray, vectors: dict[int, np.ndarray]) -> np.ndarray:
        """``(n,)`` surprisal of each record's template, nats (see the module docstring)."""
        template_id = np.asarray(template_id, dtype=np.int64)
        vocabulary = len(self.template_ids_) + 1
        denominator = self.total + SMOOTHING * vocabulary
        position, seen = self._lookup(template_id)
        counts = np.where(seen, self.counts_[position] if len(self.counts_) else 0.0, 0.0)
        surprisal = -np.log((counts + SMOOTHING) / denominator)
        unseen = np.flatnonzero(~seen)
        if unseen.size and self.vectors_.size:
            novelty = np.ones(unseen.size)
            for j, index in enumerate(unseen):
                vector = vectors.get(int(template_id[index]))
                if vector is not None:
                    vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
                    novelty[j] = np.clip(1.0 - float((self.vectors_ @ vector).max()), 0.0, 1.0)
            # scaled between the surprisal of the rarest seen template and that of the unseen
            floor = -np.log((1.0 + SMOOTHING) / denominator)
            surprisal[unseen] = floor + novelty * (surprisal[unseen] - floor) * 2.0
        return surprisal

    def record_scores(
        self, template_id: np.ndarray, severity_number: np.ndarray, vectors: dict[int, np.ndarray]
    ) -> np.ndarray:
        """``(n,)`` raw score of each record: template surprisal + severity surprisal, nats."""
        severity = -np.log(self.severity_probability_[severity_bucket(severity_number)])
        return self.surprisal(template_id, vectors) + severity

    def is_rare(self, template_id: np.ndarray) -> np.ndarray:
        position, seen = self._lookup(template_id)
        share = np.where(seen, self.counts_[position] if len(self.counts_) else 0.0, 0.0)
        return seen & (share / max(self.total, 1.0) < self.rare_template_fraction)

    def is_new(self, template_id: np.ndarray) -> np.ndarray:
        return ~self._lookup(template_id)[1]

    def embedding_summary(self, weighted_mean: np.ndarray) -> np.ndarray:
        """``(..., d)`` mean template vectors -> ``(..., k)`` PCA coordinates."""
        return (weighted_mean - self.pca_mean_) @ self.pca_components_.T

    def state_dict(self) -> dict[str, Any]:
        return {
            "embedding_dim": self.embedding_dim,
            "rare_template_fraction": self.rare_template_fraction,
            "template_ids": self.template_ids_,
            "counts": self.counts_,
            "vectors": self.vectors_,
            "pca_mean": self.pca_mean_,
            "pca_components": self.pca_components_,
            "severity_probability": self.severity_probability_,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.embedding_dim = int(state["embedding_dim"])
        self.rare_template_fraction = float(state["rare_template_fraction"])
        self.template_ids_ = np.asarray(state["template_ids"], dtype=np.int64)
        self.counts_ = np.asarray(state["counts"], dtype=np.float64)
        self.vectors_ = np.asarray(state["vectors"], dtype=np.float32)
        self.pca_mean_ = np.asarray(state["pca_mean"], dtype=np.float32)
        self.pca_components_ = np.asarray(state["pca_components"], dtype=np.float32)
        self.severity_probability_ = np.asarray(state["severity_probability"], dtype=np.float64)


@dataclass
class LogStepFeatures:
    """Log features and raw log scores on an entity group's step grid.

    Attributes:
        values: ``(entities, time, features)``; counts are 0 where no record arrived, the
            divergence and embedding summary NaN there (nothing to summarise).
        score: ``(entities, time)`` raw log score (max record score), NaN without records.
        features: names of axis 2.
    """

    entity_keys: list[str]
    timestamps: np.ndarray
    values: np.ndarray
    score: np.ndarray
    features: list[str]


def step_features(
    batch: LogBatch,
    profile: LogProfile,
    vectors: dict[int, np.ndarray],
    entity_keys: list[str],
    timestamps: np.ndarray,
    step: float,
) -> LogStepFeatures:
    """Aggregate records onto the grid ``timestamps`` (each step covers ``(t - step, t]``)."""
    n_entities, n_time = len(entity_keys), len(timestamps)
    k = profile.pca_components_.shape[0]
    names = (
        [f"log_{bucket}_count" for bucket in SEVERITY_BUCKETS]
        + ["log_new_templates", "log_rare_templates", "log_template_divergence"]
        + [f"log_embedding_{i}" for i in range(k)]
    )
    values = np.zeros((n_entities, n_time, len(names)), dtype=np.float32)
    score = np.full((n_entities, n_time), np.nan, dtype=np.float32)
    entity_index = {key: i for i, key in enumerate(entity_keys)}
    rows = np.array([entity_index.get(key, -1) for key in batch.entity_keys], dtype=np.int64)
    cols = np.ceil((batch.timestamps - timestamps[0]) / step).astype(np.int64) if n_time else rows
    keep = (rows >= 0) & (cols >= 0) & (cols < n_time)
    batch, rows, cols = batch.select(keep), rows[keep], cols[keep]
    values[:, :, 7:] = np.nan  # divergence and embedding summary: undefined without records
    if not len(batch):
        return LogStepFeatures(list(entity_keys), timestamps, values, score, names)
    cell = rows * n_time + cols
    flat = values.reshape(n_entities * n_time, len(names))
    np.add.at(flat, (cell, severity_bucket(batch.severity_number)), 1.0)
    np.add.at(flat, (cell, 5), profile.is_new(batch.template_id).astype(np.float32))
    np.add.at(flat, (cell, 6), profile.is_rare(batch.template_id).astype(np.float32))
    record_scores = profile.record_scores(batch.template_id, batch.severity_number, vectors)
    flat_score = score.reshape(-1)
    flat_score[np.unique(cell)] = -np.inf
    np.maximum.at(flat_score, cell, record_scores.astype(np.float32))
    occupied, cell_index = np.unique(cell, return_inverse=True)
    # (cell, template) pairs with their record counts: everything below is per pair, never a
    # Python loop over cells or records
    templates, template_index = np.unique(batch.template_id, return_inverse=True)
    pairs, pair_counts = np.unique(
        cell_index.astype(np.int64) * len(templates) + template_index, return_counts=True
    )
    pair_cell, pair_template = pairs // len(templates), pairs % len(templates)
    flat[occupied, 7] = _js_divergences(
        profile, templates, pair_cell, pair_template, pair_counts, len(occupied)
    )
    dim = profile.vectors_.shape[1] if profile.vectors_.size else 0
    if k and dim:
        table = np.zeros((len(templates), dim), dtype=np.float64)
        known = np.zeros(len(templates), dtype=bool)
        for j, template in enumerate(templates.tolist()):  # distinct templates, not records
            vector = vectors.get(int(template))
            if vector is not None:
                table[j], known[j] = vector, True
        weight = np.where(known[pair_template], pair_counts, 0).astype(np.float64)
        total = np.bincount(pair_cell, weights=weight, minlength=len(occupied))
        summed = np.zeros((len(occupied), dim), dtype=np.float64)
        np.add.at(summed, pair_cell, weight[:, None] * table[pair_template])
        has = total > 0
        mean = (summed[has] / total[has, None]).astype(np.float32)
        flat[occupied[has], 8:] = profile.embedding_summary(mean)
    return LogStepFeatures(list(entity_keys), timestamps, values, score, names)


def _js_divergences(
    profile: LogProfile,
    templates: np.ndarray,
    pair_cell: np.ndarray,
    pair_template: np.ndarray,
    pair_counts: np.ndarray,
    n_cells: int,
) -> np.ndarray:
    """Jensen-Shannon divergence (nats, 0..ln 2) of each occupied cell's template distribution
    from the fitted one, from its ``(cell, template, count)`` pairs; templates unseen at fit time
    share one extra bin. NaN for every cell when the profile saw no record.

    With ``p`` the cell's distribution, ``q`` the fitted one and ``m = (p + q) / 2``: ``KL(p||m)``
    sums over the cell's bins only; ``KL(q||m)`` is ``ln 2`` (every fitted bin, ``m = q / 2``
    where the cell has nothing) corrected on the bins the cell does have."""
    if not profile.total:
        return np.full(n_cells, np.nan)
    reference = np.append(profile.counts_ / profile.total, 0.0)
    position, seen = profile._lookup(templates)
    template_bin = np.where(seen, position, len(reference) - 1)
    key = pair_cell * len(reference) + template_bin[pair_template]
    bins, inverse = np.unique(key, return_inverse=True)
    counts = np.bincount(inverse, weights=pair_counts.astype(np.float64))
    bin_cell, bin_index = bins // len(reference), bins % len(reference)
    p = counts / np.bincount(bin_cell, weights=counts, minlength=n_cells)[bin_cell]
    q = reference[bin_index]
    m = 0.5 * (p + q)
    left = np.bincount(bin_cell, weights=p * np.log(p / m), minlength=n_cells)
    with np.errstate(divide="ignore", invalid="ignore"):
        correction = np.where(q > 0, q * np.log(q / m) - q * np.log(2.0), 0.0)
    right = np.log(2.0) + np.bincount(bin_cell, weights=correction, minlength=n_cells)
    return 0.5 * (left + right)
