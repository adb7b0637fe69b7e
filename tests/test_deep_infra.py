"""The shared deep-detector machinery: normalisation, windows, masked training, batched scoring,
checkpoints. Exercised with a deliberately small reconstruction network on a real SMD slice."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aiops_plugin.config import DetectorsConfig
from aiops_plugin.demo import load_demo_sample
from aiops_plugin.detectors.deep import WindowedDeepDetector, WindowScores, masked_mean
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.detectors.training import TrainingFailed, TrainingSettings
from aiops_plugin.store import Store
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


def detector(epochs: int = 6) -> TinyReconstruction:
    return TinyReconstruction(
        window=16,
        training=TrainingSettings(epochs=epochs, batch_size=128, patience=20),
        max_train_windows=2000,
    )


def test_training_lowers_the_loss_on_a_real_slice(smd) -> None:
    """On the later half of the machine-1-7 history. In the earlier half one metric (m05) sits
    at one level most of the time and leaves it for a third of the steps, tens of robust units
    away: that one metric dominates the loss there, and this tiny network needs more epochs to
    learn it than the other tests give it."""
    model = detector(epochs=12)
    model.fit(Windows.from_array(smd.train[-1500:]))
    report = model.training_report_
    assert report["epochs"] == 12 and report["stopped_by"] == "epochs"
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


def tiny_multiscale() -> DetectorsConfig:
    return DetectorsConfig(
        multiscale={
            "enabled": True,
            "window": 16,
            "levels": 3,
            "d_model": 8,
            "heads": 2,
            "epochs": 2,
            "max_train_windows": 600,
            "score_steps": 1,
        }
    )


def test_a_fit_window_ending_in_a_gap_trains_and_is_saved(smd, tmp_path: Path) -> None:
    """The last 12 % of the fit window unobserved (a scrape outage): validation falls back to
    the last observed windows, the network trains, and the version is stored."""
    values = smd.train[:1500].copy()
    values[-180:] = np.nan
    windows = Windows.from_array(values, features=smd.feature_names)
    detector = build_detector("multiscale", tiny_multiscale(), torch.device("cpu"))
    initial = copy.deepcopy(detector.build_model(len(smd.feature_names)).state_dict())
    model = FittedModel.fit(detector, windows)
    report = model.report
    assert report is not None
    assert report.metrics["validation_windows"] > 0
    assert math.isfinite(report.metrics["best_loss"])
    assert report.metrics["selected_on"] == "validation"
    assert report.metrics["epochs"] == 2
    trained = model.detector.model_.state_dict()
    assert any(not torch.equal(trained[name], initial[name]) for name in initial)
    store = Store.open(f"sqlite:///{tmp_path / 'aiops.db'}")
    try:
        version = store.save_model_version(
            detector="multiscale",
            group="hosts",
            config_hash="gap",
            state=model.to_bytes(),
            training_metrics={**report.metrics, "seconds": report.seconds},
            n_entities=1,
            n_features=len(smd.feature_names),
        )
        stored = store.latest_model_version("multiscale", "hosts", "gap")
    finally:
        store.close()
    assert stored is not None and stored.id == version.id
    assert stored.training_metrics["validation_windows"] == report.metrics["validation_windows"]
    # the version records where the training ended: the last step of the fit window, gap or not
    restored = FittedModel.from_bytes(stored.state, tiny_multiscale(), torch.device("cpu"))
    assert model.train_end == restored.train_end == windows.timestamps[-1]
    scored = Windows.from_array(smd.test[:100], features=smd.feature_names)
    np.testing.assert_array_equal(restored.score(scored).score, model.score(scored).score)


class NaNLoss(TinyReconstruction):
    """A network whose loss is never a number: nothing can be learned."""

    name = "nan-loss"

    def loss(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return super().loss(model, x, mask) * math.nan


def test_a_fit_that_learned_nothing_fails_loudly_naming_the_detector(smd) -> None:
    model = NaNLoss(window=16, training=TrainingSettings(epochs=3, patience=10))
    with pytest.raises(TrainingFailed, match=r"'nan-loss'.*no finite"):
        model.fit(Windows.from_array(smd.train[:800]))
    assert model.model_ is None


def test_an_entity_observed_for_barely_a_window_holds_out_a_seeded_random_share(smd) -> None:
    """25 observed steps give 18 windows of 16 that are at least half observed: a held-out tail
    would leave no training window that ends before it, so a seeded random tenth of the windows
    (2 of 18) is held out instead."""
    values = smd.train[:200].copy()
    values[25:] = np.nan
    reports = []
    for _ in range(2):
        model = detector()
        model.fit(Windows.from_array(values))
        reports.append(model.training_report_)
    assert reports[0]["train_windows"] == 16 and reports[0]["validation_windows"] == 2
    assert reports[0]["selected_on"] == "validation"
    assert reports[0]["best_loss"] == reports[1]["best_loss"]


def test_fit_split_scores_only_the_calibration_slice_and_its_context(smd) -> None:
    """The calibration slice scored alone (with ``context_steps`` before it) equals the slice
    of a pass over the whole fit window, for a deep detector (multiscale, with its MC masks)."""
    windows = Windows.from_array(smd.train[:900])
    model, raw = FittedModel.fit_split(
        build_detector("multiscale", tiny_multiscale(), torch.device("cpu")), windows, 0.25
    )
    whole = model.score(windows).score
    assert raw.shape == (1, 900 - 675)
    np.testing.assert_allclose(raw, whole[:, 675:], rtol=1e-5)
    assert np.isfinite(raw).all()


def test_a_stop_request_interrupts_scoring_between_chunks(smd) -> None:
    """A fit's calibration pass can be millions of windows; a SIGTERM does not wait for it."""
    import threading

    from aiops_plugin.detectors.training import TrainingInterrupted

    model = detector()
    model.fit(Windows.from_array(smd.train[:800]))
    model.stop_event = threading.Event()
    model.score(Windows.from_array(smd.test[:100]))  # not asked to stop: scores
    model.stop_event.set()
    with pytest.raises(TrainingInterrupted, match="stopped while scoring"):
        model.score(Windows.from_array(smd.test[:100]))


def test_out_of_memory_halves_the_chunk_and_scores_the_same(
    smd, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A device that holds at most 16 windows (simulated: the CPU has no such limit): the pass
    retries with halved chunks, keeps the size that fits, and scores exactly as one pass."""
    model = detector()
    model.fit(Windows.from_array(smd.train[:800]))
    windows = Windows.from_array(smd.test[:200])
    expected = model.score(windows).score
    model.score_batch_size = 100
    original = model.score_batch

    def limited(network, x, mask):  # noqa: ANN001, ANN202
        if x.shape[0] > 16:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return original(network, x, mask)

    monkeypatch.setattr(model, "score_batch", limited)
    np.testing.assert_allclose(model.score(windows).score, expected, rtol=1e-6, equal_nan=True)
    assert model._chunk_limit == 12  # 100 -> 50 -> 25 -> 12
    assert "out of memory scoring 100 windows at once; retrying 50 at a time" in caplog.text

    def never(network, x, mask):  # noqa: ANN001, ANN202
        raise torch.OutOfMemoryError("simulated: nothing fits")

    monkeypatch.setattr(model, "score_batch", never)
    with pytest.raises(torch.OutOfMemoryError):
        model.score(windows)
