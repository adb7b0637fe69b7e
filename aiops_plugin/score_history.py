"""A bounded, per-group history of the exported fused scores, one column per inference cycle.

The early warning reads the recent trend of each entity's fused score, and the root-cause
ranking reads every entity's score around an event's start. Both need more than the latest
step, and neither may grow without bound: the history keeps the last ``capacity`` cycles of
each group as one ``(entities, capacity)`` array (a ring), so appending a cycle writes one column
and reading returns the columns in time order.
"""

from __future__ import annotations

import numpy as np

from aiops_plugin.windows import EntityLabels


class ScoreHistory:
    """The last ``capacity`` cycles of one group's fused scores; NaN where an entity was not
    scored. Entities seen once keep their row (their newer columns are NaN) until ``forget``."""

    def __init__(self, capacity: int) -> None:
        if capacity < 2:
            raise ValueError(f"a score history needs at least 2 steps, got {capacity}")
        self.capacity = int(capacity)
        self.keys: list[str] = []
        self.labels: list[EntityLabels] = []
        self._index: dict[str, int] = {}
        self._scores = np.full((0, self.capacity), np.nan, dtype=np.float32)
        self._times = np.full(self.capacity, np.nan, dtype=np.float64)
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(
        self, timestamp: float, keys: list[str], labels: list[EntityLabels], scores: np.ndarray
    ) -> None:
        """One cycle: ``scores`` ``(len(keys),)``. A timestamp not after the last one replaces
        that column (a cycle re-run on the same step does not duplicate it)."""
        new = [key for key in keys if key not in self._index]
        if new:
            for key, entity in zip(keys, labels, strict=True):
                if key not in self._index:
                    self._index[key] = len(self.keys)
                    self.keys.append(key)
                    self.labels.append(entity)
            grown = np.full((len(self.keys), self.capacity), np.nan, dtype=np.float32)
            grown[: self._scores.shape[0]] = self._scores
            self._scores = grown
        if self._count and timestamp <= self._times[(self._next - 1) % self.capacity]:
            column = (self._next - 1) % self.capacity
        else:
            column = self._next
            self._next = (self._next + 1) % self.capacity
            self._count = min(self._count + 1, self.capacity)
        self._scores[:, column] = np.nan
        self._times[column] = timestamp
        rows = np.fromiter((self._index[key] for key in keys), dtype=np.int64, count=len(keys))
        self._scores[rows, column] = np.asarray(scores, dtype=np.float32)

    def window(self) -> tuple[np.ndarray, np.ndarray]:
        """``(timestamps (T,), scores (entities, T))`` in time order, rows in ``keys`` order."""
        order = (np.arange(self._next - self._count, self._next)) % self.capacity
        return self._times[order].copy(), self._scores[:, order].copy()

    def rows(self, keys: list[str], steps: int | None = None) -> np.ndarray:
        """``(len(keys), T)`` of the last ``steps`` cycles (all kept by default) for ``keys``;
        NaN rows for keys never seen."""
        _, scores = self.window()
        if steps is not None:
            scores = scores[:, -steps:] if steps > 0 else scores[:, :0]
        return self._for_keys(keys, scores)

    def rows_between(self, keys: list[str], start: float, end: float) -> np.ndarray:
        """``(len(keys), T)`` of the cycles with ``start <= timestamp < end``, in time order;
        NaN rows for keys never seen."""
        times, scores = self.window()
        return self._for_keys(keys, scores[:, (times >= start) & (times < end)])

    def _for_keys(self, keys: list[str], scores: np.ndarray) -> np.ndarray:
        out = np.full((len(keys), scores.shape[1]), np.nan, dtype=np.float32)
        rows = np.array([self._index.get(key, -1) for key in keys], dtype=np.int64)
        known = rows >= 0
        out[known] = scores[rows[known]]
        return out

    def forget(self, keep: set[str]) -> None:
        """Drop the rows of entities not in ``keep`` (e.g. after a refit without them)."""
        stay = [i for i, key in enumerate(self.keys) if key in keep]
        self.keys = [self.keys[i] for i in stay]
        self.labels = [self.labels[i] for i in stay]
        self._index = {key: i for i, key in enumerate(self.keys)}
        self._scores = self._scores[stay]
