"""``fusion``: metric + log-semantics fusion with a Bayesian RBF one-class head.

After "Anomaly Detection and Early Warning Mechanism for Intelligent Monitoring Systems in
Multi-Cloud Environments Based on LLM" (seed ``llm-fusion-early-warning.txt``): CNN and BiLSTM
features of the telemetry, language-model features of the logs, self-attention fusion, a "deep
SVM with RBF kernel" and Bayesian inference for a confidence. The paper gives the pieces, not
their wiring; shapes below are ``(batch, window, channels)``, ``W`` = window, ``F`` = metric
features, ``L`` = log features, ``d`` = ``channels``.

Metric branch
    The window's standardised values and observed-mask (``2F`` channels; a missing value is 0
    with mask 0, "not measured" rather than "at the median") go through three parallel
    ``Conv1d`` of kernels 3, 5 and 7 (``d`` channels each, GELU, same length), whose
    concatenation feeds a BiLSTM (``lstm_hidden`` per direction); a linear map gives one metric
    token per step ``(B, W, d)``. The window *includes* the step it scores (see the score below).
Log branch
    :meth:`FusionDetector.side_inputs` turns ``Windows.logs`` (see
    :mod:`aiops_plugin.logs.features`: counts by severity, new and rare template counts, the
    template divergence and the PCA-reduced MiniLM embedding summary) into network inputs:
    ``log1p`` of the counts; NaN (no record in the step: divergence and embedding undefined) to
    the median, with a per-step "had records" channel; then a robust scale per log feature
    (median and MAD over the fit window's steps of the entities with logs, pooled over entities:
    log features are a group's, their scale is not a host's), clipped to +-``MAX_LOG_STANDARD``;
    and a per-entity "has logs" channel broadcast over time: ``(E, T, L + 2)``. A two-layer
    projection makes one log token per step, plus a learned position embedding (the metric
    tokens carry order through the BiLSTM, the log tokens would otherwise have none).
    The names of the log features are stored at fit and the inputs reindexed by name at scoring:
    the embedding summary's width follows the log model's (fewer templates, fewer PCA axes), and
    its axes mean something else after a log refit, so when any fitted name is missing the
    group is scored on its metrics alone until the detector is refitted. A detector fitted
    without logs (no entity had any, or ``log_branch`` off) reads metrics alone.
Fusion
    One pre-norm self-attention block (``heads`` heads, then a feed-forward layer) over the
    ``2W`` concatenated metric and log tokens. Where an entity has no logs (or ``log_branch`` is
    off) its log tokens are masked out of the attention's keys, so the metric tokens attend to
    each other alone and the output is exactly that of the metric branch by itself: absent logs
    are not zeros pretending to be quiet logs. ``Scores.log_branch`` says per entity which way it
    was scored. The fused representation ``z (B, d)`` is read out at the token of the scored
    step, the last metric token, after it has attended over both modalities: a pooling of the
    window *around the step it scores*, rather than a mean that would dilute that step ``W``
    times.
Decision head ("deep SVM with RBF kernel")
    Unsupervised: a one-class, Deep-SVDD-style objective in the feature space of the RBF kernel.
    The head reads ``u = [z, asinh(r)]``: the fused representation (layer-normalised, thinned
    by dropout) beside the decoder's residual ``r`` of the scored step (below; ``asinh`` keeps
    a huge residual from swamping the kernel). ``phi(u) = sqrt(2 / D) cos(omega u / sigma + b)``
    with ``D = rff_features`` random Fourier features, ``omega ~ N(0, 1)`` and ``b ~ U(0, 2
    pi)`` drawn once from ``RFF_SEED`` and never trained, approximates the RBF kernel
    ``k(u, u') = exp(-|u - u'|^2 / (2 sigma^2))``. ``sigma^2`` and the centre ``c`` are running
    statistics of the training batches (buffers, like batch norm's: the first batch sets them,
    later ones move them with momentum ``CENTRE_MOMENTUM``): half the median pairwise squared
    distance of ``u`` times ``BANDWIDTH_SCALE``, and the mean of ``phi(u)``, i.e. the kernel
    mean embedding of the normal data. ``|phi(u) - c|^2 ~ const - 2 mean_i k(u, u_i)`` is low
    where the step is typical of the fit window, high where it is not: a kernel density
    estimate in the fused space.

    The SVDD collapse (every input mapped to one point, zero loss, no information) is prevented
    by a decoder: a linear map of ``z`` reconstructs the scored step (its observed metric values
    and, where the entity has logs, its log inputs); the loss is that squared error plus
    ``ONE_CLASS_WEIGHT`` times the one-class distance. ``z`` must describe the step, so it cannot
    be constant; the one-class term packs the normal steps' descriptions together, so an unusual
    step lands outside. Deep SVDD's other remedy (no bias terms anywhere) would rule out layer
    norm and the LSTM's gates; a fixed centre would let the network chase an arbitrary point.

    With labels (operator feedback) the same head trains with a hinge loss, the soft-boundary
    SVDD / SVM form: ``max(0, y (|phi(u) - c|^2 - R^2) + 1)`` with ``y = +1`` for anomalies,
    ``-1`` for normal steps and a learnt radius ``R``; the detector has no labels today and
    trains only the unsupervised objective.
Why the scored step's anomalies are visible
    The step is in the window the network reads, and the decoder forces ``z`` to carry its
    values; a prediction-from-context design (the step blanked, as ``multiscale`` does) would
    instead need a predictive density per channel, which the one-class head does not give. A
    lasting anomaly (a level shift) also stays visible here: the step stays unlike the fit
    window's steps as long as it lasts, where a one-step prediction follows it once it is in the
    context.
Score: the window's training objective
    The score of a window is its loss: the decoder's mean squared error over the scored step's
    observed metrics, plus (where the entity has logs) over its log inputs, plus
    ``ONE_CLASS_WEIGHT`` times the one-class distance. The distance alone is bounded (at most
    about ``1 + |c|^2``) and sees the whole ``u`` at once, so one channel 30 robust deviations
    off moves it less than the ordinary spread of normal steps does (measured on SMD
    machine-1-7: a 30-sigma shift of one channel scored *below* the 99th percentile of normal
    steps); the reconstruction error is unbounded and per channel, and the distance adds what
    is unusual about the fused representation as a whole (a log burst at quiet metrics).
Bayesian inference: uncertainty
    Monte-Carlo dropout on ``z`` (trained with that dropout): ``mc_samples`` fixed keep-masks
    drawn from ``MC_SEED`` and shared by every window, so a window's score does not depend on
    its batch and repeated scoring is deterministic. The score is the mean of the
    ``mc_samples`` objectives, ``uncertainty`` their standard deviation in the score's raw
    units: the confidence with which the paper holds back early warnings.
Contributions
    Each metric channel's share of the decoder's squared error at the scored step (observed
    channels only; rows sum to 1): cheap, and it names the channel that made the step unusual.
    A step with no observed channel, or whose window has less than ``min_observed_fraction``
    observed, is not scored (NaN).

Defaults (``FusionConfig``) are sized for a 2-core CPU: a 32-step window, ``d = 32``, 3 epochs over
3000 windows.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn

from aiops_plugin.detectors.base import Scores
from aiops_plugin.detectors.deep import WindowedDeepDetector, WindowScores, masked_mean
from aiops_plugin.windows import LogInputs, Windows

#: Kernel sizes of the parallel convolutions of the metric branch.
KERNELS = (3, 5, 7)
#: Seed of the random Fourier features (never trained).
RFF_SEED = 1
#: Seed of the Monte-Carlo dropout masks of the head, so scores are repeatable.
MC_SEED = 0
#: Weight of the one-class distance against the reconstruction error in the loss.
ONE_CLASS_WEIGHT = 1.0
#: Momentum of the running mean of ``phi(u)`` that is the head's centre.
CENTRE_MOMENTUM = 0.1
#: The kernel's ``2 sigma^2`` over the median pairwise squared distance of ``u`` in a batch.
BANDWIDTH_SCALE = 1.0
#: Clip of standardised log inputs, so a storm of records cannot swamp a batch.
MAX_LOG_STANDARD = 10.0
#: Smallest robust scale of a log input (log1p units for counts): one error line where none
#: ever came is ``log1p(1) / 0.25 ~ 2.8`` scales away, not infinitely many.
MIN_LOG_SCALE = 0.25
#: Log feature names that are counts (``log1p`` before scaling); the rest are NaN without records.
COUNT_SUFFIX = "_count"
COUNT_NAMES = frozenset({"log_new_templates", "log_rare_templates"})
MAD_TO_SIGMA = 1.4826


class MetricBranch(nn.Module):
    """``(B, W, F)`` values and mask -> ``(B, W, d)`` metric tokens: parallel Conv1d of
    :data:`KERNELS`, a BiLSTM over their concatenation, a linear map to ``d``."""

    def __init__(self, n_features: int, channels: int, lstm_hidden: int) -> None:
        super().__init__()
        self.convolutions = nn.ModuleList(
            nn.Conv1d(2 * n_features, channels, kernel_size=k, padding=k // 2) for k in KERNELS
        )
        self.lstm = nn.LSTM(
            len(KERNELS) * channels, lstm_hidden, batch_first=True, bidirectional=True
        )
        self.project = nn.Linear(2 * lstm_hidden, channels)

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([values, mask], dim=2).transpose(1, 2)
        local = torch.cat([functional.gelu(conv(inputs)) for conv in self.convolutions], dim=1)
        sequence, _ = self.lstm(local.transpose(1, 2))
        return self.project(sequence)


class LogBranch(nn.Module):
    """``(B, W, L + 1)`` log inputs (features and "had records") -> ``(B, W, d)`` log tokens."""

    def __init__(self, n_inputs: int, channels: int, window: int) -> None:
        super().__init__()
        self.project = nn.Sequential(
            nn.Linear(n_inputs, channels), nn.GELU(), nn.Linear(channels, channels)
        )
        self.position = nn.Parameter(torch.randn(1, window, channels) * 0.02)

    def forward(self, logs: torch.Tensor) -> torch.Tensor:
        return self.project(logs) + self.position


class FusionAttention(nn.Module):
    """Pre-norm multi-head self-attention and feed-forward over ``(B, N, d)`` tokens.

    ``keep`` ``(B, N)`` bool: the tokens that may be attended to (keys); a masked token gets
    exactly zero attention weight, so the other tokens' outputs do not depend on its value.
    """

    def __init__(self, channels: int, heads: int, dropout: float) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.norm_attention = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.norm_feed_forward = nn.LayerNorm(channels)
        self.feed_forward = nn.Sequential(
            nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, count, channels = tokens.shape
        q, k, v = (
            self.qkv(self.norm_attention(tokens))
            .view(batch, count, 3, self.heads, channels // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        attended = functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=keep[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        attended = attended.transpose(1, 2).reshape(batch, count, channels)
        tokens = tokens + self.drop(self.out(attended))
        return tokens + self.drop(self.feed_forward(self.norm_feed_forward(tokens)))


class RbfOneClassHead(nn.Module):
    """``u (..., n_inputs)`` -> ``phi(u) (..., D)`` in the random-Fourier-feature space of the
    RBF kernel ``exp(-|u - u'|^2 / (2 sigma^2))``, and ``|phi(u) - c|^2``.

    ``omega`` and the phases are drawn once from :data:`RFF_SEED` and never trained; ``sigma^2``
    (``bandwidth``) and ``c`` (``centre``) are running statistics of the training batches, like
    batch norm's: the median pairwise squared distance of ``u`` times
    :data:`BANDWIDTH_SCALE`, and the mean of ``phi(u)`` (the kernel mean embedding).
    """

    def __init__(self, n_inputs: int, rff_features: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(RFF_SEED)
        self.register_buffer("omega", torch.randn(rff_features, n_inputs, generator=generator))
        self.register_buffer("phase", torch.rand(rff_features, generator=generator) * 2 * math.pi)
        self.register_buffer("bandwidth", torch.ones(()))
        self.register_buffer("centre", torch.zeros(rff_features))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    def features(self, u: torch.Tensor) -> torch.Tensor:
        with torch.autocast(u.device.type, enabled=False):  # cos of bf16 phases is noise
            projected = u.float() @ self.omega.T / self.bandwidth.sqrt()
            return math.sqrt(2.0 / self.omega.shape[0]) * torch.cos(projected + self.phase)

    def distance(self, phi: torch.Tensor) -> torch.Tensor:
        """``|phi - c|^2`` over the last axis."""
        return ((phi - self.centre) ** 2).sum(dim=-1)

    @torch.no_grad()
    def update(self, u: torch.Tensor) -> None:
        """Move ``sigma^2`` and ``c`` towards this training batch's (``u``: ``(B, n_inputs)``);
        the first batch sets them."""
        u = u.detach().float()
        pairwise = torch.cdist(u, u).square()
        off_diagonal = pairwise[~torch.eye(len(u), dtype=torch.bool, device=u.device)]
        bandwidth = (BANDWIDTH_SCALE * off_diagonal.median()).clamp(min=1e-3) / 2
        first = int(self.batches) == 0
        self.bandwidth.copy_(bandwidth if first else torch.lerp(self.bandwidth, bandwidth, 0.1))
        mean = self.features(u).mean(dim=0)
        self.centre.copy_(mean if first else torch.lerp(self.centre, mean, CENTRE_MOMENTUM))
        self.batches += 1


class FusionNetwork(nn.Module):
    """Window + mask ``(B, W, F)`` and log inputs ``(B, W, L + 2)`` -> the head's ``phi(u)`` and
    the decoder's residual at the last step ``(B, F + L)`` (0 where not observed).

    With ``keep`` (``(S, d)`` Monte-Carlo dropout masks, divided by the keep probability) ``z``
    is thinned by each mask in turn and both outputs gain a leading ``S`` axis.
    """

    def __init__(
        self,
        n_features: int,
        n_log_features: int,
        window: int,
        channels: int,
        lstm_hidden: int,
        heads: int,
        dropout: float,
        rff_features: int,
    ) -> None:
        super().__init__()
        self.n_log_features = n_log_features
        self.metric_branch = MetricBranch(n_features, channels, lstm_hidden)
        self.log_branch = LogBranch(n_log_features + 1, channels, window)
        self.modality = nn.Parameter(torch.randn(2, channels) * 0.02)
        self.fusion = FusionAttention(channels, heads, dropout)
        self.norm = nn.LayerNorm(channels)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(channels, n_features + n_log_features)
        self.head = RbfOneClassHead(channels + n_features + n_log_features, rff_features)

    def encode(self, values: torch.Tensor, mask: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
        """``z (B, d)``: the fused token of the last step."""
        metric = self.metric_branch(values, mask) + self.modality[0]
        log = self.log_branch(logs[..., :-1]) + self.modality[1]
        has_logs = logs[:, :, -1] > 0.5
        keep = torch.cat([torch.ones_like(has_logs), has_logs], dim=1)
        fused = self.fusion(torch.cat([metric, log], dim=1), keep)
        return self.norm(fused[:, values.shape[1] - 1])

    def head_input(
        self,
        values: torch.Tensor,
        mask: torch.Tensor,
        logs: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``u = [z, asinh(residual)]`` and the residual of the last step."""
        z = self.encode(values, mask, logs)
        z = self.dropout(z) if keep is None else z[None] * keep[:, None, :]
        logs_now = logs[:, -1, : self.n_log_features]
        target = torch.cat([values[:, -1], logs_now], dim=1)
        weight = torch.cat([mask[:, -1], logs[:, -1, -1:].expand_as(logs_now)], dim=1)
        residual = (self.decoder(z).float() - target) * weight
        return torch.cat([z.float(), torch.asinh(residual)], dim=-1), residual

    def forward(
        self,
        values: torch.Tensor,
        mask: torch.Tensor,
        logs: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        u, residual = self.head_input(values, mask, logs, keep)
        return self.head.features(u), residual


class FusionDetector(WindowedDeepDetector):
    """CNN + BiLSTM metric tokens, log tokens, attention fusion, RBF one-class head, MC dropout."""

    name: ClassVar[str] = "fusion"
    reads_logs: ClassVar[bool] = True

    def __init__(
        self,
        channels: int = 32,
        lstm_hidden: int = 32,
        heads: int = 4,
        dropout: float = 0.1,
        mc_samples: int = 16,
        rff_features: int = 256,
        log_branch: bool = True,
        **shared: Any,
    ) -> None:
        shared.setdefault("window", 32)
        super().__init__(**shared)
        self.channels = channels
        self.lstm_hidden = lstm_hidden
        self.heads = heads
        self.dropout = dropout
        self.mc_samples = mc_samples
        self.rff_features = rff_features
        self.log_branch = log_branch
        #: names of the log features the network was trained on (empty: metrics alone)
        self.log_features_: list[str] = []
        self.log_center_ = np.zeros(0, dtype=np.float32)
        self.log_scale_ = np.ones(0, dtype=np.float32)

    def hyper_parameters(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "lstm_hidden": self.lstm_hidden,
            "heads": self.heads,
            "dropout": self.dropout,
            "mc_samples": self.mc_samples,
            "rff_features": self.rff_features,
            "log_branch": self.log_branch,
        }

    def build_model(self, n_features: int) -> FusionNetwork:
        return FusionNetwork(
            n_features,
            len(self.log_features_),
            self.window,
            self.channels,
            self.lstm_hidden,
            self.heads,
            self.dropout,
            self.rff_features,
        )

    # ------------------------------------------------------------------------ log inputs
    def side_inputs(self, windows: Windows, fitting: bool) -> tuple[np.ndarray, ...]:
        """``(E, T, L + 2)``: standardised log features, "had records", "has logs" (see the
        module docstring); all zeros for an entity scored on its metrics alone."""
        logs = windows.logs if self.log_branch else None
        if fitting:
            has_any = logs is not None and bool(logs.has_logs.any()) and bool(logs.features)
            self.log_features_ = list(logs.features) if has_any and logs is not None else []
        values, has_logs = self._reindexed_logs(logs, windows.values.shape[:2])
        transformed, had_records = self._transformed(values)
        if fitting:
            self._fit_log_scale(transformed, had_records, has_logs)
        defined = self._count_mask() | had_records[..., None]
        standard = (transformed - self.log_center_) / self.log_scale_
        standard = np.clip(np.where(defined, standard, 0.0), -MAX_LOG_STANDARD, MAX_LOG_STANDARD)
        flags = np.broadcast_to(has_logs[:, None, None], had_records.shape + (1,))
        side = np.concatenate([standard, had_records[..., None], flags], axis=2)
        return (np.where(flags, side, 0.0).astype(np.float32),)

    def _reindexed_logs(
        self, logs: LogInputs | None, shape: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The fitted log features of every entity ``(E, T, L)`` and who has logs ``(E,)``;
        no entity has logs when any fitted feature is missing from ``logs``."""
        n_entities, n_time = shape
        values = np.zeros((n_entities, n_time, len(self.log_features_)), dtype=np.float32)
        none = np.zeros(n_entities, dtype=bool)
        if logs is None or not self.log_features_:
            return values, none
        position = {name: j for j, name in enumerate(logs.features)}
        if any(name not in position for name in self.log_features_):
            return values, none
        values = logs.values[:, :, [position[name] for name in self.log_features_]]
        return values.astype(np.float32), logs.has_logs.astype(bool)

    @staticmethod
    def _is_count(name: str) -> bool:
        return name.endswith(COUNT_SUFFIX) or name in COUNT_NAMES

    def _count_mask(self) -> np.ndarray:
        """``(L,)`` bool: which fitted log features are counts (defined at every step)."""
        return np.array([self._is_count(name) for name in self.log_features_], dtype=bool)

    def _transformed(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``log1p`` of the counts, NaN -> 0, and whether each step had records ``(E, T)``:
        a count above 0, or (no counts among the features) any defined value."""
        count = self._count_mask()
        transformed = np.where(np.isfinite(values), values, 0.0).astype(np.float32)
        transformed[..., count] = np.log1p(np.maximum(transformed[..., count], 0.0))
        if count.any():
            return transformed, (values[..., count] > 0).any(axis=2)
        return transformed, np.isfinite(values).any(axis=2)

    def _fit_log_scale(
        self, transformed: np.ndarray, had_records: np.ndarray, has_logs: np.ndarray
    ) -> None:
        """Per log feature median and robust scale over the steps of entities with logs (for
        the features undefined without records, over the steps that had records)."""
        n_logs = len(self.log_features_)
        self.log_center_ = np.zeros(n_logs, dtype=np.float32)
        self.log_scale_ = np.ones(n_logs, dtype=np.float32)
        for j, name in enumerate(self.log_features_):
            steps = np.broadcast_to(has_logs[:, None], had_records.shape)
            if not self._is_count(name):
                steps = steps & had_records
            column = transformed[..., j][steps]
            if not column.size:
                continue
            center = float(np.median(column))
            scale = MAD_TO_SIGMA * float(np.median(np.abs(column - center)))
            scale = scale if scale > 0 else float(np.std(column))
            self.log_center_[j] = center
            self.log_scale_[j] = max(scale, MIN_LOG_SCALE)

    # ----------------------------------------------------------------------- training
    def loss(
        self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor, logs: torch.Tensor
    ) -> torch.Tensor:
        """Squared reconstruction error of the last step (observed metrics; log inputs where the
        entity has logs) + ``ONE_CLASS_WEIGHT`` x the one-class distance in RFF space."""
        assert isinstance(model, FusionNetwork)
        u, residual = model.head_input(x, mask, logs, None)
        if model.training:
            model.head.update(u)
        n_features = x.shape[2]
        metric_error = masked_mean(residual[:, :n_features] ** 2, mask[:, -1])
        log_weight = logs[:, -1, -1:].expand_as(residual[:, n_features:])
        log_error = masked_mean(residual[:, n_features:] ** 2, log_weight)
        one_class = model.head.distance(model.head.features(u)).mean()
        return metric_error + log_error + ONE_CLASS_WEIGHT * one_class

    # ------------------------------------------------------------------------ scoring
    def _head_masks(self) -> torch.Tensor:
        """``(mc_samples, channels)`` dropout keep-masks, scaled by ``1 / keep``, fixed seed."""
        keep = 1.0 - self.dropout
        generator = torch.Generator().manual_seed(MC_SEED)
        draws = torch.rand(self.mc_samples, self.channels, generator=generator)
        return ((draws < keep).float() / keep).to(self.device)

    def score_batch(
        self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor, logs: torch.Tensor
    ) -> WindowScores:
        """Per Monte-Carlo head: the window's training objective (the decoder's mean squared
        error of the scored step's observed metrics, of its log inputs where the entity has
        logs, plus the one-class distance); the score is their mean, the uncertainty their
        standard deviation."""
        assert isinstance(model, FusionNetwork)
        phi, residual = model(x, mask, logs, self._head_masks())
        n_features = x.shape[2]
        n_observed = mask[:, -1].float().sum(dim=1)
        metric_error = (residual[..., :n_features] ** 2).sum(dim=2) / n_observed.clamp(min=1.0)
        n_log_inputs = logs[:, -1, -1] * (residual.shape[2] - n_features)
        log_error = (residual[..., n_features:] ** 2).sum(dim=2) / n_log_inputs.clamp(min=1.0)
        samples = metric_error + log_error + ONE_CLASS_WEIGHT * model.head.distance(phi)
        squared = (residual[..., :n_features] ** 2).mean(dim=0)
        context_observed = mask.float().mean(dim=(1, 2))
        scorable = (n_observed > 0) & (context_observed >= self.min_observed_fraction)
        undefined = torch.full_like(n_observed, float("nan"))
        contributions = squared / squared.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return WindowScores(
            score=torch.where(scorable, samples.mean(dim=0), undefined),
            uncertainty=torch.where(scorable, samples.std(dim=0), undefined),
            contributions=torch.where(scorable[:, None], contributions, undefined[:, None]),
        )

    def score(self, windows: Windows) -> Scores:
        """The base's batched scores, with ``log_branch``: which entities were scored with
        their logs."""
        scores = super().score(windows)
        _, has_logs = self._reindexed_logs(
            windows.logs if self.log_branch else None, windows.values.shape[:2]
        )
        scores.log_branch = has_logs
        return scores

    # -------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["log_inputs"] = {
            "features": list(self.log_features_),
            "center": self.log_center_,
            "scale": self.log_scale_,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        logs = state["log_inputs"]
        self.log_features_ = list(logs["features"])
        self.log_center_ = np.asarray(logs["center"], dtype=np.float32)
        self.log_scale_ = np.asarray(logs["scale"], dtype=np.float32)
        super().load_state_dict(state)
