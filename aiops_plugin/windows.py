"""The one container that travels from the reader through the detectors to the exporter.

``Windows`` keeps values, the missing-data mask, the step grid and the entity identities together
so that no function takes five parallel arrays and no two of them drift out of order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

EntityLabels = dict[str, str]


def entity_key(labels: EntityLabels) -> str:
    """Canonical, order-independent string for an entity's identifying labels."""
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def entity_display_name(labels: EntityLabels) -> str:
    """Short human-readable name (label values joined by '/'), used for the ``entity`` label."""
    return "/".join(labels[name] for name in sorted(labels))


@dataclass
class LogInputs:
    """Per-step log features of a :class:`Windows`' entities, on the same entity x step grid.

    Built in the agent's ``features`` phase (and at fit time, after the group's log model) from
    the log pipeline (:meth:`aiops_plugin.logs.pipeline.LogPipeline.step_inputs`), so a detector
    that reads logs sees them aligned with the metrics, step for step.

    Attributes:
        values: float32 ``(entities, time, log_features)``: record counts (0 where no record
            arrived), template divergence and the language-model embedding summary (NaN where
            the step had no record: nothing to summarise).
        features: names of axis 2.
        has_logs: bool ``(entities,)``: the entity has a log model or records; a detector reads
            the metrics alone for the others.
    """

    values: np.ndarray
    features: list[str]
    has_logs: np.ndarray

    def __post_init__(self) -> None:
        if self.values.ndim != 3 or self.values.shape[2] != len(self.features):
            raise ValueError(
                f"log inputs of shape {self.values.shape} do not match {len(self.features)} "
                "log features"
            )
        if self.has_logs.shape != (self.values.shape[0],):
            raise ValueError(f"has_logs shape {self.has_logs.shape} != ({self.values.shape[0]},)")

    def steps(self, index: slice) -> LogInputs:
        return LogInputs(self.values[:, index], self.features, self.has_logs)

    def entities(self, indices: list[int]) -> LogInputs:
        return LogInputs(self.values[indices], self.features, self.has_logs[indices])


@dataclass
class Windows:
    """Aligned multivariate series of one entity group.

    Attributes:
        group: entity group name from the configuration.
        values: float32 array ``(entities, time, features)``; NaN where no sample exists.
        observed: bool array of the same shape; False where the value is missing (a gap,
            a series that disappeared, a failed query). Never imputed silently.
        timestamps: float64 array ``(time,)`` of step-grid times, Unix seconds.
        entities: identifying labels of each entity, in the order of axis 0.
        features: feature names, in the order of axis 2.
        step: seconds between grid points.
        logs: the entities' log features on the same grid, or None (no log side for the
            group, or no detector of it reads logs).
    """

    group: str
    values: np.ndarray
    observed: np.ndarray
    timestamps: np.ndarray
    entities: list[EntityLabels]
    features: list[str]
    step: float
    notes: dict[str, str] = field(default_factory=dict)
    logs: LogInputs | None = None

    def __post_init__(self) -> None:
        n_entities, n_time, n_features = self.values.shape
        if self.logs is not None and self.logs.values.shape[:2] != (n_entities, n_time):
            raise ValueError(
                f"log inputs cover {self.logs.values.shape[:2]} entity-steps, the metrics "
                f"{(n_entities, n_time)}"
            )
        if self.observed.shape != self.values.shape:
            raise ValueError(f"mask shape {self.observed.shape} != values {self.values.shape}")
        if self.timestamps.shape != (n_time,):
            raise ValueError(f"timestamps shape {self.timestamps.shape} != ({n_time},)")
        if len(self.entities) != n_entities or len(self.features) != n_features:
            raise ValueError("entity or feature names do not match the values' shape")

    @cached_property
    def keys(self) -> list[str]:
        """:func:`entity_key` of each entity, computed once (50 ms at 10k entities, and read by
        every phase of a cycle); ``entities`` is never changed in place, a new ``Windows`` is
        made instead."""
        return [entity_key(labels) for labels in self.entities]

    def with_logs(self, logs: LogInputs | None) -> Windows:
        """The same metrics joined with ``logs`` (same entities and steps)."""
        return replace(self, logs=logs)

    @classmethod
    def from_array(
        cls,
        values: np.ndarray,
        *,
        group: str = "series",
        step: float = 60.0,
        start: float = 0.0,
        entities: list[EntityLabels] | None = None,
        features: list[str] | None = None,
    ) -> Windows:
        """Windows from a plain array ``(entities, time, features)``; NaN marks missing values."""
        values = np.asarray(values, dtype=np.float32)
        if values.ndim == 2:
            values = values[None]
        n_entities, n_time, n_features = values.shape
        return cls(
            group=group,
            values=values,
            observed=~np.isnan(values),
            timestamps=start + step * np.arange(n_time, dtype=np.float64),
            entities=entities or [{"entity": str(i)} for i in range(n_entities)],
            features=features or [f"f{j}" for j in range(n_features)],
            step=step,
        )

    def select_entities(self, indices: list[int] | np.ndarray) -> Windows:
        indices = list(indices)
        return Windows(
            group=self.group,
            values=self.values[indices],
            observed=self.observed[indices],
            timestamps=self.timestamps,
            entities=[self.entities[i] for i in indices],
            features=self.features,
            step=self.step,
            logs=self.logs.entities(indices) if self.logs is not None else None,
        )

    def head(self, steps: int) -> Windows:
        """The first ``steps`` steps (the training part of a fit window)."""
        return Windows(
            group=self.group,
            values=self.values[:, :steps],
            observed=self.observed[:, :steps],
            timestamps=self.timestamps[:steps],
            entities=self.entities,
            features=self.features,
            step=self.step,
            logs=self.logs.steps(slice(None, steps)) if self.logs is not None else None,
        )

    def tail(self, steps: int) -> Windows:
        return Windows(
            group=self.group,
            values=self.values[:, -steps:],
            observed=self.observed[:, -steps:],
            timestamps=self.timestamps[-steps:],
            entities=self.entities,
            features=self.features,
            step=self.step,
            logs=self.logs.steps(slice(-steps, None)) if self.logs is not None else None,
        )

    def reindex_features(self, features: list[str]) -> Windows:
        """The same data laid out on another feature list (a fitted model's); absent features
        become missing (NaN, unobserved), extra ones are dropped."""
        position = {name: j for j, name in enumerate(self.features)}
        n_entities, n_time, _ = self.values.shape
        values = np.full((n_entities, n_time, len(features)), np.nan, dtype=np.float32)
        observed = np.zeros(values.shape, dtype=bool)
        for j, name in enumerate(features):
            if name in position:
                values[:, :, j] = self.values[:, :, position[name]]
                observed[:, :, j] = self.observed[:, :, position[name]]
        return Windows(
            group=self.group,
            values=values,
            observed=observed,
            timestamps=self.timestamps,
            entities=self.entities,
            features=list(features),
            step=self.step,
            logs=self.logs,
        )
