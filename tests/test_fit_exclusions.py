"""Periods left out of the fit: ALERTS firing runs, maintenance windows, confirmed incidents,
as a mask over the fit read's entity-steps."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from aiops_plugin.config import FitExclusionsConfig
from aiops_plugin.fit_exclusions import (
    ExcludedPeriod,
    alert_periods,
    exclusion_mask,
    incident_periods,
    maintenance_periods,
    without_excluded,
)
from aiops_plugin.windows import Windows

STEP = 60.0


def windows(n_time: int = 20) -> Windows:
    values = np.arange(3 * n_time * 2, dtype=np.float32).reshape(3, n_time, 2)
    return Windows.from_array(
        values,
        group="pods",
        step=STEP,
        entities=[
            {"namespace": "shop", "pod": "a"},
            {"namespace": "shop", "pod": "b"},
            {"namespace": "bank", "pod": "c"},
        ],
        features=["cpu", "mem"],
        start=0.0,
    )


def test_alert_series_become_one_period_per_run_of_firing_samples() -> None:
    series = [
        {
            "metric": {
                "alertname": "AiopsAnomalyDetected",
                "entity_group": "pods",
                "namespace": "shop",
                "pod": "a",
            },
            "values": [[t, "1"] for t in (120, 180, 240, 600, 660)],
        },
        {  # another group's alert, and one without the identifying labels
            "metric": {
                "alertname": "AiopsAnomalyDetected",
                "entity_group": "hosts",
                "namespace": "shop",
                "pod": "a",
            },
            "values": [[0, "1"]],
        },
        {
            "metric": {"alertname": "AiopsAnomalyDetected", "entity_group": "pods"},
            "values": [[0, "1"]],
        },
    ]
    periods = alert_periods(series, "pods", ["namespace", "pod"], STEP)
    assert [(p.start, p.end, p.reason) for p in periods] == [
        (120.0, 240.0, "alert"),
        (600.0, 660.0, "alert"),
    ]
    assert periods[0].labels == {"namespace": "shop", "pod": "a"}


def test_mask_covers_the_named_entities_with_the_margin_and_counts_by_reason() -> None:
    read = windows()
    periods = [
        ExcludedPeriod(120.0, 240.0, "alert", "pods", {"namespace": "shop", "pod": "a"}),
        ExcludedPeriod(600.0, 600.0, "maintenance", None, {"namespace": "shop"}),
        ExcludedPeriod(0.0, 1e9, "maintenance", "other-group"),
    ]
    mask, counts = exclusion_mask(read, periods, margin=60.0)
    # entity a: 60..300 (5 steps) and 540..660 (3 steps); b: 540..660; c: nothing
    assert mask.sum(axis=1).tolist() == [8, 3, 0]
    assert counts == {"alert": 5, "maintenance": 6, "confirmed_incident": 0}
    assert mask[0, 1] and mask[0, 5] and not mask[0, 6]


def test_excluded_steps_become_unobserved_and_nothing_else_changes() -> None:
    read = windows()
    mask, _ = exclusion_mask(read, [ExcludedPeriod(0.0, 60.0, "alert", "pods")], margin=0.0)
    out = without_excluded(read, mask)
    assert not out.observed[:, :2].any() and np.isnan(out.values[:, :2]).all()
    np.testing.assert_array_equal(out.values[:, 2:], read.values[:, 2:])
    assert read.observed.all(), "the input windows are left as they were"


def test_maintenance_windows_and_incidents_from_their_sources() -> None:
    settings = FitExclusionsConfig.model_validate(
        {
            "maintenance_windows": [
                {
                    "start": "2026-12-01T02:00:00Z",
                    "end": "2026-12-01T03:00:00Z",
                    "group": "pods",
                    "labels": {"namespace": "shop"},
                }
            ]
        }
    )
    (window,) = maintenance_periods(settings)
    assert window.start == datetime(2026, 12, 1, 2, tzinfo=UTC).timestamp()
    assert (window.group, window.labels, window.reason) == (
        "pods",
        {"namespace": "shop"},
        "maintenance",
    )
    (still_open,) = incident_periods([(100.0, None, "pods", {"pod": "a"})], now=500.0)
    assert (still_open.start, still_open.end, still_open.reason) == (
        100.0,
        500.0,
        "confirmed_incident",
    )


def test_a_maintenance_window_needs_a_time_zone_and_an_order() -> None:
    with pytest.raises(ValueError, match="time zone"):
        FitExclusionsConfig.model_validate(
            {
                "maintenance_windows": [
                    {"start": "2026-12-01T02:00:00", "end": "2026-12-01T03:00:00"}
                ]
            }
        )
    with pytest.raises(ValueError, match="after start"):
        FitExclusionsConfig.model_validate(
            {
                "maintenance_windows": [
                    {"start": "2026-12-01T03:00:00Z", "end": "2026-12-01T02:00:00Z"}
                ]
            }
        )
