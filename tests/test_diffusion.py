"""The ``diffusion`` detector: the noise schedule and DDIM arithmetic checked by hand, the EMA
teacher and the distillation loss, training on a real slice, scores of planted anomalies,
batching and checkpoints. Tiny configurations on the shipped SMD machine-1-7 slice; CPU only."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from aiops_plugin.config import DetectorsConfig, DiffusionConfig
from aiops_plugin.demo import load_demo_sample
from aiops_plugin.detectors.diffusion import (
    DiffusionDetector,
    DiffusionModel,
    ddim_timesteps,
    linear_schedule,
)
from aiops_plugin.detectors.registry import FittedModel, build_detector
from aiops_plugin.detectors.training import TrainingSettings
from aiops_plugin.windows import Windows

WINDOW = 32
TINY = {
    "enabled": True,
    "window": WINDOW,
    "scales": 2,
    "d_model": 16,
    "score_steps": 3,
    "epochs": 5,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "max_train_windows": 1500,
}


@pytest.fixture(scope="module")
def smd():
    return load_demo_sample()


def tiny_detector(**changes) -> DiffusionDetector:
    settings = DiffusionConfig(**{**TINY, **changes}).model_dump(exclude={"enabled"})
    detector = DiffusionDetector.from_settings(settings, torch.device("cpu"))
    assert isinstance(detector, DiffusionDetector)
    return detector


@pytest.fixture(scope="module")
def fitted(smd) -> DiffusionDetector:
    detector = tiny_detector()
    detector.fit(Windows.from_array(smd.train[:2000], features=smd.feature_names))
    return detector


def test_the_schedule_starts_clean_and_ends_in_noise() -> None:
    alpha_bar = linear_schedule(100, 1e-3, 0.2)
    assert alpha_bar.shape == (101,) and float(alpha_bar[0]) == 1.0
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    betas = torch.linspace(1e-3, 0.2, 100, dtype=torch.float64)
    assert float(alpha_bar[3]) == pytest.approx(float(torch.prod(1 - betas[:3])), rel=1e-6)
    assert float(alpha_bar[-1]) < 1e-3, "x_T is (nearly) standard normal, as the paper asks"


def test_ddim_steps_go_from_the_noise_step_to_zero() -> None:
    assert ddim_timesteps(30, 5) == [(30, 24), (24, 18), (18, 12), (12, 6), (6, 0)]
    assert ddim_timesteps(3, 10) == [(3, 2), (2, 1), (1, 0)]
    assert ddim_timesteps(30, 1) == [(30, 0)]


def test_ddim_with_the_true_noise_recovers_the_target_exactly(monkeypatch) -> None:
    """With an oracle network (it knows the clean target) every DDIM step lands on the clean
    target: the noise derived from it, the x0 estimate and the re-noising are right."""
    detector = DiffusionDetector(window=16, d_model=8, scales=2, score_steps=4)
    model = detector.build_model(3)
    x = torch.randn(5, 16, 3)
    target = x[:, -4:]
    state: dict[str, torch.Tensor] = {}

    def oracle(noised: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        state.setdefault("first", noised)
        return target

    monkeypatch.setattr(model.teacher, "predict_clean", oracle)
    reconstructed = detector.reconstruct(model, x, torch.ones_like(x))
    torch.testing.assert_close(reconstructed, target, atol=1e-5, rtol=0)
    noise = (state["first"] - model.alpha_bar[30].sqrt() * target) / (
        1 - model.alpha_bar[30]
    ).sqrt()
    assert float(noise.std()) > 0.5, "the target was noised to noise_step before denoising"


def test_the_teacher_is_the_moving_average_of_the_student() -> None:
    model = DiffusionModel(3, 8, 2, 2, linear_schedule(10, 1e-3, 0.2))
    assert not any(p.requires_grad for p in model.teacher.parameters())
    before = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    model.update_teacher(0.99)  # first update: alpha = min(0.99, 1 / 10) = 0.1
    for old, new, student in zip(
        before, model.teacher.parameters(), model.student.parameters(), strict=True
    ):
        torch.testing.assert_close(new, 0.1 * old + 0.9 * student)
    for _ in range(999):
        model.update_teacher(0.99)
    assert int(model.ema_updates) == 1000
    one = next(model.teacher.parameters())
    before = one.clone()
    with torch.no_grad():
        next(model.student.parameters()).add_(1.0)
    model.update_teacher(0.99)  # ramp reached the configured decay
    torch.testing.assert_close(one, before + 0.01 * (next(model.student.parameters()) - before))


def test_the_loss_is_diffusion_plus_weighted_distillation(smd) -> None:
    detector = DiffusionDetector(window=16, d_model=8, scales=2, score_steps=3, distill_weight=0.5)
    model = detector.build_model(len(smd.feature_names)).eval()
    x = torch.from_numpy(np.nan_to_num(smd.train[:16][None] - smd.train[:16].mean(0)))
    x = x.float().repeat(4, 1, 1)
    mask = torch.ones_like(x)
    same = detector.loss(model, x, mask)
    detector.distill_weight = 0.0
    without = detector.loss(model, x, mask)
    torch.testing.assert_close(same, without), "teacher == student: no distillation term"
    with torch.no_grad():
        for p in model.teacher.encoder.parameters():
            p.mul_(1.5)
        student = model.student.context(x, mask)
        teacher = model.teacher.context(x, mask)
    expected = sum(((s - t) ** 2).mean() for s, t in zip(student, teacher, strict=True))
    assert float(expected) > 0
    detector.distill_weight = 0.5
    torch.testing.assert_close(detector.loss(model, x, mask), without + 0.5 * expected)
    torch.testing.assert_close(detector.loss(model, x, mask), detector.loss(model, x, mask))


def test_every_config_field_builds_the_detector() -> None:
    detector = build_detector("diffusion", DetectorsConfig(diffusion=TINY), torch.device("cpu"))
    assert isinstance(detector, DiffusionDetector) and not detector.reads_logs
    assert detector.hyper_parameters()["denoising_steps"] == 5
    with pytest.raises(ValueError, match="noise_step"):
        DiffusionConfig(noise_step=200, diffusion_steps=100)


def test_training_learns_and_keeps_the_teacher_out_of_the_optimiser(smd) -> None:
    detector = DiffusionDetector(
        window=WINDOW,
        d_model=16,
        scales=2,
        score_steps=3,
        training=TrainingSettings(epochs=8, batch_size=64, learning_rate=3e-3, patience=8),
        max_train_windows=1000,
    )
    detector.fit(Windows.from_array(smd.train[:1500], features=smd.feature_names))
    report = detector.training_report_
    assert report["final_train_loss"] < 0.8 * report["first_train_loss"]
    model = detector.model_
    assert isinstance(model, DiffusionModel)
    assert int(model.ema_updates) == report["steps"] > 0
    assert not any(p.requires_grad for p in model.teacher.parameters())
    teacher = torch.cat([p.flatten() for p in model.teacher.parameters()])
    student = torch.cat([p.flatten() for p in model.student.parameters()])
    assert not torch.equal(teacher, student)
    assert (model.error_scale >= 0.05).all() and model.error_scale.shape == (38,)


def test_scores_have_the_grid_shape_and_skip_unscorable_steps(fitted, smd) -> None:
    values = smd.test[:200].copy()
    values[120] = np.nan
    scores = fitted.score(Windows.from_array(values, features=smd.feature_names))
    assert scores.score.shape == (1, 200) and scores.uncertainty is None
    assert scores.contributions.shape == (1, 200, len(smd.feature_names))
    assert np.isnan(scores.score[0, : WINDOW - 1]).all() and np.isnan(scores.score[0, 120])
    scored = np.r_[WINDOW - 1 : 120, 121:200]
    assert np.isfinite(scores.score[0, scored]).all() and (scores.score[0, scored] > 0).all()
    np.testing.assert_allclose(scores.contributions[0, scored].sum(axis=1), 1, atol=1e-4)


def test_an_unobserved_value_is_never_read(fitted, smd) -> None:
    windows = Windows.from_array(smd.test[:100], features=smd.feature_names)
    hidden = copy.deepcopy(windows)
    hidden.observed[0, 60:80, 4] = False
    garbage = copy.deepcopy(hidden)
    garbage.values[0, 60:80, 4] = 1e9
    np.testing.assert_array_equal(fitted.score(garbage).score, fitted.score(hidden).score)
    # a step's score reads the last score_steps steps: from step 62 on, none of them has it
    assert (fitted.score(hidden).contributions[0, 62:80, 4] == 0).all()


def test_planted_shift_and_spike_score_above_normal_data(fitted, smd) -> None:
    values = smd.test[:380].copy()
    scale = fitted.scaler_.default_scale_
    shifted, spiked = 10, 3
    values[150:200, shifted] += 30 * scale[shifted]
    values[300, spiked] += 30 * scale[spiked]
    scores = fitted.score(Windows.from_array(values, features=smd.feature_names))
    score = scores.score[0]
    normal = np.r_[score[WINDOW:150], score[205:300], score[305:]]
    typical = np.quantile(normal, 0.99)
    assert score[152:200].min() > typical, "the score stays up while the shift lasts"
    assert score[300:303].min() > typical, "a spike is seen in every window it is a target of"
    assert np.argmax(scores.contributions[0, 300]) == spiked


def test_scores_do_not_depend_on_the_scoring_batch(fitted, smd) -> None:
    windows = Windows.from_array(smd.test[:300], features=smd.feature_names)
    small, large = copy.copy(fitted), copy.copy(fitted)
    small.score_batch_size, large.score_batch_size = 7, 4096
    expected, actual = large.score(windows), small.score(windows)
    # the same noise and arithmetic; only the CPU convolution kernels, picked by batch size,
    # round differently (last bit of float32)
    np.testing.assert_allclose(actual.score, expected.score, rtol=1e-5)
    np.testing.assert_allclose(actual.contributions, expected.contributions, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(large.score(windows).score, expected.score)


def test_checkpoint_round_trip_gives_identical_scores(fitted, smd) -> None:
    model = FittedModel(fitted, train_end=2000.0)
    restored = FittedModel.from_bytes(
        model.to_bytes(), DetectorsConfig(diffusion=TINY), torch.device("cpu")
    )
    assert isinstance(restored.detector, DiffusionDetector)
    assert restored.detector.hyper_parameters() == fitted.hyper_parameters()
    windows = Windows.from_array(smd.test[:300], features=smd.feature_names)
    expected, actual = model.score(windows), restored.score(windows)
    np.testing.assert_array_equal(actual.score, expected.score)
    np.testing.assert_array_equal(actual.contributions, expected.contributions)


def test_more_denoising_steps_change_the_reconstruction_not_its_scale(fitted, smd) -> None:
    windows = Windows.from_array(smd.test[:300], features=smd.feature_names)
    one, many = copy.copy(fitted), copy.copy(fitted)
    one.denoising_steps, many.denoising_steps = 1, 10
    few_steps, more_steps = one.score(windows).score[0], many.score(windows).score[0]
    assert not np.array_equal(few_steps, more_steps)
    defined = np.isfinite(few_steps)
    ratio = np.median(more_steps[defined]) / np.median(few_steps[defined])
    assert 0.5 < ratio < 2.0
