"""Periods no fit trains or calibrates on, so that no model learns an incident as normal.

Three sources (``fit_exclusions`` in the configuration):

- the firing periods of the product's own anomaly alerts, read back from Prometheus' ``ALERTS``
  series (an alert carries the entity's labels and ``entity_group``);
- maintenance windows the user configures (a planned migration, a load test);
- events an engineer confirmed as incidents (feedback ``true_positive``).

Each period is widened by ``margin`` on both sides (an incident's onset precedes the alarm and
its tail follows the close) and applied to the entities it names: an excluded entity-step is
marked unobserved in the fit read (the detectors skip unobserved values, as they skip gaps) and
its raw calibration score is dropped, so it counts neither as training data nor as a calibration
sample. Other entities keep those steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from aiops_plugin.config import FitExclusionsConfig
from aiops_plugin.windows import EntityLabels, Windows

#: Why a period is excluded (the fit summary counts excluded entity-steps by reason).
EXCLUSION_REASONS = ("alert", "maintenance", "confirmed_incident")


@dataclass(frozen=True)
class ExcludedPeriod:
    """``[start, end]`` (Unix seconds) of the entities of ``group`` (None: every group) whose
    labels include ``labels`` (empty: every entity)."""

    start: float
    end: float
    reason: str
    group: str | None = None
    labels: EntityLabels = field(default_factory=dict)


def maintenance_periods(config: FitExclusionsConfig) -> list[ExcludedPeriod]:
    return [
        ExcludedPeriod(
            window.start.timestamp(),
            window.end.timestamp(),
            "maintenance",
            window.group,
            dict(window.labels),
        )
        for window in config.maintenance_windows
    ]


def alert_periods(
    series: Iterable[dict], group: str, entity_labels: Sequence[str], step: float
) -> list[ExcludedPeriod]:
    """Firing periods of ``group``'s entities from ``ALERTS`` range-query results: each run of
    samples no further apart than two steps is one period. Series of other groups, or lacking an
    identifying label, are ignored."""
    periods: list[ExcludedPeriod] = []
    for item in series:
        metric = item.get("metric", {})
        if metric.get("entity_group") != group or any(
            label not in metric for label in entity_labels
        ):
            continue
        times = np.sort(np.array([float(t) for t, _ in item.get("values", [])], dtype=np.float64))
        if not times.size:
            continue
        labels = {label: metric[label] for label in entity_labels}
        breaks = np.flatnonzero(np.diff(times) > 2 * step)
        starts = np.concatenate([times[:1], times[breaks + 1]])
        ends = np.concatenate([times[breaks], times[-1:]])
        periods.extend(
            ExcludedPeriod(float(a), float(b), "alert", group, labels)
            for a, b in zip(starts, ends, strict=True)
        )
    return periods


def incident_periods(
    events: Iterable[tuple[float, float | None, str, EntityLabels]], now: float
) -> list[ExcludedPeriod]:
    """Confirmed incidents ``(start, end or None while open, group, entity labels)``."""
    return [
        ExcludedPeriod(start, now if end is None else end, "confirmed_incident", group, labels)
        for start, end, group, labels in events
    ]


def exclusion_mask(
    windows: Windows, periods: Sequence[ExcludedPeriod], margin: float
) -> tuple[np.ndarray, dict[str, int]]:
    """``(entities, time)`` True where an entity-step falls in a period (widened by
    ``margin``), and the number of excluded entity-steps per reason (a step in two periods
    counts for the first)."""
    n_entities, n_time = len(windows.entities), len(windows.timestamps)
    mask = np.zeros((n_entities, n_time), dtype=bool)
    counts = dict.fromkeys(EXCLUSION_REASONS, 0)
    if not periods or not n_entities or not n_time:
        return mask, counts
    label_values: dict[str, np.ndarray] = {}
    for period in periods:
        if period.group is not None and period.group != windows.group:
            continue
        in_time = (windows.timestamps >= period.start - margin) & (
            windows.timestamps <= period.end + margin
        )
        if not in_time.any():
            continue
        entities = np.ones(n_entities, dtype=bool)
        for label, value in period.labels.items():
            if label not in label_values:
                label_values[label] = np.array(
                    [entity.get(label) for entity in windows.entities], dtype=object
                )
            entities &= label_values[label] == value
        if not entities.any():
            continue
        cells = entities[:, None] & in_time[None, :]
        counts[period.reason] += int((cells & ~mask).sum())
        mask |= cells
    return mask, counts


def without_excluded(windows: Windows, mask: np.ndarray) -> Windows:
    """``windows`` with the excluded entity-steps unobserved (values NaN)."""
    if not mask.any():
        return windows
    observed = windows.observed & ~mask[:, :, None]
    values = np.where(observed, windows.values, np.nan).astype(windows.values.dtype)
    return replace(windows, values=values, observed=observed)
