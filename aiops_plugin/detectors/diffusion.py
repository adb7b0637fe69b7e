"""``diffusion``: self-distilled multi-scale diffusion detector (after "Learning Multi-Scale
Generative Representations for Cloud Performance Anomaly Detection via Self-Distillation", seed
``self-distilled-multiscale-diffusion.txt``).

The paper gives the pieces (multi-scale Conv1D encoding, a DDPM forward process and a
noise-prediction network, an EMA teacher with a cross-scale distillation loss, the reconstruction
error as the score) but not their wiring. The choices made here, with ``W`` = window, ``F`` =
features, ``K`` = ``score_steps``, ``S`` = ``scales``, ``d`` = ``d_model``; shapes
``(batch, time, channels)``:

What is generated
    The last ``K`` steps of the window (the *target*), conditioned on the ``W - K`` steps before
    them (the *context*): a conditional diffusion model of "what comes next", in the manner of
    imputation diffusion models. Noising the whole window and denoising it back (the paper's
    literal reading) lets the network copy every anomaly it sees through the light noise of an
    intermediate step; generating the target from the context alone makes the reconstruction
    follow what the context says is normal, so the error is large exactly where the recent steps
    depart from it.
Multi-scale encoding ``H_s = Conv1D_s(X)``
    ``S`` encoders over the context (the target's values and observed-mask blanked to 0), each
    two ``Conv1d`` of kernel 3 and dilation ``2**s`` (GELU, same length): receptive fields of
    5, 9, 17, ... steps, local fluctuations at ``s = 0`` and the slow trend at the coarsest.
    Inputs are the standardised values and the observed-mask (``2F`` channels; a missing value is
    "not measured", not "at the median"). The ``S`` feature maps, concatenated per step and
    projected to ``d``, are the condition of the noise network.
Forward process ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)``
    Linear ``beta`` from ``beta_start`` to ``beta_end`` over ``diffusion_steps``, so ``x_t =
    sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` in closed form. The defaults (``1e-3`` to ``0.2``
    over 100 steps) are DDPM's ``1e-4`` to ``0.02`` over 1000 rescaled to 100 steps, so that, as
    the paper asks, ``x_T`` is nearly standard normal (``abar_100 < 1e-3``; DDPM's betas over
    100 steps would end at ``abar = 0.36``). At the default ``noise_step`` 30, ``abar = 0.40``:
    the target keeps its level but most of its detail must come from the context.
Noise network ``eps_theta(x_t, t | H)``
    Per step the noised target values (0 in the context) and a target flag, plus the condition,
    projected to ``d``; three residual dilated ``Conv1d`` blocks (dilation 1, 2, 4) whose layer
    norm is modulated by the sinusoidal embedding of ``t`` (FiLM); a linear map to ``F`` read at
    the target steps. The network's output is its estimate of the clean target ``x0_hat``, and
    ``eps_theta = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``: the same noise predictor,
    parameterised through ``x0``. With the output taken as the noise directly, a network trained
    on normal data predicts noise of normal size for any input, so its reconstruction
    ``(x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)`` copies an anomaly of any size and the error
    stays at the noise floor (SMD machine-1-7, tiny model: a planted 30-sigma shift scored 1.4
    against 1.0 for normal steps, with the blame on the wrong channel; through ``x0``: 2.8
    against 1.1, blamed right). Trained with ``L_diff = E ||eps - eps_theta(x_t, t)||^2`` over
    the target's observed values, ``t`` drawn uniformly from ``1 .. noise_step``: the score never
    starts the reverse process beyond ``noise_step``, so training capacity goes where scoring
    needs it.
Self-distillation
    The teacher is a copy of the whole network (encoders and noise network) whose weights are the
    exponential moving average of the student's, ``theta_T = alpha theta_T + (1 - alpha)
    theta_S``, updated after every optimiser step (:meth:`DiffusionDetector.after_step`) and never
    trained, so it stays outside the optimiser and its weight decay. ``alpha`` ramps up as
    ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` steps, so a short fit's teacher is not
    mostly its random initialisation. ``L_distill = sum_s mean ||H_s^student - H_s^teacher||^2``
    pulls every scale's features towards the teacher's, slower-moving ones; ``L_total = L_diff +
    distill_weight * L_distill``. Scores use the teacher, the smoother of the two (EMA weights are
    also what DDPM samples with).
Reconstruction and score ``Score(X) = ||X - X_hat||``
    The target is noised to ``noise_step`` with noise drawn once from a fixed seed (shared by
    every window: a score does not depend on its batch and a checkpoint round trip gives the same
    score) and denoised back to 0 with deterministic DDIM (``eta = 0``) in ``denoising_steps``
    evenly spaced steps; each is one pass of the noise network, the condition is computed once.
    Each channel's error is divided by its typical size, the RMS reconstruction error of that
    channel over up to ``ERROR_SCALE_WINDOWS`` fit windows measured right after training (at
    least ``MIN_ERROR_SCALE``): a channel the context predicts well and one that is noise by
    nature then count alike, the "per-channel normalised" error. The score is the root mean
    square of those normalised errors over the target's observed values (about 1 on normal
    data, not growing with the number of channels), ``contributions`` each channel's share of
    the summed squares. A step with no observed channel, or whose window has less than
    ``min_observed_fraction`` observed, is not scored (NaN). No uncertainty is reported.

Defaults (``DiffusionConfig``) are sized for a 2-core CPU: a 64-step window, 3 scales, ``d = 32``,
T = 100, noise to step 30, 5 DDIM steps, 3 epochs over 3000 windows.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn

from aiops_plugin.detectors.base import FitReport
from aiops_plugin.detectors.deep import (
    WindowedDeepDetector,
    WindowScores,
    default_score_batch_size,
    masked_mean,
    seeded_noise,
    sliding_windows,
)
from aiops_plugin.detectors.scaling import MAX_STANDARD
from aiops_plugin.detectors.training import autocast
from aiops_plugin.windows import Windows

#: Seed of the noise a window's target is diffused with before it is denoised back.
NOISE_SEED = 0
#: Seed of the timesteps and noise of the validation loss (training draws from torch's RNG).
VALIDATION_SEED = 1
#: Dilations of the residual blocks of the noise network.
BLOCK_DILATIONS = (1, 2, 4)
#: Fit windows whose reconstruction error sets each channel's error scale.
ERROR_SCALE_WINDOWS = 2048
#: Smallest error scale (standardised units): a channel the model reconstructs perfectly (a
#: constant) does not turn rounding into an alarm.
MIN_ERROR_SCALE = 0.05


def linear_schedule(steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """``abar_t`` for ``t = 0 .. steps`` (``abar_0 = 1``) of DDPM's linear ``beta`` schedule."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    return torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar]).float()


def ddim_timesteps(noise_step: int, denoising_steps: int) -> list[tuple[int, int]]:
    """``(t, t_next)`` pairs from ``noise_step`` down to 0 in at most ``denoising_steps`` evenly
    spaced, distinct steps."""
    points = np.unique(np.round(np.linspace(0, noise_step, denoising_steps + 1)).astype(int))
    points = points[::-1].tolist()
    return list(zip(points[:-1], points[1:], strict=True))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``(B, dim)`` of the integer timesteps ``t`` ``(B,)``."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    angles = t.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return functional.pad(embedding, (0, dim - 2 * half))


class MultiScaleEncoder(nn.Module):
    """``H_s = Conv1D_s(X)``: ``(B, W, F)`` values and mask -> ``S`` maps ``(B, W, d)``, scale
    ``s`` two kernel-3 convolutions of dilation ``2**s``."""

    def __init__(self, n_features: int, d_model: int, scales: int) -> None:
        super().__init__()
        self.scales = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(2 * n_features, d_model, 3, dilation=2**s, padding=2**s),
                nn.GELU(),
                nn.Conv1d(d_model, d_model, 3, dilation=2**s, padding=2**s),
                nn.GELU(),
            )
            for s in range(scales)
        )

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        inputs = torch.cat([values, mask], dim=2).transpose(1, 2)
        return [scale(inputs).transpose(1, 2) for scale in self.scales]


class ResidualBlock(nn.Module):
    """Layer norm modulated by the timestep (FiLM), GELU, dilated ``Conv1d``, residual add."""

    def __init__(self, d_model: int, dilation: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.film = nn.Linear(d_model, 2 * d_model)
        self.convolution = nn.Conv1d(d_model, d_model, 3, dilation=dilation, padding=dilation)

    def forward(self, hidden: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(time)[:, None].chunk(2, dim=2)
        modulated = functional.gelu(self.norm(hidden) * (1 + scale) + shift)
        return hidden + self.convolution(modulated.transpose(1, 2)).transpose(1, 2)


class DenoisingNetwork(nn.Module):
    """Encoders + noise network: ``eps_theta(x_t, t | H)`` for the window's last ``K`` steps."""

    def __init__(self, n_features: int, d_model: int, scales: int, target_steps: int) -> None:
        super().__init__()
        self.target_steps = target_steps
        self.d_model = d_model
        self.encoder = MultiScaleEncoder(n_features, d_model, scales)
        self.condition = nn.Linear(scales * d_model, d_model)
        self.inputs = nn.Linear(n_features + 1, d_model)
        self.time = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model)
        )
        self.blocks = nn.ModuleList(
            ResidualBlock(d_model, dilation) for dilation in BLOCK_DILATIONS
        )
        self.output = nn.Linear(d_model, n_features)

    def context(self, values: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """The multi-scale features of the window with the target blanked."""
        keep = torch.ones_like(mask)
        keep[:, -self.target_steps :] = 0.0
        return self.encoder(values * keep, mask * keep)

    def condition_of(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.condition(torch.cat(features, dim=2))

    def predict_noise(
        self,
        noised: torch.Tensor,
        t: torch.Tensor,
        condition: torch.Tensor,
        alpha_bar: torch.Tensor,
    ) -> torch.Tensor:
        """``eps_theta`` ``(B, K, F)`` of the noised target ``(B, K, F)`` at timesteps ``t``,
        through the network's estimate of the clean target: ``(x_t - sqrt(abar_t) x0_hat) /
        sqrt(1 - abar_t)``."""
        clean = self.predict_clean(noised, t, condition).float()
        alpha = alpha_bar[t][:, None, None]
        return (noised - alpha.sqrt() * clean) / (1 - alpha).sqrt()

    def predict_clean(
        self, noised: torch.Tensor, t: torch.Tensor, condition: torch.Tensor
    ) -> torch.Tensor:
        """The network's estimate ``x0_hat`` ``(B, K, F)`` of the clean target."""
        batch, window, _ = condition.shape
        placed = noised.new_zeros(batch, window, noised.shape[2] + 1)
        placed[:, -self.target_steps :, :-1] = noised
        placed[:, -self.target_steps :, -1] = 1.0
        hidden = self.inputs(placed) + condition
        time = self.time(timestep_embedding(t, self.d_model))
        for block in self.blocks:
            hidden = block(hidden, time)
        return self.output(hidden[:, -self.target_steps :])


class DiffusionModel(nn.Module):
    """The student (trained), the EMA teacher (not trained) and the noise schedule."""

    def __init__(
        self, n_features: int, d_model: int, scales: int, target_steps: int, alpha_bar: torch.Tensor
    ) -> None:
        super().__init__()
        self.student = DenoisingNetwork(n_features, d_model, scales, target_steps)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("alpha_bar", alpha_bar)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        #: per-channel RMS reconstruction error on the fit window's normal data
        self.register_buffer("error_scale", torch.ones(n_features))

    @torch.no_grad()
    def update_teacher(self, ema_decay: float) -> None:
        """``theta_T = alpha theta_T + (1 - alpha) theta_S`` with ``alpha`` ramped up."""
        updates = int(self.ema_updates)
        alpha = min(ema_decay, (1 + updates) / (10 + updates))
        for teacher, student in zip(
            self.teacher.parameters(), self.student.parameters(), strict=True
        ):
            teacher.lerp_(student.detach(), 1.0 - alpha)
        self.ema_updates += 1


class DiffusionDetector(WindowedDeepDetector):
    """Multi-scale Conv1D condition, DDPM noise network, EMA self-distillation, DDIM score."""

    name: ClassVar[str] = "diffusion"

    def __init__(
        self,
        scales: int = 3,
        d_model: int = 32,
        diffusion_steps: int = 100,
        beta_start: float = 1e-3,
        beta_end: float = 0.2,
        noise_step: int = 30,
        denoising_steps: int = 5,
        ema_decay: float = 0.99,
        distill_weight: float = 0.1,
        score_steps: int = 5,
        **shared: Any,
    ) -> None:
        shared.setdefault("window", 64)
        super().__init__(**shared)
        if not 1 <= noise_step <= diffusion_steps:
            raise ValueError(f"noise_step {noise_step} outside 1 .. {diffusion_steps}")
        if score_steps >= self.window:
            raise ValueError(f"score_steps {score_steps} must be below window {self.window}")
        self.scales = scales
        self.d_model = d_model
        self.diffusion_steps = diffusion_steps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.noise_step = noise_step
        self.denoising_steps = denoising_steps
        self.ema_decay = ema_decay
        self.distill_weight = distill_weight
        self.score_steps = score_steps

    def hyper_parameters(self) -> dict[str, Any]:
        return {
            "scales": self.scales,
            "d_model": self.d_model,
            "diffusion_steps": self.diffusion_steps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "noise_step": self.noise_step,
            "denoising_steps": self.denoising_steps,
            "ema_decay": self.ema_decay,
            "distill_weight": self.distill_weight,
            "score_steps": self.score_steps,
        }

    def build_model(self, n_features: int) -> DiffusionModel:
        alpha_bar = linear_schedule(self.diffusion_steps, self.beta_start, self.beta_end)
        return DiffusionModel(n_features, self.d_model, self.scales, self.score_steps, alpha_bar)

    # ----------------------------------------------------------------------- training
    def loss(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``L_diff`` over the target's observed values + ``distill_weight * L_distill``.

        Training draws ``t`` and the noise from torch's (seeded) generator; the validation loss
        (model in eval mode) from :data:`VALIDATION_SEED`, so epochs are compared on the same
        draws."""
        assert isinstance(model, DiffusionModel)
        student = model.student
        features = student.context(x, mask)
        with torch.no_grad():
            teacher_features = model.teacher.context(x, mask)
        distill = sum(
            ((mine.float() - theirs.float()) ** 2).mean()
            for mine, theirs in zip(features, teacher_features, strict=True)
        )
        target = x[:, -self.score_steps :].float()
        observed = mask[:, -self.score_steps :]
        t, noise = self._training_draws(target, model.training)
        alpha_bar = model.alpha_bar[t][:, None, None]
        noised = alpha_bar.sqrt() * target + (1 - alpha_bar).sqrt() * noise
        predicted = student.predict_noise(
            noised, t, student.condition_of(features), model.alpha_bar
        )
        diffusion = masked_mean((predicted.float() - noise) ** 2, observed)
        return diffusion + self.distill_weight * distill

    def _training_draws(
        self, target: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps ``(B,)`` in ``1 .. noise_step`` and noise shaped like ``target``."""
        generator = None if training else torch.Generator().manual_seed(VALIDATION_SEED)
        t = torch.randint(1, self.noise_step + 1, (target.shape[0],), generator=generator)
        noise = torch.randn(target.shape, generator=generator)
        return t.to(target.device), noise.to(target.device)

    def after_step(self, model: nn.Module) -> None:
        assert isinstance(model, DiffusionModel)
        model.update_teacher(self.ema_decay)

    def fit(self, windows: Windows) -> FitReport:
        """Train, then measure each channel's typical reconstruction error on up to
        :data:`ERROR_SCALE_WINDOWS` fit windows: the score's unit per channel."""
        report = super().fit(windows)
        assert isinstance(self.model_, DiffusionModel)
        standard, mask = self.scaler_.transform(windows, clip=MAX_STANDARD)
        values = sliding_windows(torch.from_numpy(standard), self.window).flatten(0, 1)
        masks = sliding_windows(torch.from_numpy(mask), self.window).flatten(0, 1)
        generator = torch.Generator().manual_seed(self.training.seed)
        pick = torch.randperm(len(values), generator=generator)[:ERROR_SCALE_WINDOWS]
        squared = torch.zeros(values.shape[2], dtype=torch.float64)
        counted = torch.zeros(values.shape[2], dtype=torch.float64)
        chunk = self.score_batch_size or default_score_batch_size(self.device)
        self.model_.eval()
        with torch.no_grad():
            for start in range(0, len(pick), chunk):
                index = pick[start : start + chunk]
                x, m = values[index].to(self.device), masks[index].to(self.device)
                with autocast(self.device):
                    reconstructed = self.reconstruct(self.model_, x, m)
                target = x[:, -self.score_steps :].float()
                observed = m[:, -self.score_steps :].float()
                squared += ((target - reconstructed) ** 2 * observed).sum(dim=(0, 1)).double().cpu()
                counted += observed.sum(dim=(0, 1)).double().cpu()
        scale = (squared / counted.clamp(min=1.0)).sqrt().float()
        scale = torch.where(counted > 0, scale, torch.ones_like(scale)).clamp(min=MIN_ERROR_SCALE)
        self.model_.error_scale.copy_(scale.to(self.device))
        report.metrics["reconstruction_error_median"] = float(scale.median())
        return report

    # ------------------------------------------------------------------------ scoring
    def reconstruct(
        self, model: DiffusionModel, x: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``X_hat`` ``(B, K, F)``: the target noised to ``noise_step`` (seeded noise) and
        denoised back by the teacher with deterministic DDIM."""
        network = model.teacher
        condition = network.condition_of(network.context(x, mask))
        target = x[:, -self.score_steps :].float()
        noise = seeded_noise(tuple(target.shape[1:]), NOISE_SEED, target.device)[None]
        alpha_bar = model.alpha_bar
        noised = alpha_bar[self.noise_step].sqrt() * target
        noised = noised + (1 - alpha_bar[self.noise_step]).sqrt() * noise
        estimate = noised
        for t, t_next in ddim_timesteps(self.noise_step, self.denoising_steps):
            steps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            predicted = network.predict_noise(noised, steps, condition, alpha_bar)
            now, then = alpha_bar[t], alpha_bar[t_next]
            estimate = (noised - (1 - now).sqrt() * predicted) / now.sqrt()
            noised = then.sqrt() * estimate + (1 - then).sqrt() * predicted
        return estimate

    def score_batch(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> WindowScores:
        assert isinstance(model, DiffusionModel)
        target = x[:, -self.score_steps :].float()
        observed = mask[:, -self.score_steps :].float()
        error = (target - self.reconstruct(model, x, mask)) / model.error_scale
        squared = error**2 * observed
        n_observed = observed.sum(dim=(1, 2))
        score = (squared.sum(dim=(1, 2)) / n_observed.clamp(min=1.0)).sqrt()
        per_channel = squared.sum(dim=1)
        contributions = per_channel / per_channel.sum(dim=1, keepdim=True).clamp(min=1e-12)
        scorable = (mask[:, -1].float().sum(dim=1) > 0) & (
            mask.float().mean(dim=(1, 2)) >= self.min_observed_fraction
        )
        undefined = torch.full_like(score, float("nan"))
        return WindowScores(
            score=torch.where(scorable, score, undefined),
            contributions=torch.where(scorable[:, None], contributions, undefined[:, None]),
        )
