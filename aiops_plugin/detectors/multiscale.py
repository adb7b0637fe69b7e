"""``multiscale``: multi-scale decomposition, per-scale Conv + self-attention extractors, a
softmax-weighted fusion and a Gaussian anomaly head (Qiu, "A Multi-Scale Deep Learning and
Uncertainty Estimation Framework for Comprehensive Anomaly Detection in Cloud Environments").

The paper's pieces and how they are built here (``W`` = window, ``F`` = features, ``K`` = levels,
``d`` = ``d_model``; all shapes ``(batch, time, channels)``):

Decomposition ``X^(k) = F_k(X)``
    Masked average pooling of the window with kernel = stride = ``2**k``, ``k = 0..K-1``, aligned
    to the window's *end* (the most recent step always closes a bucket; up to ``2**k - 1`` of the
    oldest steps are dropped when ``W`` is not a multiple). Each level carries the pooled values
    and the observed fraction of each bucket, so a bucket of missing values is "unknown", not a
    median: ``(B, W // 2**k, 2F)``. Level ``k`` is one point per ``2**k`` steps: level 0 keeps
    short bursts, the coarsest one the slow structure of the whole window.
Extractor ``H^(k) = Phi_k(X^(k))``
    Per scale (no weight sharing, the paper's ``theta_k``): two 3-wide ``Conv1d`` + GELU (local
    shape), a learned position embedding and one pre-norm self-attention encoder layer (context
    across the scale's whole time axis), then attention pooling with a learned query to one
    vector ``(B, d)``. Each ``H^(k)`` is layer-normalised *without* a learned gain, so every scale
    enters the fusion with the same magnitude and the fusion weights alone decide its share.
Fusion ``Z = sum_k alpha_k H^(k)``, ``sum alpha = 1``
    ``alpha = softmax(logits)`` with one learned logit per scale, global to the model rather than
    input-dependent: a single set of weights per entity group is what an operator can read
    (``aiops_multiscale_scale_weight{entity_group, scale}``, ``scale`` = steps per point).
Anomaly head ``p(s | Z)``
    The paper maximises the likelihood of the score given ``Z`` but, being unsupervised, has no
    target score. Here the head models the density that induces the score: from ``Z`` it predicts
    the mean and variance of every channel at the window's last step, and is trained by Gaussian
    negative log-likelihood over the *observed* channels of that step. ``Z`` is computed from the
    window with the last step blanked (values 0, observed fraction 0 at every level), so the
    network must predict the step from its context and cannot copy it: a one-step predictive
    density. Variances are ``softplus + MIN_VARIANCE`` with ``MIN_VARIANCE = 1``: the head never
    claims a spread narrower than one robust standard deviation of the channel over the fit
    window. Without that floor, channels that sit at one value and spike now and then (dozens in
    SMD) get tiny predicted variances and their rounding wiggles outrank real anomalies: on the 7
    SMD machines a floor of 0.01 gave mean VUS-PR 0.45, a floor of 1 gave 0.48-0.49.

Score, uncertainty, contributions (standardised units)
    A step's surprise is ``mean_j z_j**2`` over its observed channels ``j``, with
    ``z_j = (x_j - mu_j) / sigma_j``: the squared standardised residual per channel under the
    predicted density, >= 0, about 1 on normal data, independent of how many channels are
    observed. The score of a step is the mean surprise of the last ``score_steps`` steps (those
    that were scored), i.e. up to constants the average negative log-likelihood of that short
    subsequence under the chained one-step densities. A one-step density follows a lasting
    anomaly (a level shift) once it is in the context, so the surprise of a single step fades
    while the anomaly lasts; averaging a few steps keeps it visible and damps single noisy steps
    (SMD, mean VUS-PR over 7 machines: 0.43 for the step alone, 0.48 averaged over 5 or 10 steps).
    A step with no observed channel, or whose context has less than ``min_observed_fraction``
    observed, gets no score (NaN): it would be computed from imputed values alone.
    ``contributions`` are each channel's share of the summed ``z_j**2`` of those steps.

    ``uncertainty`` (exported as ``aiops_anomaly_uncertainty``) is the standard deviation of the
    score over ``mc_samples`` dropout-thinned versions of the anomaly head (Monte-Carlo dropout on
    the head's hidden layer, the layer that was trained with that dropout): how much the score
    depends on which of the plausible heads is asked, i.e. the model's (epistemic) uncertainty
    about the score, in the score's own raw units. The agent divides it by the same per-entity
    threshold as the score, so on the exported scale it reads "score +- uncertainty". The
    thinning masks are drawn from a fixed seed and shared by every window, so a window's
    uncertainty does not depend on what else is in its batch and repeated scoring is
    deterministic. Over ``score_steps`` steps the steps' standard deviations are averaged: an
    upper bound of the standard deviation of the averaged score (equal to it when the steps'
    Monte-Carlo deviations move together, as they largely do with shared masks). The aleatoric
    spread of the surprise under the predicted Gaussian is not added: for ``n`` observed channels
    it is ``sqrt(2 / n)`` at every step and says nothing about the step.

Defaults (``MultiscaleConfig``) are sized for a 2-core CPU: a 64-step window with 4 levels
(1, 2, 4, 8 steps per point), ``d_model`` 32 and 3 epochs over 3000 windows. The paper's best
setting, 128 steps and 4 levels, is one setting away (``window: 128``); on SMD it scored no better
here and costs about twice as much per window. More training did not help either (6000 windows x
5 epochs scored lower, 8000 x 3 the same): a sharper one-step predictor also predicts more of
the anomalies.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn

from aiops_plugin.detectors.base import ModelGauge, Scores
from aiops_plugin.detectors.deep import WindowedDeepDetector, WindowScores, masked_mean
from aiops_plugin.windows import Windows

#: Floor of every predicted variance (standardised units): sigma >= 1 robust standard deviation.
MIN_VARIANCE = 1.0
#: Seed of the Monte-Carlo dropout masks of the head, so uncertainty is repeatable.
MC_SEED = 0


def masked_pool(values: torch.Tensor, mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Average of observed values over non-overlapping buckets of ``factor`` steps.

    Args:
        values: ``(B, T, F)`` standardised values, 0 where missing.
        mask: ``(B, T, F)`` 1 where observed.
        factor: steps per bucket; buckets end at the last step, leftover oldest steps are dropped.

    Returns:
        ``(B, T // factor, 2F)``: per bucket the mean of the observed values (0 if none) and the
        observed fraction.
    """
    batch, time, features = values.shape
    buckets = time // factor
    start = time - buckets * factor
    values = values[:, start:].reshape(batch, buckets, factor, features)
    mask = mask[:, start:].reshape(batch, buckets, factor, features)
    observed = mask.sum(dim=2)
    mean = (values * mask).sum(dim=2) / observed.clamp(min=1.0)
    return torch.cat([mean, observed / factor], dim=2)


class MultiscaleDecomposition(nn.Module):
    """``F_k``: the window at ``levels`` granularities, ``2**k`` steps per point.

    Input ``(B, W, F)`` values and mask; output a list of ``levels`` tensors
    ``(B, W // 2**k, 2F)`` (pooled values and observed fraction, see :func:`masked_pool`).
    """

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.factors = [2**k for k in range(levels)]

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        return [masked_pool(values, mask, factor) for factor in self.factors]


class ScaleEncoder(nn.Module):
    """``Phi_k``: Conv1d block, self-attention over the scale's time axis, attention pooling.

    Input ``(B, L, C)`` (one level of the decomposition); output ``(B, d_model)``, layer-normalised
    without gain so that the fusion weights alone set each scale's share of ``Z``.
    """

    def __init__(
        self, in_channels: int, length: int, d_model: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.convolution = nn.Sequential(
            nn.Conv1d(in_channels, d_model, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv1d(d_model, d_model, kernel_size=3, padding=1),
            nn.GELU(),
        )
        self.position = nn.Parameter(torch.randn(1, length, d_model) * 0.02)
        self.attention = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=2 * d_model,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.query = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.pool = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)

    def forward(self, level: torch.Tensor) -> torch.Tensor:
        hidden = self.convolution(level.transpose(1, 2)).transpose(1, 2) + self.position
        hidden = self.attention(hidden)
        pooled, _ = self.pool(self.query.expand(hidden.shape[0], -1, -1), hidden, hidden)
        return self.norm(pooled[:, 0])


class ScaleFusion(nn.Module):
    """``Z = sum_k alpha_k H^(k)`` with ``alpha = softmax(logits)``: one learned weight per scale,
    shared by every input. Input a list of ``K`` tensors ``(B, d)``; output ``(B, d)``."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(levels))

    def weights(self) -> torch.Tensor:
        """``(K,)`` fusion weights, non-negative and summing to 1."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(features, dim=1)
        return (self.weights()[None, :, None] * stacked).sum(dim=1)


class GaussianHead(nn.Module):
    """``psi``: ``Z (B, d)`` -> mean and variance ``(B, F)`` of every channel at the next step.

    With ``keep`` (``(S, d)`` Monte-Carlo dropout masks, already divided by the keep
    probability) the hidden layer is thinned by each mask in turn and the outputs are
    ``(S, B, F)``: ``S`` samples of the head for the same ``Z``.
    """

    def __init__(self, d_model: int, n_features: int, dropout: float) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU())
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(d_model, 2 * n_features)

    def forward(
        self, z: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden(z)
        hidden = self.dropout(hidden) if keep is None else hidden[None] * keep[:, None, :]
        mean, raw_variance = self.output(hidden).chunk(2, dim=-1)
        return mean, functional.softplus(raw_variance) + MIN_VARIANCE


class MultiscaleNetwork(nn.Module):
    """The whole network: ``(B, W, F)`` window + mask -> predictive mean and variance ``(B, F)`` of
    the window's last step, computed from the window with that step blanked."""

    def __init__(
        self, n_features: int, window: int, levels: int, d_model: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        if window // 2 ** (levels - 1) < 2:
            raise ValueError(
                f"a {window}-step window has fewer than 2 points at level {levels - 1} "
                f"({2 ** (levels - 1)} steps per point): lower levels or raise window"
            )
        self.decomposition = MultiscaleDecomposition(levels)
        self.encoders = nn.ModuleList(
            ScaleEncoder(2 * n_features, window // factor, d_model, heads, dropout)
            for factor in self.decomposition.factors
        )
        self.fusion = ScaleFusion(levels)
        self.head = GaussianHead(d_model, n_features, dropout)

    def fuse(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``Z (B, d)`` from the window's context: the last step's values and mask are zeroed."""
        context = torch.ones_like(mask)
        context[:, -1] = 0.0
        levels = self.decomposition(values * context, mask * context)
        return self.fusion(
            [encoder(level) for encoder, level in zip(self.encoders, levels, strict=True)]
        )

    def forward(
        self, values: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.fuse(values, mask), keep)


#: Values per block of entities in :func:`trailing_mean` (its cumulative sums are float64 and
#: int64, several times the float32 input: done whole, a fit's calibration pass of 1000
#: entities x 38 metrics held 0.7 GB of them at once).
TRAILING_BLOCK_ELEMENTS = 2**22


def trailing_mean(values: np.ndarray, steps: int) -> np.ndarray:
    """Mean over the last ``steps`` steps (axis 1, this one included) of the defined values.

    ``values``: ``(entities, time, ...)`` with NaN where undefined; a step that is itself NaN
    stays NaN (it was not scored), a defined step averages only the defined steps in its span.
    Computed a block of entities at a time (the same numbers, bounded memory).
    """
    per_entity = max(1, int(np.prod(values.shape[1:])))
    block = max(1, TRAILING_BLOCK_ELEMENTS // per_entity)
    if values.shape[0] <= block:
        return _trailing_mean(values, steps)
    out = np.empty(values.shape, dtype=np.float32)
    for e0 in range(0, values.shape[0], block):
        out[e0 : e0 + block] = _trailing_mean(values[e0 : e0 + block], steps)
    return out


def _trailing_mean(values: np.ndarray, steps: int) -> np.ndarray:
    defined = np.isfinite(values)
    padding = [(0, 0)] * values.ndim
    padding[1] = (1, 0)
    sums = np.cumsum(np.pad(np.where(defined, values, 0.0), padding), axis=1, dtype=np.float64)
    counts = np.cumsum(np.pad(defined, padding), axis=1)
    lag = np.maximum(np.arange(1, values.shape[1] + 1) - steps, 0)
    total = sums[:, 1:] - np.take(sums, lag, axis=1)
    count = counts[:, 1:] - np.take(counts, lag, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    return np.where(defined, mean, np.nan).astype(np.float32)


def gaussian_nll(mean: torch.Tensor, variance: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-channel Gaussian negative log-likelihood without the constant ``log(2 pi) / 2``."""
    return 0.5 * (torch.log(variance) + (target - mean) ** 2 / variance)


class MultiscaleDetector(WindowedDeepDetector):
    """Multi-scale Conv/attention extractors, softmax fusion, Gaussian one-step anomaly head."""

    name: ClassVar[str] = "multiscale"

    def __init__(
        self,
        levels: int = 4,
        d_model: int = 32,
        heads: int = 4,
        dropout: float = 0.1,
        mc_samples: int = 16,
        score_steps: int = 5,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        self.levels = levels
        self.d_model = d_model
        self.heads = heads
        self.dropout = dropout
        self.mc_samples = mc_samples
        self.score_steps = score_steps

    def hyper_parameters(self) -> dict[str, Any]:
        return {
            "levels": self.levels,
            "d_model": self.d_model,
            "heads": self.heads,
            "dropout": self.dropout,
            "mc_samples": self.mc_samples,
            "score_steps": self.score_steps,
        }

    @property
    def context_steps(self) -> int:
        return self.window - 1 + self.score_steps - 1

    def build_model(self, n_features: int) -> MultiscaleNetwork:
        return MultiscaleNetwork(
            n_features, self.window, self.levels, self.d_model, self.heads, self.dropout
        )

    def loss(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Gaussian NLL of the last step's observed channels under the predicted density."""
        mean, variance = model(x, mask)
        return masked_mean(gaussian_nll(mean.float(), variance.float(), x[:, -1]), mask[:, -1])

    def _head_masks(self) -> torch.Tensor:
        """``(mc_samples, d_model)`` dropout keep-masks, scaled by ``1 / keep``, fixed seed."""
        keep = 1.0 - self.dropout
        generator = torch.Generator().manual_seed(MC_SEED)
        draws = torch.rand(self.mc_samples, self.d_model, generator=generator)
        return ((draws < keep).float() / keep).to(self.device)

    def score_batch(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> WindowScores:
        assert isinstance(model, MultiscaleNetwork)
        z = model.fuse(x, mask)
        mean, variance = model.head(z)
        sample_mean, sample_variance = model.head(z, self._head_masks())
        target, observed = x[:, -1].float(), mask[:, -1].float()
        n_observed = observed.sum(dim=1)
        squared = (target - mean.float()) ** 2 / variance.float() * observed
        score = squared.sum(dim=1) / n_observed.clamp(min=1.0)
        samples = ((target - sample_mean.float()) ** 2 / sample_variance.float() * observed).sum(
            dim=2
        ) / n_observed.clamp(min=1.0)
        context_observed = mask[:, :-1].float().mean(dim=(1, 2))
        scorable = (n_observed > 0) & (context_observed >= self.min_observed_fraction)
        undefined = torch.full_like(score, float("nan"))
        contributions = squared / squared.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return WindowScores(
            score=torch.where(scorable, score, undefined),
            uncertainty=torch.where(scorable, samples.std(dim=0), undefined),
            contributions=torch.where(scorable[:, None], contributions, undefined[:, None]),
        )

    def score(self, windows: Windows) -> Scores:
        """Per-step surprise from the network, averaged over the last ``score_steps`` steps."""
        steps = super().score(windows)
        if self.score_steps == 1 or steps.uncertainty is None or steps.contributions is None:
            return steps  # nothing to pool (windows shorter than the network reads: all NaN)
        score = trailing_mean(steps.score, self.score_steps)
        weighted = trailing_mean(steps.contributions * steps.score[..., None], self.score_steps)
        with np.errstate(invalid="ignore", divide="ignore"):
            contributions = weighted / weighted.sum(axis=2, keepdims=True)
        return Scores(
            score=score,
            uncertainty=trailing_mean(steps.uncertainty, self.score_steps),
            contributions=contributions.astype(np.float32),
        )

    def model_gauges(self) -> list[ModelGauge]:
        return [
            ModelGauge(
                name="aiops_multiscale_scale_weight",
                documentation="Learned fusion weight of each time scale of the multiscale "
                "detector's model (scale = steps per point); the weights of a group sum to 1.",
                label="scale",
                values=self.scale_weights(),
            )
        ]

    def scale_weights(self) -> dict[str, float]:
        """Learned fusion weight per scale, keyed by steps per point ("1", "2", "4", ...)."""
        self._require_fitted()
        assert isinstance(self.model_, MultiscaleNetwork)
        weights = self.model_.fusion.weights().detach().cpu().tolist()
        return {
            str(factor): weight
            for factor, weight in zip(self.model_.decomposition.factors, weights, strict=True)
        }
