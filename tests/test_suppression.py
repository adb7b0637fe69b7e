"""Suppression rules: anomalies outside a query's direction or below its size are not raised."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pydantic import ValidationError

from aiops_plugin.config import EntityGroupConfig, SuppressionRule
from aiops_plugin.suppression import (
    SUPPRESSION_REASONS,
    apply_suppression,
    expected_values,
    feature_rules,
)

GROUP = {"name": "node", "labels": ["instance"], "queries": {"cpu": "up", "mem": "up"}}


def column(*values: float) -> np.ndarray:
    """``(entities, 1)`` from one value per entity."""
    return np.array(values, dtype=np.float64)[:, None]


def test_direction_up_suppresses_a_drop_and_keeps_a_rise() -> None:
    result = apply_suppression(
        anomalous=np.array([True, True]),
        latest=column(5.0, 15.0),
        expected=column(10.0, 10.0),
        contributions=None,
        rules={0: SuppressionRule(direction="up")},
    )
    assert result.keep.tolist() == [False, True]
    assert result.reason.tolist() == ["direction", ""]


def test_direction_down_suppresses_no_change() -> None:
    result = apply_suppression(
        np.array([True]), column(10.0), column(10.0), None, {0: SuppressionRule(direction="down")}
    )
    assert result.keep.tolist() == [False]
    assert result.reason.tolist() == ["direction"]


def test_min_abs_deviation_suppresses_small_deviations_either_way() -> None:
    result = apply_suppression(
        anomalous=np.array([True, True, True]),
        latest=column(50.3, 52.0, 48.0),
        expected=column(50.0, 50.0, 50.0),
        contributions=None,
        rules={0: SuppressionRule(direction="both", min_abs_deviation=1.0)},
    )
    assert result.keep.tolist() == [False, True, True]
    assert result.reason.tolist() == ["min_deviation", "", ""]


def test_min_rel_deviation_is_relative_to_the_expected_value() -> None:
    rule = SuppressionRule(min_rel_deviation=0.1)
    result = apply_suppression(
        anomalous=np.array([True, True, True]),
        latest=column(105.0, 115.0, 3.0),
        expected=column(100.0, 100.0, 2.0),
        contributions=None,
        rules={0: rule},
    )
    assert result.keep.tolist() == [False, True, True]
    assert result.reason.tolist() == ["min_deviation", "", ""]


def test_wrong_direction_and_too_small_on_different_features_is_min_deviation() -> None:
    rules = {0: SuppressionRule(direction="up"), 1: SuppressionRule(min_abs_deviation=5.0)}
    result = apply_suppression(
        np.array([True]), np.array([[9.0, 11.0]]), np.array([[10.0, 10.0]]), None, rules
    )
    assert result.keep.tolist() == [False]
    assert result.reason.tolist() == ["min_deviation"]


def test_an_explaining_feature_without_a_rule_keeps_the_anomaly() -> None:
    result = apply_suppression(
        anomalous=np.array([True]),
        latest=np.array([[5.0, 1.0]]),
        expected=np.array([[10.0, 1.0]]),
        contributions=None,
        rules={0: SuppressionRule(direction="up")},
    )
    assert result.keep.tolist() == [True]
    assert result.reason.tolist() == [""]


def test_only_features_with_an_above_average_share_explain() -> None:
    latest = np.array([[5.0, 1.0], [5.0, 1.0]])
    expected = np.array([[10.0, 1.0], [10.0, 1.0]])
    contributions = np.array([[0.95, 0.05], [0.4, 0.6]])
    result = apply_suppression(
        np.array([True, True]),
        latest,
        expected,
        contributions,
        {0: SuppressionRule(direction="up")},
    )
    assert result.keep.tolist() == [False, True]
    assert result.reason.tolist() == ["direction", ""]


def test_equal_shares_all_explain() -> None:
    contributions = np.full((1, 3), 1 / 3, dtype=np.float32)
    result = apply_suppression(
        np.array([True]),
        np.array([[5.0, 1.0, 1.0]]),
        np.array([[10.0, 1.0, 1.0]]),
        contributions,
        {0: SuppressionRule(direction="up")},
    )
    assert result.keep.tolist() == [True]


def test_without_finite_shares_every_feature_explains() -> None:
    result = apply_suppression(
        np.array([True, True]),
        np.array([[5.0, 1.0], [5.0, 1.0]]),
        np.array([[10.0, 1.0], [10.0, 1.0]]),
        np.array([[np.nan, np.nan], [1.0, np.nan]]),
        {0: SuppressionRule(direction="up")},
    )
    assert result.keep.tolist() == [True, False]


def test_missing_latest_or_expected_value_keeps_the_anomaly() -> None:
    result = apply_suppression(
        anomalous=np.array([True, True]),
        latest=column(np.nan, 5.0),
        expected=column(10.0, np.nan),
        contributions=None,
        rules={0: SuppressionRule(direction="up", min_abs_deviation=100.0)},
    )
    assert result.keep.tolist() == [True, True]
    assert result.reason.tolist() == ["", ""]


def test_entities_that_are_not_anomalous_are_untouched() -> None:
    result = apply_suppression(
        anomalous=np.array([False, True]),
        latest=column(5.0, 5.0),
        expected=column(10.0, 10.0),
        contributions=None,
        rules={0: SuppressionRule(direction="up")},
    )
    assert result.keep.tolist() == [True, False]
    assert result.reason.tolist() == ["", "direction"]


def test_no_rules_keeps_everything() -> None:
    result = apply_suppression(
        np.array([True, True]), column(5.0, 5.0), column(10.0, 1.0), None, {}
    )
    assert result.keep.all()
    assert result.counts() == {"direction": 0, "min_deviation": 0}


def test_counts_suppressed_entities_per_reason() -> None:
    result = apply_suppression(
        anomalous=np.array([True, True, True, True, False]),
        latest=column(5.0, 4.0, 10.5, 20.0, 5.0),
        expected=column(10.0, 10.0, 10.0, 10.0, 10.0),
        contributions=None,
        rules={0: SuppressionRule(direction="up", min_abs_deviation=1.0)},
    )
    assert result.keep.tolist() == [False, False, False, True, True]
    assert result.counts() == {"direction": 2, "min_deviation": 1}
    assert set(result.counts()) == set(SUPPRESSION_REASONS)


def test_feature_rules_match_the_query_and_its_labelled_series() -> None:
    cpu = SuppressionRule(direction="up")
    disk = SuppressionRule(min_abs_deviation=1.0)
    features = [
        "cpu",
        'cpu{mode="idle"}',
        "cpu_total",
        "disk",
        'disk{device="sda",mountpoint="/"}',
        "mem",
    ]
    mapped = feature_rules(features, {"cpu": cpu, "disk": disk})
    assert mapped == {0: cpu, 1: cpu, 3: disk, 4: disk}


def test_expected_value_is_the_median_of_observed_history_before_the_latest_step() -> None:
    values = np.array([[[1.0, 7.0], [3.0, 7.0], [100.0, 7.0], [50.0, 9.0]]])
    observed = np.array([[[True, False], [True, False], [False, False], [True, True]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = expected_values(values, observed)
    assert expected.shape == (1, 2)
    assert expected[0, 0] == 2.0
    assert np.isnan(expected[0, 1])


def test_suppress_must_name_a_query_of_the_group() -> None:
    with pytest.raises(ValidationError, match=r"\['disk'\].*\['cpu', 'mem'\]"):
        EntityGroupConfig.model_validate({**GROUP, "suppress": {"disk": {"direction": "up"}}})


def test_suppress_rules_are_validated() -> None:
    with pytest.raises(ValidationError, match="min_abs_deviation"):
        EntityGroupConfig.model_validate({**GROUP, "suppress": {"cpu": {"min_abs_deviation": -1}}})
    with pytest.raises(ValidationError, match="direction"):
        EntityGroupConfig.model_validate({**GROUP, "suppress": {"cpu": {"direction": "sideways"}}})


def test_valid_suppress_rules_load_with_defaults() -> None:
    group = EntityGroupConfig.model_validate(
        {**GROUP, "suppress": {"cpu": {"direction": "up", "min_abs_deviation": 1.0}}}
    )
    rule = group.suppress["cpu"]
    assert (rule.direction, rule.min_abs_deviation, rule.min_rel_deviation) == ("up", 1.0, 0.0)
    assert EntityGroupConfig.model_validate(GROUP).suppress == {}
