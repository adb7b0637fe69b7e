"""The reader's assembly and the agent's rolling buffer stay linear and bounded.

At 10k entities x 40 features a group read is 400k series and the buffer is refreshed every
cycle, so both must be linear in what they hold, and entities that are gone (pods replaced by a
rolling deploy) must leave the buffer instead of accumulating forever.
"""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from aiops_plugin.config import EntityGroupConfig
from aiops_plugin.sources import prometheus
from aiops_plugin.sources.prometheus import assemble_windows, merge_windows
from aiops_plugin.windows import Windows, entity_key


class _CountingSet(set):
    """``set`` that records how many elements every construction consumed."""

    consumed = 0

    def __init__(self, iterable=()) -> None:  # noqa: ANN001 - mirrors set()
        items = list(iterable)
        type(self).consumed += len(items)
        super().__init__(items)


def _series(n_entities: int, n_features: int, n_time: int):
    labels = {}
    series = {}
    for e in range(n_entities):
        entity = {"pod": f"pod-{e:05d}"}
        key = entity_key(entity)
        labels[key] = entity
        for f in range(n_features):
            series[(key, f'q{{cpu="{f}"}}')] = np.arange(n_time, dtype=np.float32) + e + f
    return series, labels


def test_assembly_work_grows_linearly_with_entities_and_series(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rebuilding a set of every entity for each series made a read quadratic (1.1 s at
    2000 x 10, ~100 s extrapolated at 10k x 38, longer than a cycle)."""
    group = EntityGroupConfig(name="pods", labels=["pod"], queries={"q": "x"}, max_entities=10**6)
    monkeypatch.setattr(prometheus, "set", _CountingSet, raising=False)
    _CountingSet.consumed = 0
    n_entities, n_features = 400, 5
    series, labels = _series(n_entities, n_features, n_time=3)
    windows, dropped = assemble_windows(group, series, labels, 0.0, 60.0, 3)
    assert windows is not None and dropped == 0
    assert windows.values.shape == (n_entities, 3, n_features)
    assert windows.values[7, 2, 3] == 7 + 3 + 2
    # linear: a constant number of passes over the entities and the series, not their product
    assert _CountingSet.consumed <= 2 * (n_entities + len(series)), _CountingSet.consumed
    assert builtins.set is not _CountingSet


def _pods_read(names: list[str], t: int) -> Windows:
    values = np.full((len(names), 1, 2), float(t), dtype=np.float32)
    return Windows(
        group="pods",
        values=values,
        observed=np.ones(values.shape, dtype=bool),
        timestamps=np.array([60.0 * t]),
        entities=[{"pod": name} for name in names],
        features=["cpu", "mem"],
        step=60.0,
    )


def test_buffer_drops_entities_that_vanished_during_a_rolling_deploy() -> None:
    """300 cycles of 10 pods, 2 of them replaced every 5 cycles: the buffer holds the live pods
    plus those replaced within the kept span, never every pod ever seen (128 rows before)."""
    keep_steps = 30
    pods = [f"pod-{i}" for i in range(10)]
    next_name = 10
    buffer = None
    for cycle in range(300):
        if cycle and cycle % 5 == 0:
            for slot in (cycle // 5 % 10, (cycle // 5 + 5) % 10):
                pods[slot] = f"pod-{next_name}"
                next_name += 1
        buffer = merge_windows(buffer, _pods_read(pods, cycle), keep_steps)
    assert buffer is not None
    assert buffer.values.shape[1] == keep_steps
    replaced_in_span = 2 * (keep_steps // 5 + 1)
    assert len(buffer.entities) <= len(pods) + replaced_in_span
    assert buffer.observed.any(axis=(1, 2)).all(), "an entity without data stayed in the buffer"
    assert {labels["pod"] for labels in buffer.entities} >= set(pods)


def test_buffer_keeps_an_entity_with_a_gap_while_it_has_data_in_the_span() -> None:
    buffer = merge_windows(None, _pods_read(["a", "b"], 0), 10)
    for t in range(1, 5):
        buffer = merge_windows(buffer, _pods_read(["a"], t), 10)
    assert [labels["pod"] for labels in buffer.entities] == ["a", "b"]
    assert not buffer.observed[1, 1:].any()
    for t in range(5, 15):
        buffer = merge_windows(buffer, _pods_read(["a"], t), 10)
    assert [labels["pod"] for labels in buffer.entities] == ["a"]
