"""The shared deep-detector machinery: normalisation, windows, masked training, batched scoring,
checkpoints. Exercised with a deliberately small reconstruction network on a real SMD slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from aiops_plugin.detectors.deep import WindowedDeepDetector, WindowScores, masked_mean
from aiops_plugin.detectors.training import TrainingSettings
from aiops_plugin.localstack import load_demo_sample
from aiops_plugin.windows import Windows


class TinyReconstruction(WindowedDeepDetector):
    """Reconstructs a window through a bottleneck; scores the last step's squared error."""

    name = "tiny-reconstruction"

    def build_model(self, n_features: int) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.window * n_features, 16),
            nn.ReLU(),
            nn.Linear(16, self.window * n_features),
            nn.Unflatten(1, (self.window, n_features)),
        )

    def loss(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean((model(x) - x) ** 2, mask)

    def score_batch(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> WindowScores:
        error = ((model(x) - x) ** 2 * mask)[:, -1]
        return WindowScores(
            score=error.sum(dim=1),
            contributions=error / error.sum(dim=1, keepdim=True).clamp(min=1e-12),
        )


@pytest.fixture(scope="module")
def smd():
    return load_demo_sample()


def detector() -> TinyReconstruction:
    return TinyReconstruction(
        window=16,
        training=TrainingSettings(epochs=6, batch_size=128, patience=10),
        max_train_windows=2000,
    )


def test_training_lowers_the_loss_on_a_real_slice(smd) -> None:
    model = detector()
    model.fit(Windows.from_array(smd.train[:1500]))
    report = model.training_report_
    assert report["epochs"] == 6
    assert report["final_train_loss"] < 0.8 * report["first_train_loss"]


def test_scores_are_batched_masked_and_start_after_one_window(smd) -> None:
    model = detector()
    model.fit(Windows.from_array(smd.train[:1500]))
    values = smd.test[:200].copy()
    values[100:110] = np.nan
    two = np.stack([values, smd.test[200:400]])
    scores = model.score(Windows.from_array(two, entities=[{"e": "a"}, {"e": "b"}]))
    assert scores.score.shape == (2, 200)
    assert np.isnan(scores.score[:, :15]).all() and np.isfinite(scores.score[:, 15:100]).all()
    assert np.isnan(scores.score[0, 100:110]).all()
    single = model.score(Windows.from_array(values[None], entities=[{"e": "a"}]))
    np.testing.assert_allclose(single.score[0], scores.score[0], rtol=1e-5, equal_nan=True)
    assert np.allclose(np.nansum(scores.contributions[1, 20:], axis=1), 1.0, atol=1e-4)


def test_checkpoint_round_trip_gives_identical_scores(smd) -> None:
    model = detector()
    model.fit(Windows.from_array(smd.train[:800]))
    restored = TinyReconstruction()
    restored.load_state_dict(model.state_dict())
    windows = Windows.from_array(smd.test[:100])
    np.testing.assert_array_equal(restored.score(windows).score, model.score(windows).score)


def test_a_window_longer_than_the_fit_data_is_a_clear_error(smd) -> None:
    with pytest.raises(ValueError, match="fewer than the 16-step model window"):
        detector().fit(Windows.from_array(smd.train[:10]))


def test_a_stop_request_interrupts_training_at_once(smd) -> None:
    import threading

    from aiops_plugin.detectors.training import TrainingInterrupted

    model = detector()
    model.stop_event = threading.Event()
    model.stop_event.set()
    with pytest.raises(TrainingInterrupted):
        model.fit(Windows.from_array(smd.train[:800]))
