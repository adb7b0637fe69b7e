"""The agent against a real Prometheus holding real SMD history: reads, fit, infer, export.

History: machine-1-7 of the shipped SMD sample, one row per second, plus a second entity (the
same machine's rows shifted by 1000 steps) and a third whose series stop 10 minutes before the
end (a series that disappeared), and a fourth with a 2-minute hole at the end of its history.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aiops_plugin.agent import Agent, CycleFailed, StopRequested
from aiops_plugin.config import Config
from aiops_plugin.demo import (
    PrometheusServer,
    backfill,
    backfill_timestamps,
    free_port,
    load_demo_sample,
    write_openmetrics,
)
from aiops_plugin.sources.prometheus import (
    PrometheusReader,
    align_start,
    drop_stale_samples,
    feature_name,
    plan_chunks,
    sample_bounded_end,
)
from aiops_plugin.store import Store
from aiops_plugin.windows import entity_key

METRIC = "smd_metric_value"
ROWS = 2400
QUERY = f"sum by (instance, dim) ({METRIC})"


class History:
    def __init__(self, prometheus: PrometheusServer, end: float) -> None:
        self.prometheus = prometheus
        self.end = end


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    workdir = tmp_path_factory.mktemp("agent-history")
    sample = load_demo_sample()
    rows = sample.train[-ROWS:]
    end = time.time() - 2.0
    timestamps = backfill_timestamps(ROWS, end, 1.0)
    series = {
        "machine-1-7": rows,
        "machine-1-7-shifted": np.roll(rows, 1000, axis=0),
        "vanished": np.where(np.arange(ROWS)[:, None] < ROWS - 600, rows, np.nan),
        "holey": np.where(np.arange(ROWS)[:, None] < ROWS - 120, rows, np.nan),
    }
    tsdb = workdir / "tsdb"
    for i, (instance, values) in enumerate(series.items()):
        path = workdir / f"history-{i}.om"
        labels = {"instance": instance, "job": "smd"}
        write_openmetrics(path, METRIC, labels, "dim", sample.feature_names, values, timestamps)
        backfill(path, tsdb)
    with PrometheusServer(tsdb_dir=tsdb, workdir=workdir / "prometheus") as prometheus:
        prometheus.start()
        yield History(prometheus, end)


def make_config(url: str, tmp_path: Path, **overrides) -> Config:
    raw = {
        "prometheus": {"url": url, "step": "1s", "timeout": "5s", "retries": 1, "backoff": "0.1s"},
        "entities": [{"name": "smd", "labels": ["instance"], "queries": {"smd": QUERY}}],
        "detectors": {"device": "cpu", "mad": {"window": 30}},
        "schedule": {"fit_window": f"{ROWS - 1}s", "infer_every": "1s"},
        "store": {"data_dir": str(tmp_path / "data")},
        "server": {"host": "127.0.0.1", "port": free_port()},
    }
    raw.update(overrides)
    return Config.model_validate(raw)


def exported(agent: Agent) -> dict[str, list]:
    text = generate_latest(agent.exporter.registry).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def scores_by_instance(agent: Agent, detector: str = "fused") -> dict[str, float]:
    samples = exported(agent)["aiops_anomaly_score"]
    return {s.labels["instance"]: s.value for s in samples if s.labels["detector"] == detector}


@pytest.fixture
def fitted_agent(history: History, tmp_path: Path) -> Iterator[Agent]:
    agent = Agent(make_config(history.prometheus.url, tmp_path))
    agent.start_up()
    agent.fit(now=history.end)
    yield agent
    agent.store.close()


def test_reader_chunks_long_ranges_without_changing_the_result(history: History) -> None:
    config = make_config(history.prometheus.url, Path("/tmp"))
    group = config.entities[0]
    whole = PrometheusReader(config.prometheus).read_range(group, history.end - 1500, history.end)
    config.prometheus.max_points_per_request = 100
    assert len(plan_chunks(history.end - 1500, history.end, 1.0, 100)) == 16
    chunked = PrometheusReader(config.prometheus).read_range(group, history.end - 1500, history.end)
    assert whole.windows is not None and chunked.windows is not None
    assert whole.windows.values.shape == (4, 1501, 38)
    np.testing.assert_array_equal(whole.windows.values, chunked.windows.values)


def test_reads_of_many_series_are_split_by_samples_without_changing_the_result(
    history: History,
) -> None:
    """4 entities x 38 series: at most 1000 samples a request is 6 points a chunk (after a
    first chunk sized for the group's bounds); the block read is the same."""
    config = make_config(history.prometheus.url, Path("/tmp"))
    group = config.entities[0]
    whole = PrometheusReader(config.prometheus).read_range(group, history.end - 600, history.end)
    config.prometheus.max_samples_per_request = 1000
    reader = PrometheusReader(config.prometheus)
    requests = []
    original = reader._range_answer

    def counted(promql: str, start: float, end: float, post: bool = False) -> Iterator[dict]:
        answer = list(original(promql, start, end, post))
        requests.append((end - start + 1, sum(len(item["values"]) for item in answer)))
        return iter(answer)

    reader._range_answer = counted
    split = reader.read_range(group, history.end - 600, history.end)
    assert whole.windows is not None and split.windows is not None
    np.testing.assert_array_equal(whole.windows.values, split.windows.values)
    assert len(requests) > 600 // 7 and max(samples for _, samples in requests) <= 1000
    assert sample_bounded_end(0.0, 100.0, 1.0, 152, 11000, 1000) == 5.0
    assert sample_bounded_end(0.0, 3.0, 1.0, 152, 11000, 1000) == 3.0
    assert sample_bounded_end(0.0, 100.0, 1.0, 10**6, 11000, 1000) == 0.0  # one point at least


def _per_point_read(reader: PrometheusReader, group, start: float, end: float):  # noqa: ANN001
    """The reader's former decoding, kept as the reference: a dict per series, a Python loop
    per point, then placed into the block."""
    step = reader.config.step
    start, end = align_start(start, step), align_start(end, step)
    n_time = int(round((end - start) / step)) + 1
    chunks = plan_chunks(start, end, step, reader.config.max_points_per_request)
    series: dict[tuple[str, str], dict[int, float]] = {}
    for query_name, promql in group.queries.items():
        guarded = drop_stale_samples(promql, reader.config.max_sample_age or 2 * step)
        for chunk_start, chunk_end in chunks:
            for item in reader._range_answer(guarded, chunk_start, chunk_end):
                metric = item["metric"]
                key = entity_key({label: metric[label] for label in group.labels})
                name = feature_name(query_name, metric, frozenset(group.labels))
                points = series.setdefault((key, name), {})
                for timestamp, raw in item["values"]:
                    index = int(round((float(timestamp) - start) / step))
                    value = float(raw)
                    if 0 <= index < n_time and math.isfinite(value):
                        points[index] = value
    keys = sorted({key for key, _ in series})
    features = sorted({name for _, name in series})
    values = np.full((len(keys), n_time, len(features)), np.nan, dtype=np.float32)
    for (key, name), points in series.items():
        for index, value in points.items():
            values[keys.index(key), index, features.index(name)] = value
    return keys, features, values


def test_vectorised_reader_equals_per_point_decoding_on_real_answers(history: History) -> None:
    """Gaps ("holey", "vanished"), stale samples (the guard), NaN (0/0) and -Inf (ln 0) in real
    Prometheus answers, read in chunks: the array decoding gives exactly the former values."""
    queries = {"smd": QUERY, "ratio": f"{QUERY} / {QUERY}", "log": f"ln({QUERY})"}
    entities = [{"name": "smd", "labels": ["instance"], "queries": queries}]
    config = make_config(history.prometheus.url, Path("/tmp"), entities=entities)
    config.prometheus.max_points_per_request = 250
    reader = PrometheusReader(config.prometheus)
    group = config.entities[0]
    start, end = history.end - 900, history.end
    read = reader.read_range(group, start, end)
    keys, features, values = _per_point_read(reader, group, start, end)
    assert read.windows is not None
    assert read.windows.keys == keys and read.windows.features == features
    np.testing.assert_array_equal(read.windows.values, values)
    assert np.isnan(values).any()  # gaps, 0/0 and ln(0) are all missing, never a number
    assert np.array_equal(read.windows.observed, ~np.isnan(values))


def test_gaps_are_missing_values_not_repeated_or_zero_filled(history: History) -> None:
    """The last 120 s of "holey" have no samples; PromQL alone would repeat its last value
    there for 5 minutes (its lookback), the reader's staleness guard keeps them missing."""
    plain = [{"name": "smd", "labels": ["instance"], "queries": {"smd": METRIC}}]
    config = make_config(history.prometheus.url, Path("/tmp"), entities=plain)
    read = PrometheusReader(config.prometheus).read_range(
        config.entities[0], history.end - 300, history.end
    )
    windows = read.windows
    assert windows is not None
    assert windows.features[0] == 'smd{dim="m00",job="smd"}'
    holey = [i for i, labels in enumerate(windows.entities) if labels["instance"] == "holey"][0]
    assert not windows.observed[holey, -118:].any()
    assert np.isnan(windows.values[holey, -118:]).all()
    assert windows.observed[holey, :170].all()


def test_fit_then_infer_scores_every_entity_with_recent_data(fitted_agent: Agent, history: History):
    results = fitted_agent.infer(now=history.end)
    (result,) = results
    scored = {labels["instance"] for labels in result.entities}
    # "holey" is still scored: an aggregating query carries PromQL's 5-minute lookback
    assert scored == {"machine-1-7", "machine-1-7-shifted", "holey"}
    assert "no_recent_data" in result.skipped['{"instance":"vanished"}']
    fused = scores_by_instance(fitted_agent)
    mad = scores_by_instance(fitted_agent, "mad")
    assert set(fused) == set(mad) == scored
    assert all(np.isfinite(list(fused.values())))
    probability = {
        s.labels["instance"]: s.value for s in exported(fitted_agent)["aiops_anomaly_probability"]
    }
    assert set(probability) == scored
    assert all(0.0 <= value <= 1.0 for value in probability.values())
    sample = exported(fitted_agent)["aiops_anomaly_score"][0]
    assert {"instance", "entity", "entity_group", "detector"} <= set(sample.labels)
    assert fitted_agent.readiness() == (True, "ready")


def test_restarted_agent_loads_models_instead_of_refitting(
    fitted_agent: Agent, history: History, tmp_path: Path
) -> None:
    fitted_agent.infer(now=history.end)
    before = scores_by_instance(fitted_agent)
    restarted = Agent(make_config(history.prometheus.url, tmp_path))
    restarted.start_up()
    assert restarted.missing_models() == []
    restarted.infer(now=history.end)
    assert scores_by_instance(restarted) == pytest.approx(before)
    assert len(restarted.store.recent_jobs(kind="fit")) == 1


def test_changed_model_settings_trigger_a_refit(fitted_agent: Agent, history: History, tmp_path):
    changed = make_config(
        history.prometheus.url, tmp_path, detectors={"device": "cpu", "mad": {"window": 20}}
    )
    agent = Agent(changed)
    agent.start_up()
    # only mad's settings changed: pca's model loads, mad's does not; the group needs a new
    # calibration over both, so neither is usable until the group is refitted
    assert ("pca", "smd") in agent.models and ("mad", "smd") not in agent.models
    assert agent.missing_models() == [("mad", "smd"), ("pca", "smd")]


def model_versions(agent: Agent, config: Config) -> dict[str, int]:
    """The stored model version id of each enabled detector of group "smd"."""
    versions = {}
    for detector in config.detectors.enabled_names():
        version = agent.store.latest_model_version(
            detector, "smd", config.model_hash(detector, "smd")
        )
        assert version is not None
        versions[detector] = version.id
    return versions


def test_fit_saves_a_calibration_version_of_the_fitted_models(fitted_agent: Agent) -> None:
    config = fitted_agent.config
    model = fitted_agent.store.latest_model_version("mad", "smd", config.model_hash("mad", "smd"))
    assert model is not None
    versions = model_versions(fitted_agent, config)
    assert set(versions) == {"mad", "pca"}  # the default detector set
    calibration = fitted_agent.store.latest_calibration_version(
        "smd", "fused", config.calibration_hash("smd", versions)
    )
    assert calibration is not None and calibration.model_versions == versions
    # the calibration slice is the later quarter of the fit window, after the training
    train_end = model.training_metrics["train_end"]
    assert calibration.slice_start > train_end
    assert calibration.n_steps == pytest.approx(0.25 * ROWS, rel=0.05)


def test_a_calibration_slice_too_short_for_the_rate_is_reported(
    history: History, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At 0.001, a quarter of this history holds under one expected normal exceedance: the
    threshold is an extrapolation, and the log says so with what to change."""
    agent = Agent(make_config(history.prometheus.url, tmp_path))
    agent.start_up()
    with caplog.at_level(logging.WARNING, logger="aiops_plugin.agent"):
        agent.fit(now=history.end)
    (message,) = [r.getMessage() for r in caplog.records if "calibration steps hold" in r.message]
    assert "group 'smd'" in message and "schedule.fit_window" in message
    agent.store.close()


def test_a_new_false_alarm_rate_rescales_without_refitting_or_recalibrating(
    fitted_agent: Agent, history: History, tmp_path: Path
) -> None:
    fitted_agent.infer(now=history.end)
    before = scores_by_instance(fitted_agent, "mad")
    rate = fitted_agent.config.calibration.false_alarm_rate
    agent = Agent(
        make_config(history.prometheus.url, tmp_path, calibration={"false_alarm_rate": 0.01})
    )
    agent.start_up()
    assert agent.missing_models() == []
    agent.infer(now=history.end)
    after = scores_by_instance(agent, "mad")
    # score = log p / log rate: the same p-values on the new rate's scale
    expected = {key: value * np.log(rate) / np.log(0.01) for key, value in before.items()}
    assert after == pytest.approx(expected, rel=1e-4)
    assert len(agent.store.recent_jobs(kind="fit")) == 1


def test_new_calibration_settings_recalibrate_without_retraining(
    fitted_agent: Agent, history: History, tmp_path: Path
) -> None:
    config = fitted_agent.config
    model = fitted_agent.store.latest_model_version("mad", "smd", config.model_hash("mad", "smd"))
    changed = make_config(history.prometheus.url, tmp_path, calibration={"tail_fraction": 0.1})
    agent = Agent(changed)
    agent.load_models(now=history.end)
    assert agent.missing_models() == []
    assert len(agent.store.recent_jobs(kind="fit")) == 1  # no refit
    kept = agent.store.latest_model_version("mad", "smd", changed.model_hash("mad", "smd"))
    assert kept is not None and model is not None and kept.id == model.id  # same weights
    versions = model_versions(agent, changed)
    assert versions["mad"] == model.id
    recalibrated = agent.store.latest_calibration_version(
        "smd", "fused", changed.calibration_hash("smd", versions)
    )
    assert recalibrated is not None
    assert recalibrated.state["calibration"]["tail_fraction"] == 0.1
    assert recalibrated.slice_start > model.training_metrics["train_end"]
    (result,) = agent.infer(now=history.end)
    assert len(result.entities) == 3 and result.probability is not None


def test_suppression_rules_hold_back_small_anomalies_and_count_them(
    history: History, tmp_path: Path
) -> None:
    """A rule no deviation can meet suppresses every anomaly: the fused score stays below the
    alarm, and the anomalies are counted, all of them as suppressed for their size."""
    group = {
        "name": "smd",
        "labels": ["instance"],
        "queries": {"smd": QUERY},
        "suppress": {"smd": {"min_abs_deviation": 1e9}},
    }
    # a loose false-alarm rate so that ordinary history crosses 1.0 now and then
    config = make_config(
        history.prometheus.url, tmp_path, entities=[group], calibration={"false_alarm_rate": 0.4}
    )
    agent = Agent(config)
    agent.start_up()
    agent.fit(now=history.end)
    fused_seen = []
    for now in np.arange(history.end - 90, history.end + 1, 10):
        agent.infer(now=float(now))
        fused_seen.extend(scores_by_instance(agent).values())
    counters = exported(agent)
    anomalous = sum(s.value for s in counters["aiops_anomalous_steps"] if s.name.endswith("_total"))
    suppressed = {
        s.labels["reason"]: s.value
        for s in counters["aiops_anomalies_suppressed"]
        if s.name.endswith("_total")
    }
    assert anomalous > 0
    assert suppressed == {"direction": 0.0, "min_deviation": anomalous}
    assert max(fused_seen) <= 0.999 + 1e-6
    mad = scores_by_instance(agent, "mad")
    assert mad  # the detector's own score is not suppressed: only the fused verdict is


def test_bad_promql_in_one_group_does_not_stop_others(
    history: History, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entities = [
        {"name": "broken", "labels": ["instance"], "queries": {"cpu": f"rate({METRIC}[5m"}},
        {
            "name": "partly",
            "labels": ["instance"],
            "queries": {"smd": QUERY, "typo": f"sum by (instance) ({METRIC}"},
        },
        {"name": "smd", "labels": ["instance"], "queries": {"smd": QUERY}},
    ]
    agent = Agent(make_config(history.prometheus.url, tmp_path, entities=entities))
    agent.start_up()
    with caplog.at_level(logging.ERROR):
        agent.fit(now=history.end)
        results = {result.group: result for result in agent.infer(now=history.end)}
    assert results["broken"].error is not None and not results["broken"].entities
    assert len(results["smd"].entities) == 3
    assert len(results["partly"].entities) == 3
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert "group 'broken' query 'cpu'" in messages and f"rate({METRIC}[5m" in messages
    assert "group 'partly' query 'typo'" in messages
    groups = {s.labels["entity_group"] for s in exported(agent)["aiops_anomaly_score"]}
    assert groups == {"smd", "partly"}


def test_unreachable_prometheus_marks_source_down_and_withdraws_scores(
    fitted_agent: Agent, history: History, tmp_path: Path
) -> None:
    fitted_agent.infer(now=history.end)
    assert scores_by_instance(fitted_agent)
    dead = make_config(f"http://127.0.0.1:{free_port()}", tmp_path)
    fitted_agent.reader = PrometheusReader(dead.prometheus)
    with pytest.raises(CycleFailed, match="prometheus unavailable"):
        fitted_agent.infer(now=history.end)
    metrics = exported(fitted_agent)
    up = {s.labels["source"]: s.value for s in metrics["aiops_source_up"]}
    assert up["prometheus"] == 0.0 and up["store"] == 1.0
    assert not metrics["aiops_anomaly_score"]
    statuses = [job["status"] for job in fitted_agent.store.recent_jobs(kind="infer")]
    assert statuses[0] == "failed"


def test_stop_during_fit_writes_no_model_version(history: History, tmp_path: Path) -> None:
    agent = Agent(make_config(history.prometheus.url, tmp_path))
    agent.start_up()

    class StopAfterRead(PrometheusReader):
        def read_range(self, group, start, end):  # noqa: ANN001, ANN201
            result = super().read_range(group, start, end)
            agent.request_stop()
            return result

    agent.reader = StopAfterRead(agent.config.prometheus)
    with pytest.raises(StopRequested):
        agent.fit(now=history.end)
    assert agent.store.latest_model_version("mad", "smd") is None
    assert agent.store.recent_jobs(kind="fit")[0]["status"] == "interrupted"


def test_store_is_shared_with_postgresql(history: History, postgresql_url: str, tmp_path: Path):
    config = make_config(history.prometheus.url, tmp_path, store={"url": postgresql_url})
    agent = Agent(config, store=Store.open(postgresql_url))
    agent.start_up()
    agent.fit(now=history.end)
    agent.infer(now=history.end)
    version = agent.store.latest_model_version("mad", "smd", config.model_hash("mad", "smd"))
    assert version is not None and version.n_entities == 4


def test_forecaster_exports_forecasts_in_the_metrics_own_units(
    history: History, tmp_path: Path
) -> None:
    queries = {name: f'sum by (instance) ({METRIC}{{dim="{name}"}})' for name in ("m00", "m05")}
    forecaster = {
        "enabled": True,
        "window": 16,
        "hidden": 8,
        "heads": 2,
        "epochs": 2,
        "max_train_windows": 500,
        "score_steps": 2,
        "export_metrics": ["m05"],
    }
    config = make_config(
        history.prometheus.url,
        tmp_path,
        entities=[{"name": "smd", "labels": ["instance"], "queries": queries}],
        detectors={"device": "cpu", "mad": {"enabled": False}, "forecaster": forecaster},
        calibration={"horizons": ["5m"]},
    )
    assert config.detectors.forecaster.horizon_steps == [300]  # 5m at a 1 s step
    agent = Agent(config)
    agent.start_up()
    agent.fit(now=history.end)
    agent.infer(now=history.end)
    metrics = exported(agent)
    parts = {}
    for name in ("aiops_forecast", "aiops_forecast_lower", "aiops_forecast_upper"):
        parts[name] = {s.labels["instance"]: s for s in metrics[name]}
        assert {s.labels["metric"] for s in metrics[name]} == {"m05"}
        assert {s.labels["horizon"] for s in metrics[name]} == {"5m"}
    forecast = parts["aiops_forecast"]["machine-1-7"]
    assert {"instance", "entity", "entity_group", "metric", "horizon"} <= set(forecast.labels)
    lower = parts["aiops_forecast_lower"]["machine-1-7"].value
    upper = parts["aiops_forecast_upper"]["machine-1-7"].value
    assert lower <= forecast.value <= upper
    assert -0.5 < forecast.value < 1.5  # SMD values are scaled to [0, 1] by their publishers
    uncertainty = {s.labels["detector"] for s in metrics["aiops_anomaly_uncertainty"]}
    assert "forecaster" in uncertainty
    agent.store.close()
