"""The exporter's metric contract, read from ``/metrics`` text as Prometheus would parse it."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from aiops_plugin.exporter import Exporter, GroupSnapshot
from aiops_plugin.suppression import SUPPRESSION_REASONS

PODS = [
    {"namespace": "shop", "pod": "checkout-7d9f"},
    {"namespace": "shop", "pod": "cart-5c8b"},
    {"namespace": "shop", "pod": "ads-9f3d"},
]


def _snapshot(probability: np.ndarray | None, group: str = "pods") -> GroupSnapshot:
    return GroupSnapshot(
        group=group,
        entities=PODS,
        features=["cpu"],
        timestamp=1_700_000_000.0,
        scores={
            "mad": np.array([2.0, 0.5, 0.1]),
            "fused": np.array([1.8, 0.4, np.nan]),
        },
        probability=probability,
    )


def _families(exporter: Exporter) -> dict[str, tuple[str, list[Sample]]]:
    """Family name -> (help text, samples) of what ``/metrics`` serves; a counter's family name
    drops ``_total``."""
    text = exporter.exposition().decode()
    return {
        family.name: (family.documentation, family.samples)
        for family in text_string_to_metric_families(text)
    }


def _samples(exporter: Exporter, family: str) -> list[Sample]:
    return _families(exporter).get(family, ("", []))[1]


def test_probability_has_the_score_labels_without_detector() -> None:
    exporter = Exporter()
    exporter.publish(_snapshot(np.array([0.97, 0.02, 0.5])))

    probability = {s.labels["pod"]: s for s in _samples(exporter, "aiops_anomaly_probability")}
    assert {pod: s.value for pod, s in probability.items()} == {
        "checkout-7d9f": 0.97,
        "cart-5c8b": 0.02,
        "ads-9f3d": 0.5,
    }
    scores = _samples(exporter, "aiops_anomaly_score")
    for sample in scores:
        expected = {k: v for k, v in sample.labels.items() if k != "detector"}
        assert probability[sample.labels["pod"]].labels == expected
    assert probability["checkout-7d9f"].labels == {
        "namespace": "shop",
        "pod": "checkout-7d9f",
        "entity": "shop/checkout-7d9f",
        "entity_group": "pods",
    }


def test_probability_help_says_it_is_calibrated_from_the_fused_p_value() -> None:
    exporter = Exporter()
    exporter.publish(_snapshot(np.array([0.97, 0.02, 0.5])))
    documentation, _ = _families(exporter)["aiops_anomaly_probability"]
    assert "anomalous now" in documentation
    assert "fused p-value" in documentation


def test_nan_probability_is_not_emitted() -> None:
    exporter = Exporter()
    exporter.publish(_snapshot(np.array([0.97, np.nan, 0.5])))
    pods = {s.labels["pod"] for s in _samples(exporter, "aiops_anomaly_probability")}
    assert pods == {"checkout-7d9f", "ads-9f3d"}


def test_snapshot_without_probability_exports_none() -> None:
    exporter = Exporter()
    exporter.publish(_snapshot(None))
    assert "aiops_anomaly_probability" not in _families(exporter)
    assert _samples(exporter, "aiops_anomaly_score")


def test_withdrawing_a_group_removes_its_probability_and_scores_only() -> None:
    exporter = Exporter()
    exporter.publish(_snapshot(np.array([0.97, 0.02, 0.5]), group="pods"))
    exporter.publish(_snapshot(np.array([0.1, 0.2, 0.3]), group="hosts"))

    exporter.withdraw("pods")

    for family in ("aiops_anomaly_probability", "aiops_anomaly_score"):
        assert {s.labels["entity_group"] for s in _samples(exporter, family)} == {"hosts"}


def _counter(exporter: Exporter, name: str, **labels: str) -> float | None:
    family = name.removesuffix("_total")
    for sample in _samples(exporter, family):
        if sample.name == name and sample.labels == labels:
            return sample.value
    return None


def test_declared_groups_start_the_anomaly_counters_at_zero() -> None:
    exporter = Exporter()
    exporter.declare_groups(["pods", "hosts"])
    for group in ("pods", "hosts"):
        assert _counter(exporter, "aiops_anomalous_steps_total", entity_group=group) == 0
        for reason in SUPPRESSION_REASONS:
            assert (
                _counter(
                    exporter, "aiops_anomalies_suppressed_total", entity_group=group, reason=reason
                )
                == 0
            )
    suppressed = _samples(exporter, "aiops_anomalies_suppressed")
    assert {s.labels["reason"] for s in suppressed} == {"direction", "min_deviation"}


def test_count_suppression_adds_each_cycle_to_the_group_counters() -> None:
    exporter = Exporter()
    exporter.declare_groups(["pods", "hosts"])

    exporter.count_suppression("pods", 5, {"direction": 2, "min_deviation": 1})
    exporter.count_suppression("pods", 3, {"direction": 0, "min_deviation": 2})

    assert _counter(exporter, "aiops_anomalous_steps_total", entity_group="pods") == 8
    assert (
        _counter(
            exporter, "aiops_anomalies_suppressed_total", entity_group="pods", reason="direction"
        )
        == 2
    )
    assert (
        _counter(
            exporter,
            "aiops_anomalies_suppressed_total",
            entity_group="pods",
            reason="min_deviation",
        )
        == 3
    )
    assert _counter(exporter, "aiops_anomalous_steps_total", entity_group="hosts") == 0


def test_count_suppression_rejects_an_unknown_reason() -> None:
    exporter = Exporter()
    with pytest.raises(ValueError, match="too_quiet"):
        exporter.count_suppression("pods", 1, {"too_quiet": 1})
    assert _counter(exporter, "aiops_anomalous_steps_total", entity_group="pods") is None


def _parsed(text: bytes) -> dict[str, list[tuple]]:
    """Family -> its samples as sorted (name, labels, value) tuples: order-free comparison."""
    return {
        family.name: sorted(
            (sample.name, sorted(sample.labels.items()), sample.value) for sample in family.samples
        )
        for family in text_string_to_metric_families(text.decode())
    }


def test_a_scrape_serves_the_rendered_families_until_they_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-entity families are rendered once per change and copied into every scrape;
    what a scrape serves is exactly what rendering everything now would give, before and after
    a change, and self-monitoring values are always current."""
    exporter = Exporter()
    exporter.publish(_snapshot(np.array([0.97, 0.02, 0.5])))
    exporter.render()
    renders = []
    original = exporter._entity_registry.collect
    monkeypatch.setattr(
        exporter._entity_registry, "collect", lambda: renders.append(1) or original()
    )
    first = exporter.exposition()
    exporter.last_success.set(123.0)
    second = exporter.exposition()
    assert renders == []  # nothing changed: both scrapes copied the rendered bytes
    everything_now = _parsed(generate_latest(exporter.registry))
    assert _parsed(second) == everything_now
    assert _parsed(first) | {"aiops_cycle_last_success_timestamp_seconds": []} == (
        everything_now | {"aiops_cycle_last_success_timestamp_seconds": []}
    )
    renders.clear()
    assert _parsed(second)["aiops_cycle_last_success_timestamp_seconds"][0][2] == 123.0
    exporter.publish(_snapshot(np.array([0.5, 0.5, 0.5])))
    third = exporter.exposition()  # changed and not rendered yet: rendered for this scrape
    assert renders == [1]
    assert _parsed(third) == _parsed(generate_latest(exporter.registry))
    assert {value for *_, value in _parsed(third)["aiops_anomaly_probability"]} == {0.5}
    exporter.withdraw("pods")
    assert "aiops_anomaly_probability" not in _parsed(exporter.exposition())


def test_early_warning_probability_and_score_per_horizon() -> None:
    """Both early-warning series carry the entity's labels and the horizon; NaN is left out."""
    snapshot = _snapshot(np.array([0.97, 0.02, 0.5]))
    snapshot.early_warning = np.array([[0.9, 0.95], [0.1, np.nan], [0.3, 0.4]])
    snapshot.early_warning_score = np.array([[1.4, 2.0], [0.2, np.nan], [np.nan, 0.6]])
    snapshot.horizons_seconds = [300.0, 900.0]
    exporter = Exporter()
    exporter.publish(snapshot)

    def by_entity(name: str) -> dict[tuple[str, str], float]:
        return {(s.labels["pod"], s.labels["horizon"]): s.value for s in _samples(exporter, name)}

    assert by_entity("aiops_early_warning_probability") == {
        ("checkout-7d9f", "5m"): 0.9,
        ("checkout-7d9f", "15m"): 0.95,
        ("cart-5c8b", "5m"): 0.1,
        ("ads-9f3d", "5m"): 0.3,
        ("ads-9f3d", "15m"): 0.4,
    }
    assert by_entity("aiops_early_warning_score") == {
        ("checkout-7d9f", "5m"): 1.4,
        ("checkout-7d9f", "15m"): 2.0,
        ("cart-5c8b", "5m"): 0.2,
        ("ads-9f3d", "15m"): 0.6,
    }
    (sample, *_) = _samples(exporter, "aiops_early_warning_score")
    assert set(sample.labels) == {"namespace", "pod", "entity", "entity_group", "horizon"}
    documentation, _ = _families(exporter)["aiops_early_warning_score"]
    assert "false-alarm rate" in documentation
