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
