"""The bounded per-group history of fused scores behind the early-warning trend and the
root-cause ranking."""

from __future__ import annotations

import numpy as np
import pytest

from aiops_plugin.score_history import ScoreHistory


def test_keeps_the_last_capacity_cycles_in_time_order() -> None:
    history = ScoreHistory(3)
    for t in range(5):
        history.append(float(t), ["a", "b"], [{"e": "a"}, {"e": "b"}], np.array([t, 10 + t]))
    times, scores = history.window()
    assert times.tolist() == [2.0, 3.0, 4.0]
    assert scores.tolist() == [[2, 3, 4], [12, 13, 14]]
    assert len(history) == 3


def test_new_and_missing_entities_are_nan_where_not_scored() -> None:
    history = ScoreHistory(4)
    history.append(0.0, ["a"], [{"e": "a"}], np.array([1.0]))
    history.append(1.0, ["b"], [{"e": "b"}], np.array([2.0]))
    rows = history.rows(["a", "b", "never"])
    assert np.isnan(rows[0, 1]) and rows[0, 0] == 1.0
    assert np.isnan(rows[1, 0]) and rows[1, 1] == 2.0
    assert np.isnan(rows[2]).all()
    assert history.rows(["a"], steps=1).shape == (1, 1)


def test_rows_between_keep_the_cycles_from_start_up_to_not_including_end() -> None:
    history = ScoreHistory(5)
    for t in range(5):
        history.append(10.0 * t, ["a"], [{"e": "a"}], np.array([float(t)]))
    assert history.rows_between(["a", "never"], 10.0, 40.0)[0].tolist() == [1.0, 2.0, 3.0]
    assert np.isnan(history.rows_between(["never"], 10.0, 40.0)).all()
    assert history.rows_between(["a"], 41.0, 99.0).shape == (1, 0)


def test_a_cycle_on_the_same_step_replaces_its_column() -> None:
    history = ScoreHistory(4)
    history.append(5.0, ["a"], [{"e": "a"}], np.array([1.0]))
    history.append(5.0, ["a"], [{"e": "a"}], np.array([3.0]))
    times, scores = history.window()
    assert times.tolist() == [5.0] and scores.tolist() == [[3.0]]


def test_forget_drops_rows_and_capacity_is_checked() -> None:
    history = ScoreHistory(2)
    history.append(0.0, ["a", "b"], [{"e": "a"}, {"e": "b"}], np.array([1.0, 2.0]))
    history.forget({"b"})
    assert history.keys == ["b"] and history.rows(["b"]).tolist() == [[2.0]]
    with pytest.raises(ValueError):
        ScoreHistory(1)
