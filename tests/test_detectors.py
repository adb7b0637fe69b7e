"""The baselines on the shipped real SMD sample (machine-1-7), trained on the earlier 75 % of the
history and calibrated (TailCalibrator, exported score where 1.0 = the configured false-alarm
rate) on the later 25 %, then judged on the test rows none of them saw. The calibration library
itself is tested in test_calibration_library.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aiops_plugin.calibration import TailCalibrator, score_from_p
from aiops_plugin.config import DetectorsConfig
from aiops_plugin.demo import DemoSample, load_demo_sample
from aiops_plugin.detectors import baselines
from aiops_plugin.detectors.base import NotFittedError, choose_device
from aiops_plugin.detectors.baselines import MAX_Z, PcaReconstructionDetector, RollingMadDetector
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.windows import Windows

RATE = 0.01
CALIBRATION_FRACTION = 0.25
STEP = 60.0


@pytest.fixture(scope="module")
def smd() -> DemoSample:
    return load_demo_sample()


def fit_and_calibrate(detector, smd: DemoSample) -> tuple[FittedModel, TailCalibrator, np.ndarray]:
    """Train on the first 75 % of the train rows, calibrate on the rest; also return the
    calibration slice's raw scores."""
    history = Windows.from_array(smd.train, step=STEP)
    model, calibration_raw = FittedModel.fit_split(detector, history, CALIBRATION_FRACTION)
    return model, TailCalibrator().fit(calibration_raw, history.keys), calibration_raw


def exported(calibrator: TailCalibrator, raw: np.ndarray, keys: list[str]) -> np.ndarray:
    """Raw scores on the exported scale (1.0 = the configured false-alarm rate)."""
    return score_from_p(calibrator.p_values(raw, keys), RATE)


def raw_test_scores(model: FittedModel, smd: DemoSample) -> tuple[np.ndarray, list[str]]:
    """Raw scores of the test rows, scored with the train rows before them as context."""
    history = Windows.from_array(np.concatenate([smd.train, smd.test]), step=STEP)
    return model.score(history).score[:, len(smd.train) :], history.keys


@pytest.fixture(scope="module")
def calibrated(smd: DemoSample) -> tuple[FittedModel, TailCalibrator, np.ndarray]:
    return fit_and_calibrate(RollingMadDetector(window=60), smd)


@pytest.fixture(scope="module")
def fitted(calibrated) -> FittedModel:
    return calibrated[0]


@pytest.fixture(scope="module")
def calibrator(calibrated) -> TailCalibrator:
    return calibrated[1]


def test_fit_split_trains_on_the_earlier_part_and_returns_the_later_slice(
    smd: DemoSample, calibrated
) -> None:
    model, _, calibration_raw = calibrated
    split = int(round(len(smd.train) * (1 - CALIBRATION_FRACTION)))
    assert calibration_raw.shape == (1, len(smd.train) - split)
    assert np.isfinite(calibration_raw).all(), "the context reaches back into the training part"
    assert model.train_end == pytest.approx(STEP * (split - 1))
    assert model.report is not None and model.report.n_steps == split
    # the slice is the trained model's score of those steps, context included
    whole = model.score(Windows.from_array(smd.train, step=STEP)).score
    np.testing.assert_array_equal(calibration_raw, whole[:, split:])
    # a model fitted on all of the history records its end
    full = FittedModel.fit(RollingMadDetector(window=60), Windows.from_array(smd.train, step=STEP))
    assert full.train_end == pytest.approx(STEP * (len(smd.train) - 1))


def test_mad_flags_the_labelled_smd_anomaly(
    smd: DemoSample, fitted: FittedModel, calibrator: TailCalibrator
) -> None:
    raw, keys = raw_test_scores(fitted, smd)
    scores = exported(calibrator, raw, keys)[0]
    labels = smd.test_labels.astype(bool)
    assert labels.sum() == 41 and np.flatnonzero(labels)[[0, -1]].tolist() == [375, 415]
    assert np.nanmax(scores[labels]) > 2.0
    # normal rows the detector never trained or calibrated on alarm at about the configured rate
    assert np.mean(scores[~labels] >= 1.0) <= 3 * RATE
    assert np.nanmax(scores[labels]) > np.nanquantile(scores[~labels], 0.99)


def test_mad_is_batched_over_entities(smd: DemoSample, fitted: FittedModel) -> None:
    one = fitted.score(Windows.from_array(smd.test[None])).score
    batch = np.stack([smd.test, smd.test[::-1].copy()])
    both = fitted.score(
        Windows.from_array(batch, entities=[{"entity": "0"}, {"entity": "1"}])
    ).score
    np.testing.assert_allclose(both[0], one[0], rtol=1e-6, equal_nan=True)


def test_missing_values_are_masked_not_imputed(smd: DemoSample, fitted: FittedModel) -> None:
    values = smd.test.copy()
    values[200:260, :] = np.nan
    scores = fitted.score(Windows.from_array(values)).score[0]
    assert np.isnan(scores[200:260]).all()
    assert np.isfinite(scores[300:]).all()


def test_contributions_point_at_the_moved_metric(
    smd: DemoSample, fitted: FittedModel, calibrator: TailCalibrator
) -> None:
    values = smd.train[-300:].copy()
    steady = int(np.argmin(next(iter(fitted.detector.entity_references_.values()))))
    windows = Windows.from_array(values)
    before = fitted.score(windows).score
    values[-1, steady] += 1.0
    windows = Windows.from_array(values)
    output = fitted.score(windows)
    shares = output.contributions[0, -1]
    assert int(np.nanargmax(shares)) == steady
    assert output.score[0, -1] > before[0, -1]
    assert exported(calibrator, output.score, windows.keys)[0, -1] > 1.0
    assert exported(calibrator, before, windows.keys)[0, -1] < 1.0
    assert np.nansum(shares) == pytest.approx(1.0, abs=1e-5)


def test_state_round_trips_through_bytes(smd: DemoSample, fitted: FittedModel) -> None:
    loaded = FittedModel.from_bytes(fitted.to_bytes(), DetectorsConfig(), torch.device("cpu"))
    windows = Windows.from_array(smd.test)
    np.testing.assert_array_equal(loaded.score(windows).score, fitted.score(windows).score)
    np.testing.assert_array_equal(
        loaded.score(windows).contributions, fitted.score(windows).contributions
    )
    assert fitted.train_end is not None and loaded.train_end == fitted.train_end


def test_unfitted_detector_refuses_to_score(smd: DemoSample) -> None:
    with pytest.raises(NotFittedError):
        RollingMadDetector().score(Windows.from_array(smd.test))


def test_an_explicit_device_setting_is_the_device_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("cuda:1") == torch.device("cuda", 1)
    assert choose_device("auto") == torch.device("cuda")


def test_device_auto_is_cpu_without_cuda_and_cuda_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda:0' but no CUDA device is available"):
        choose_device("cuda:0")


@pytest.mark.parametrize("name", ["mad", "iforest", "pca", "cblof"])
def test_every_baseline_ranks_the_smd_anomaly_above_normal_steps(
    smd: DemoSample, name: str
) -> None:
    detector = build_detector(name, DetectorsConfig(), torch.device("cpu"))
    model, calibrator, _ = fit_and_calibrate(detector, smd)
    raw, keys = raw_test_scores(model, smd)
    scores = exported(calibrator, raw, keys)[0]
    labels = smd.test_labels.astype(bool)
    assert np.nanmean(scores[labels]) > np.nanmean(scores[~labels])
    assert np.nanmax(scores[labels]) > 1.0
    loaded = FittedModel.from_bytes(model.to_bytes(), DetectorsConfig(), torch.device("cpu"))
    history = Windows.from_array(np.concatenate([smd.train, smd.test]), step=STEP)
    np.testing.assert_allclose(loaded.score(history).score, model.score(history).score, rtol=1e-5)
    assert loaded.train_end == model.train_end


def _fleet(smd: DemoSample, n_entities: int = 5) -> Windows:
    """``n_entities`` shifted copies of the SMD sample's test rows, some with gaps."""
    values = np.stack([np.roll(smd.test[:400], 37 * e, axis=0) for e in range(n_entities)])
    values[1, 100:180] = np.nan  # a gap longer than the window's half
    values[3, :, 2] = np.nan  # a feature never observed
    return Windows.from_array(
        values, step=STEP, entities=[{"entity": f"machine-{e}"} for e in range(n_entities)]
    )


def test_mad_chunked_over_entities_and_steps_equals_one_pass(fitted: FittedModel, smd) -> None:
    """Chunks of a few window values each (entities one at a time, a few steps per chunk) give
    exactly what one pass over the whole block gives, and N entities batched equal each scored
    alone."""
    fleet = _fleet(smd)
    one_pass = fitted.detector
    whole = one_pass.score(fleet)
    tiny = RollingMadDetector(window=60, chunk_elements=7 * len(fleet.features) * 60)
    tiny.load_state_dict(one_pass.state_dict())
    chunked = tiny.score(fleet)
    np.testing.assert_array_equal(chunked.score, whole.score)
    np.testing.assert_array_equal(chunked.contributions, whole.contributions)
    for e in range(len(fleet.entities)):
        alone = one_pass.score(fleet.select_entities([e]))
        np.testing.assert_array_equal(alone.score[0], whole.score[e])
    assert np.isnan(whole.score[1, 150]) and np.isfinite(whole.score[0]).sum() > 300


def test_mad_fit_in_entity_blocks_equals_one_block(smd) -> None:
    """The fit's reference quantiles computed a few entities at a time (bounded memory) are
    exactly those of one pass over the whole fleet."""
    fleet = _fleet(smd)
    whole = RollingMadDetector(window=60)
    whole.fit(fleet)
    blocks = RollingMadDetector(window=60, chunk_elements=len(fleet.timestamps) * 38 + 1)
    blocks.fit(fleet)
    assert blocks.state_dict()["entity_keys"] == whole.state_dict()["entity_keys"]
    np.testing.assert_array_equal(
        blocks.state_dict()["entity_references"], whole.state_dict()["entity_references"]
    )
    np.testing.assert_array_equal(blocks.default_reference_, whole.default_reference_)


def test_mad_scores_the_latest_step_alone_as_the_full_pass_does(fitted: FittedModel, smd) -> None:
    """A cycle asks for the last step: computing only it equals the last step of a full pass,
    on the context the agent passes and on the whole history."""
    fleet = _fleet(smd)
    detector = fitted.detector
    for end in (120, 250, 400):
        history = Windows.from_array(fleet.values[:, :end], step=STEP, entities=fleet.entities)
        context = history.tail(detector.context_steps + 1)
        latest = detector.score_latest(context)
        assert latest.score.shape == (len(fleet.entities), 1)
        np.testing.assert_array_equal(latest.score, detector.score(context).score[:, -1:])
        np.testing.assert_allclose(latest.score, detector.score(history).score[:, -1:], rtol=1e-6)
        np.testing.assert_array_equal(
            latest.contributions, detector.score(context).contributions[:, -1:]
        )


def test_pointwise_rows_are_standardised_only_where_sampled_and_scored_in_blocks(
    smd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fit standardises only the rows it samples, and they are exactly the rows of the
    whole block's standardisation; scoring block by block (a few entities per call) equals
    one call over the fleet."""
    fleet = _fleet(smd)
    pca = PcaReconstructionDetector(max_train_samples=500)
    pca.fit(fleet)
    whole, _ = pca.scaler_.transform(fleet, clip=MAX_Z)
    entities = np.array([0, 1, 3, 3, 4])
    times = np.array([0, 7, 150, 151, 299])
    np.testing.assert_array_equal(
        pca.scaler_.transform_rows(fleet, entities, times, clip=MAX_Z), whole[entities, times]
    )
    one_call = pca.score(fleet)
    monkeypatch.setattr(baselines, "SCORE_BLOCK_ROWS", 2 * len(fleet.timestamps))
    blocks = pca.score(fleet)
    np.testing.assert_allclose(blocks.score, one_call.score, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocks.contributions, one_call.contributions, rtol=1e-5, atol=1e-6)
    assert np.isfinite(blocks.score).mean() > 0.5
