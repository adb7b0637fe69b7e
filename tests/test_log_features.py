"""Log features on the step grid and the record scores behind the log anomaly score."""

from __future__ import annotations

import numpy as np
import pytest

from aiops_plugin.logs.features import (
    SEVERITY_BUCKETS,
    LogBatch,
    LogProfile,
    severity_bucket,
    step_features,
)

INFO, WARN, ERROR = 9, 13, 17


def batch(entities, times, severities, templates) -> LogBatch:
    return LogBatch(
        np.array(entities), np.array(times, float), np.array(severities), np.array(templates)
    )


def unit(*values: float) -> np.ndarray:
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


VECTORS = {1: unit(1, 0, 0), 2: unit(0, 1, 0), 3: unit(0.9, 0.1, 0), 4: unit(0, 0, 1)}


@pytest.fixture
def profile() -> LogProfile:
    normal = batch(["a"] * 100, range(100), [INFO] * 99 + [WARN], [1] * 90 + [2] * 10)
    return LogProfile(embedding_dim=2, rare_template_fraction=0.2).fit(normal, VECTORS)


def test_severity_buckets_follow_otlp_severity_numbers() -> None:
    buckets = severity_bucket(np.array([0, 1, 8, 9, 12, 13, 16, 17, 21, 24]))
    names = [SEVERITY_BUCKETS[i] for i in buckets]
    assert (
        names
        == ["unset", "debug", "debug", "info", "info", "warn", "warn", "error"] + ["error"] * 2
    )


def test_rare_templates_and_errors_score_higher(profile: LogProfile) -> None:
    scores = profile.record_scores(np.array([1, 2, 1]), np.array([INFO, INFO, ERROR]), VECTORS)
    assert scores[0] < scores[1] < scores[2]


def test_unseen_template_scores_by_semantic_novelty(profile: LogProfile) -> None:
    near, far = profile.surprisal(np.array([3, 4]), VECTORS)
    assert near < far
    assert far > profile.surprisal(np.array([2]), VECTORS)[0]


def test_step_features_on_the_grid(profile: LogProfile) -> None:
    grid = np.array([10.0, 20.0, 30.0])
    records = batch(
        ["a", "a", "a", "b", "ghost"],
        [5, 9, 25, 19, 9],
        [INFO, ERROR, WARN, INFO, INFO],
        [1, 4, 2, 1, 1],
    )
    features = step_features(records, profile, VECTORS, ["a", "b"], grid, step=10.0)
    names = features.features
    values = dict(zip(names, np.moveaxis(features.values, 2, 0), strict=True))
    np.testing.assert_array_equal(values["log_info_count"], [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(values["log_error_count"], [[1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(values["log_warn_count"], [[0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(values["log_new_templates"], [[1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(values["log_rare_templates"], [[0, 0, 1], [0, 0, 0]])
    assert np.isnan(features.score[0, 1]) and np.isnan(features.score[1, 0])
    assert features.score[0, 0] > features.score[1, 1]
    assert np.isnan(values["log_template_divergence"][0, 1])
    assert values["log_template_divergence"][1, 1] < values["log_template_divergence"][0, 0]
    assert features.values.shape == (2, 3, 8 + 2)
    assert np.isfinite(values["log_embedding_0"][0, 0])


def test_profile_state_round_trips(profile: LogProfile) -> None:
    restored = LogProfile()
    restored.load_state_dict(profile.state_dict())
    templates, severities = np.array([1, 2, 3, 4]), np.array([INFO, WARN, ERROR, INFO])
    np.testing.assert_allclose(
        restored.record_scores(templates, severities, VECTORS),
        profile.record_scores(templates, severities, VECTORS),
    )


def _looped_divergence_and_summary(records, profile, vectors, entity_keys, grid, step):
    """The former per-cell loop (one Python iteration per occupied cell and per template in
    it), kept as the reference the vectorised :func:`step_features` must reproduce."""
    n_time = len(grid)
    index = {key: i for i, key in enumerate(entity_keys)}
    rows = np.array([index.get(key, -1) for key in records.entity_keys])
    cols = np.ceil((records.timestamps - grid[0]) / step).astype(np.int64)
    keep = (rows >= 0) & (cols >= 0) & (cols < n_time)
    cell = (rows * n_time + cols)[keep]
    template_ids = records.template_id[keep]
    k = profile.pca_components_.shape[0]
    out = np.full((len(entity_keys) * n_time, 1 + k), np.nan)
    reference = profile.counts_ / profile.total
    for occupied in np.unique(cell):
        ids, counts = np.unique(template_ids[cell == occupied], return_counts=True)
        position, seen = profile._lookup(ids)
        histogram = np.zeros(len(reference) + 1)
        np.add.at(histogram, np.where(seen, position, len(reference)), counts)
        histogram /= histogram.sum()
        fitted = np.append(reference, 0.0)
        middle = 0.5 * (histogram + fitted)
        with np.errstate(divide="ignore", invalid="ignore"):
            left = np.where(histogram > 0, histogram * np.log(histogram / middle), 0.0).sum()
            right = np.where(fitted > 0, fitted * np.log(fitted / middle), 0.0).sum()
        out[occupied, 0] = 0.5 * (left + right)
        summary, weight = np.zeros(profile.vectors_.shape[1]), 0.0
        for template, count in zip(ids, counts, strict=True):
            if int(template) in vectors:
                summary += count * vectors[int(template)]
                weight += count
        if weight:
            out[occupied, 1:] = profile.embedding_summary(summary / weight)
    return out.reshape(len(entity_keys), n_time, 1 + k)


def test_vectorised_features_equal_the_per_cell_loop() -> None:
    rng = np.random.default_rng(0)
    vectors = {t: unit(*rng.normal(size=4)) for t in range(1, 30)}  # 30..39: no vector
    normal = batch(
        rng.choice(["a", "b", "c"], 3000),
        rng.uniform(0, 1000, 3000),
        rng.choice([INFO, WARN, ERROR], 3000),
        rng.zipf(1.6, 3000).clip(1, 25),
    )
    profile = LogProfile(embedding_dim=3, rare_template_fraction=0.05).fit(normal, vectors)
    records = batch(
        rng.choice(["a", "b", "c", "ghost"], 5000),
        rng.uniform(-50, 1050, 5000),
        rng.choice([INFO, WARN, ERROR], 5000),
        rng.integers(1, 40, 5000),
    )
    grid = np.arange(10.0, 1001.0, 10.0)
    features = step_features(records, profile, vectors, ["a", "b", "c"], grid, step=10.0)
    expected = _looped_divergence_and_summary(records, profile, vectors, ["a", "b", "c"], grid, 10)
    np.testing.assert_allclose(features.values[..., 7:], expected, rtol=1e-5, atol=1e-6)
    assert np.isfinite(expected[..., 0]).sum() > 250, "most cells are occupied"
    assert ((expected[..., 0] >= 0) & (expected[..., 0] <= np.log(2) + 1e-9))[
        np.isfinite(expected[..., 0])
    ].all()
