"""Root-cause ranking: which entities became anomalous first, and how strongly, around an event.

An anomaly event starts when an entity's fused score crosses 1 at ``event_start``. The entities
that matter to the engineer are those whose own fused scores rose before it (or a step after:
a cause can be flagged one cycle late), in the event's group and in groups joined to it by
labels (:func:`joined_candidates`). :func:`rank_root_causes` ranks them from the exported scores
alone, so it works the same for every detector and group.

**Onset, robust to single noisy steps.** At the configured false-alarm rate, a group of ``N``
entities crosses the threshold by chance about ``N * steps * rate`` times in a window (46 pods,
15 one-minute steps and rate 0.001: 0.7 times), so "the first step above 1" alone would often
name a random blip as the root cause. An entity's onset is therefore found with Page's one-sided
CUSUM on its scores with reference value ``threshold``: ``S_t = max(0, S_{t-1} + s_t -
threshold)``, restarted at the window's start. The entity is *anomalous in the window* once
``S`` reaches ``min_excess``, and its onset is the first step of that run, the step at which it
crossed ``threshold`` (the CUSUM change-point estimate). Scores are ``log p / log rate``, so a
run of ``n`` steps reaches ``min_excess = 1`` when the product of its p-values is at most
``rate ** (n + 1)``: one step at ``p <= rate**2`` (score 2), or two at score 1.5, or four at
1.25, while one step at 1.1 does not. Steps between runs below the threshold pull ``S`` back
down, so an old blip does not add up with a later one.

**Order.** Entities anomalous in the window come first, earliest onset first (precedence is
what tells a cause from its effects); among equal onsets (common on a one-minute grid, where a
cascade lands in one step) the stronger first, by ``rank_score``, the area of the score above
``threshold`` over the window (score units x steps), then by peak. Entities never anomalous in
the window follow, by peak score (a sub-threshold rise is still a hint), then area. Entities
with no score at all in the window (NaN throughout: not scored) are left out.

NaN steps (not scored) add no evidence either way: they neither raise nor lower ``S`` and do
not count toward the area or the peak. The computation is vectorised over entities and steps
(cumulative sums and running minima); nothing loops in Python over entities or time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aiops_plugin.windows import EntityLabels

#: CUSUM level (score units above threshold, accumulated) that makes an entity anomalous.
DEFAULT_MIN_EXCESS = 1.0


@dataclass(frozen=True)
class RootCauseCandidate:
    """One entity's place in the ranking of an event.

    ``onset_at``: Unix seconds of the first step of the entity's first run above ``threshold``
    that reached ``min_excess`` in the window (None: never anomalous there);
    ``lead_seconds = event_start - onset_at`` (positive: it went before the event's entity).
    ``peak_score``: its largest score in the window; ``rank_score``: area of its score above
    the threshold in the window (score units x steps), the strength that orders equal onsets.
    """

    group: str
    entity_key: str
    entity_labels: EntityLabels
    onset_at: float | None
    lead_seconds: float | None
    peak_score: float
    rank_score: float

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types, as the store and the API keep it."""
        return {
            "group": self.group,
            "entity_key": self.entity_key,
            "entity_labels": dict(self.entity_labels),
            "onset_at": self.onset_at,
            "lead_seconds": self.lead_seconds,
            "peak_score": self.peak_score,
            "rank_score": self.rank_score,
        }


def joined_candidates(
    event_labels: EntityLabels,
    event_group: str,
    rows_labels: Sequence[EntityLabels],
    rows_groups: Sequence[str],
    join_labels: Sequence[str],
) -> np.ndarray:
    """``(rows,)`` bool: the rows that may be root causes of an event of ``event_group``.

    Every row of the event's own group; a row of another group only where each of
    ``join_labels`` is present in both the event's labels and the row's, with equal values
    (no join labels, or one the event lacks: its own group only).
    """
    if len(rows_labels) != len(rows_groups):
        raise ValueError(f"{len(rows_labels)} label sets for {len(rows_groups)} groups")
    same_group = np.array([group == event_group for group in rows_groups], dtype=bool)
    if not join_labels or any(label not in event_labels for label in join_labels):
        return same_group
    joined = np.ones(len(rows_labels), dtype=bool)
    for label in join_labels:
        values = np.array([row.get(label) for row in rows_labels], dtype=object)
        joined &= values == event_labels[label]
    return same_group | joined


def rank_root_causes(
    timestamps: np.ndarray,
    scores: np.ndarray,
    keys: Sequence[str],
    labels: Sequence[EntityLabels],
    groups: Sequence[str],
    event_start: float,
    window: float,
    after: float | None = None,
    threshold: float = 1.0,
    top: int = 5,
    min_excess: float = DEFAULT_MIN_EXCESS,
) -> list[RootCauseCandidate]:
    """The ``top`` most likely root causes of an event starting at ``event_start``.

    Args:
        timestamps: ``(T,)`` Unix seconds, increasing.
        scores: ``(N, T)`` exported fused scores (1.0 = the configured false-alarm rate), NaN
            where not scored; one row per candidate entity (select them with
            :func:`joined_candidates`).
        keys, labels, groups: per row, the entity key (:func:`~aiops_plugin.windows.entity_key`),
            its labels and its group.
        event_start: Unix seconds at which the event's entity crossed the threshold.
        window: seconds before ``event_start`` whose steps count (``events.root_cause_window``).
        after: seconds after ``event_start`` that still count, so a cause flagged a cycle late
            is not missed; None = one step of the grid (the median spacing of ``timestamps``).
        threshold: the score at which an entity is above normal (the event's opening score).
        top: candidates returned at most.
        min_excess: CUSUM level an entity's run must reach to count as anomalous (module
            docstring); a small value (1e-9) makes the onset the first step above threshold.

    Returns the candidates in rank order (module docstring), the event's own entity among them.
    """
    timestamps = np.asarray(timestamps, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if timestamps.ndim != 1 or scores.shape != (len(keys), timestamps.size):
        raise ValueError(
            f"scores must be (entities, time) = ({len(keys)}, {timestamps.size}), "
            f"got {scores.shape}"
        )
    if not len(labels) == len(groups) == len(keys):
        raise ValueError("keys, labels and groups need one entry per row of scores")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if window < 0 or min_excess <= 0:
        raise ValueError("window must be >= 0 and min_excess > 0")
    if after is None:
        after = float(np.median(np.diff(timestamps))) if timestamps.size > 1 else 0.0
    steps = (timestamps >= event_start - window) & (timestamps <= event_start + after)
    times, values = timestamps[steps], scores[:, steps]
    finite = np.isfinite(values)
    scored = finite.any(axis=1)
    if not scored.any():
        return []
    rows = np.flatnonzero(scored)
    values, finite = values[rows], finite[rows]

    above = np.where(finite, values - threshold, 0.0)
    area = np.maximum(above, 0.0).sum(axis=1)
    peak = np.where(finite, values, -np.inf).max(axis=1)
    onset_step = _cusum_onset(above, min_excess)
    anomalous = onset_step >= 0
    onset = np.where(anomalous, times[np.maximum(onset_step, 0)], np.nan)

    order = np.lexsort(
        (
            np.array([keys[row] for row in rows], dtype=object).argsort().argsort(),
            np.where(anomalous, -peak, -area),
            np.where(anomalous, -area, -peak),
            np.where(anomalous, onset, 0.0),
            ~anomalous,
        )
    )[:top]
    return [
        RootCauseCandidate(
            group=groups[rows[i]],
            entity_key=keys[rows[i]],
            entity_labels=dict(labels[rows[i]]),
            onset_at=float(onset[i]) if anomalous[i] else None,
            lead_seconds=float(event_start - onset[i]) if anomalous[i] else None,
            peak_score=float(peak[i]),
            rank_score=float(area[i]),
        )
        for i in order
    ]


def _cusum_onset(above: np.ndarray, min_excess: float) -> np.ndarray:
    """``(N,)`` index of the first step of each row's first CUSUM run reaching ``min_excess``
    (-1: none). ``above``: ``(N, W)`` score minus threshold, 0 where not scored.

    With ``C`` the cumulative sum from 0, ``S_t = C_t - min_{u <= t} C_u`` is the restarted
    CUSUM; the run that first reaches the level starts right after its last zero before it.
    """
    n_rows, n_steps = above.shape
    if n_steps == 0:
        return np.full(n_rows, -1)
    total = np.concatenate([np.zeros((n_rows, 1)), np.cumsum(above, axis=1)], axis=1)
    cusum = total - np.minimum.accumulate(total, axis=1)
    alarm = cusum[:, 1:] >= min_excess
    first_alarm = np.where(alarm.any(axis=1), alarm.argmax(axis=1), -1)
    at_zero = (cusum[:, :n_steps] == 0.0) & (np.arange(n_steps) <= first_alarm[:, None])
    last_zero = n_steps - 1 - at_zero[:, ::-1].argmax(axis=1)
    return np.where(first_alarm >= 0, last_zero, -1)
