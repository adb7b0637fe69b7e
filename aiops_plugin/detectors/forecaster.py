"""``forecaster``: a long/short-term dependency forecaster whose one-step residual is the score.

After Wang, "Towards Intelligent Backend Operations via Unified Temporal Representation and
Prediction Modeling" (seed ``long-short-temporal-forecaster.txt``). The network
(:class:`LongShortForecaster`) reads ``L = window - 1`` context steps of an entity's standardised
features (per-entity robust scaling, :class:`~aiops_plugin.detectors.scaling.RobustScaler`):

1. encoder ``h_t = Enc(x_t)`` (eq. 1): an MLP of each step's values and observed-mask (missing
   values enter as 0 with mask 0, so the network can tell "at the median" from "not measured");
2. short-term channel ``s_t = GRU(h_t, s_{t-1})`` (eq. 2) over the context; ``s_L`` is used;
3. long-term channel ``c_L = sum_i alpha_{L,i} h_i W_v`` (eqs. 3-4): multi-head self-attention
   with the last context step as the query over every context step, plus a learned position
   embedding (attention alone is blind to order). The decoder reads only ``c_L``, so only that
   query is computed;
4. gated fusion (eq. 5): ``g = sigmoid(W_s s_L + W_c c_L + b)`` and
   ``z = g * s_L + (1 - g) * c_L``. The paper calls eq. 5's output the fused vector itself; we
   use it as a gate between the two channels, so ``z`` keeps the channels' scale and ``g`` (in
   (0, 1), returned for inspection) says per dimension how much each channel is trusted;
5. decoder (eq. 6), extended from ``x_{t+1}`` to the next ``H`` steps with a Gaussian predictive
   head: an MLP of ``z`` gives, for each horizon ``h = 1..H`` and feature, a mean and a
   log-variance (standard deviation floored at ``MIN_SIGMA``, in robust-scale units).
   ``H = max(horizon_steps)``, the longest early-warning horizon (``calibration.horizons``) in
   steps, rounded up. A linear autoregressive "highway" (one ``L -> H`` map shared by every
   feature, as in LSTNet) is added to the mean: the paper's "residual calibration" is not spelled
   out, and this skip lets the deep channels model what a linear extrapolation of each feature
   misses.

Where the paper is silent:

- Training: each sample is ``L + H`` steps (the ``training_window`` hook of
  :class:`~aiops_plugin.detectors.deep.WindowedDeepDetector`): the network reads the first ``L``
  and is trained with the Gaussian negative log-likelihood
  ``0.5 * (log sigma^2 + (y - mu)^2 / sigma^2)`` averaged over every observed target of all ``H``
  horizons; missing targets do not count.
- Anomaly score of step ``t``: the network reads steps ``t - L .. t - 1`` (never the value it
  scores) and its one-step-ahead forecast ``mu, sigma`` gives ``z_f = (x_{t,f} - mu_f) / sigma_f``
  for every feature observed at ``t``: the residual scaled by the predicted spread. The step's
  value is ``mean_f z_f^2``, and the raw score is the root of its mean over ``t`` and the
  ``score_steps - 1`` steps before (``context_steps`` grows by as much). Pooling, as Telemanom
  (Hundman et al., KDD 2018) smooths its forecast errors, keeps a lasting anomaly visible: a
  one-step forecast follows a level shift after a step or two, so its raw residual is high only
  at the onset. Contributions are each feature's share of the ``z^2`` summed over the same steps
  (each step weighted by its ``mean_f z_f^2``). No score where ``t`` has no observed value, or
  where its context has none (it would come from imputed values alone).
- Uncertainty: the root mean square of ``sigma_f`` over the same features and steps, in
  robust-scale units (1.0 = the feature's typical spread on the fit window): how wide the model
  expected those steps to be, i.e. the spread the residuals were divided by. On export it is
  divided by the same per-entity threshold as the score, like every detector's uncertainty.
- Forecast: a forecast made at step ``t`` reads ``t - L + 1 .. t`` and predicts ``t + 1 .. t + H``.
  :meth:`ForecasterDetector.forecast_distribution` gives the Gaussian predictive distribution
  (mean and sigma per step ahead and feature, robust-scale units, with each entity's robust center
  and scale to map it back) for every feature of the model, at the last step or at any steps of
  a window; :meth:`ForecasterDetector.forecast_distributions` yields it in chunks of steps over
  a long window, so a caller that needs the forecast made at every step (the early warning's
  calibration, :mod:`aiops_plugin.early_warning`) reduces each chunk before the next is made and
  memory stays bounded (entities x steps x H x features is large). Neither depends on
  ``export_metrics``. The exported series (:meth:`ForecasterDetector.forecast`) are built from
  the last step's distribution: only the features in ``export_metrics`` (nothing when it is
  empty, which bounds the series), the horizons in ``horizon_steps``, ``mu +- q * sigma`` with
  ``q`` the normal quantile of the central ``interval``, mapped back to the metric's original
  units with the entity's own robust center and scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from aiops_plugin.detectors.base import Forecast, Scores
from aiops_plugin.detectors.deep import (
    MAX_STANDARD,
    WindowedDeepDetector,
    WindowScores,
    default_score_batch_size,
    sliding_windows,
)
from aiops_plugin.detectors.scaling import RobustScaler
from aiops_plugin.detectors.training import TrainingSettings, autocast
from aiops_plugin.windows import Windows

#: Floor of the predicted standard deviation, robust-scale units: a feature that never moved in
#: the fit window would otherwise get sigma -> 0 and turn any wiggle into an infinite score.
MIN_SIGMA = 0.05
#: Bound on the elements of one chunk of :meth:`ForecasterDetector.forecast_distributions`
#: (entities x steps x max(context, H) x features), so a long window never needs more memory
#: than ~100 MB of float32 at a time however many entities the group has.
MAX_CHUNK_ELEMENTS = 1 << 23


class ForecastOutput(NamedTuple):
    """What :class:`LongShortForecaster` returns.

    Attributes:
        mean: ``(batch, horizon, features)`` predicted standardised values of steps 1..H ahead.
        log_var: the same shape, log of the predictive variance.
        gate: ``(batch, hidden)`` fusion gate ``g`` in (0, 1): weight of the short-term channel.
    """

    mean: torch.Tensor
    log_var: torch.Tensor
    gate: torch.Tensor


@dataclass
class ForecastDistribution:
    """Gaussian predictive distributions of the forecasts made at some steps of a window, for
    every feature of the model.

    Attributes:
        features: the model's features (last axis).
        origins: ``(steps,)`` indices into the windows' time axis of the steps the forecasts were
            made at (the last step each one read).
        mean: ``(entities, steps, H, features)`` float32, predicted standardised values of steps
            ``1..H`` after each origin (robust-scale units); NaN where ``valid`` is False.
        sigma: the same shape, predictive standard deviation (at least ``MIN_SIGMA``).
        observed: ``(entities, steps, features)`` bool, the feature was observed at least once in
            the context the forecast read: where it was not, its forecast is an imputation.
        valid: ``(entities, steps)`` bool, a forecast was made: the origin step and its context
            hold an observed value.
        center: ``(entities, features)`` each entity's robust center, original units.
        scale: ``(entities, features)`` its robust scale: ``original = center + scale * z``.
    """

    features: list[str]
    origins: np.ndarray
    mean: np.ndarray
    sigma: np.ndarray
    observed: np.ndarray
    valid: np.ndarray
    center: np.ndarray
    scale: np.ndarray


class LongShortForecaster(nn.Module):
    """Encoder -> GRU short-term channel || self-attention long-term channel -> gated fusion ->
    Gaussian decoder of the next ``horizon`` steps.

    Input ``values`` and ``mask`` are ``(batch, context, features)``; missing values are 0 with
    mask 0.
    """

    def __init__(
        self,
        n_features: int,
        context: int,
        horizon: int,
        hidden: int = 64,
        heads: int = 4,
        gru_layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.context = context
        self.horizon = horizon
        self.encoder = nn.Sequential(
            nn.Linear(2 * n_features, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.short_term = nn.GRU(
            hidden,
            hidden,
            num_layers=gru_layers,
            batch_first=True,
            dropout=dropout if gru_layers > 1 else 0.0,
        )
        self.position = nn.Parameter(torch.randn(context, hidden) * 0.02)
        self.long_term = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.gate_short = nn.Linear(hidden, hidden, bias=False)
        self.gate_long = nn.Linear(hidden, hidden)
        self.decoder = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, horizon * n_features * 2),
        )
        self.highway = nn.Linear(context, horizon)
        self.min_log_var = 2.0 * math.log(MIN_SIGMA)

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> ForecastOutput:
        batch = values.shape[0]
        h = self.encoder(torch.cat([values, mask], dim=-1))
        short, _ = self.short_term(h)
        s = short[:, -1]
        keyed = h + self.position
        c, _ = self.long_term(keyed[:, -1:], keyed, keyed, need_weights=False)
        c = c[:, 0]
        gate = torch.sigmoid(self.gate_short(s) + self.gate_long(c))
        z = gate * s + (1.0 - gate) * c
        out = self.decoder(z).view(batch, self.horizon, self.n_features, 2)
        linear = self.highway(values.transpose(1, 2)).transpose(1, 2)
        mean = out[..., 0] + linear
        log_var = self.min_log_var + nn.functional.softplus(out[..., 1] - self.min_log_var)
        return ForecastOutput(mean=mean, log_var=log_var, gate=gate)


def gaussian_nll(output: ForecastOutput, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gaussian negative log-likelihood (without the constant) averaged over observed targets.

    ``target`` and ``mask`` are ``(batch, horizon, features)``; masked targets do not count.
    """
    nll = 0.5 * (output.log_var + (target - output.mean) ** 2 * torch.exp(-output.log_var))
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


def resolve_export_metrics(names: list[str], features: list[str]) -> tuple[list[str], list[str]]:
    """The features of one group that ``detectors.forecaster.export_metrics`` names, and what
    is wrong with the names that belong to this group but match none of its features.

    A name is a feature's full name (``cpu{cpu="0"}``) or a query name: a query that gives one
    series per entity is ``mem_available_ratio{job="node"}`` when its PromQL keeps a label
    beyond the entity's (``job`` in the example queries), and the bare name means that one
    feature. A query name with several features must be spelled out (which one is meant?);
    a name of another group's query is that group's business.
    """
    exported: list[str] = []
    problems: list[str] = []
    for name in names:
        if name in features:
            exported.append(name)
            continue
        query = name.split("{", 1)[0]
        candidates = [f for f in features if f == query or f.startswith(query + "{")]
        if not candidates:
            continue
        if len(candidates) == 1 and "{" not in name:
            exported.append(candidates[0])
            continue
        shown = ", ".join(candidates[:5]) + (", ..." if len(candidates) > 5 else "")
        problems.append(
            f"detectors.forecaster.export_metrics: {name!r} matches no feature; the query "
            f"{query!r} gives {len(candidates)}: {shown}"
        )
    return list(dict.fromkeys(exported)), problems


class ForecasterDetector(WindowedDeepDetector):
    """Scores each step by its one-step-ahead forecast residual; forecasts the next steps."""

    name: ClassVar[str] = "forecaster"

    def __init__(
        self,
        window: int = 64,
        hidden: int = 64,
        heads: int = 4,
        gru_layers: int = 1,
        dropout: float = 0.1,
        horizon_steps: list[int] | None = None,
        score_steps: int = 15,
        export_metrics: list[str] | None = None,
        interval: float = 0.9,
        training: TrainingSettings | None = None,
        max_train_windows: int = 20000,
        validation_fraction: float = 0.1,
        min_observed_fraction: float = 0.5,
        score_batch_size: int = 0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(
            window=window,
            training=training,
            max_train_windows=max_train_windows,
            validation_fraction=validation_fraction,
            min_observed_fraction=min_observed_fraction,
            score_batch_size=score_batch_size,
            device=device,
        )
        self.hidden = hidden
        self.heads = heads
        self.gru_layers = gru_layers
        self.dropout = dropout
        self.horizon_steps = sorted(set(horizon_steps or [1]))
        self.score_steps = score_steps
        self.export_metrics = list(export_metrics or [])
        self.interval = interval

    @property
    def context(self) -> int:
        """Steps the network reads: the window less the step it scores."""
        return self.window - 1

    @property
    def horizon(self) -> int:
        """Steps the decoder predicts, 1..H."""
        return max(self.horizon_steps)

    @property
    def training_window(self) -> int:
        return self.context + self.horizon

    @property
    def context_steps(self) -> int:
        """The network's context, plus the earlier steps whose residuals the score pools."""
        return self.context + self.score_steps - 1

    def hyper_parameters(self) -> dict[str, Any]:
        """What shapes the network; ``export_metrics`` and ``interval`` are read at scoring
        time from the configuration instead, so changing them needs no refit."""
        return {
            "hidden": self.hidden,
            "heads": self.heads,
            "gru_layers": self.gru_layers,
            "dropout": self.dropout,
            "horizon_steps": list(self.horizon_steps),
            "score_steps": self.score_steps,
        }

    def build_model(self, n_features: int) -> LongShortForecaster:
        return LongShortForecaster(
            n_features,
            self.context,
            self.horizon,
            hidden=self.hidden,
            heads=self.heads,
            gru_layers=self.gru_layers,
            dropout=self.dropout,
        )

    def loss(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x``, ``mask``: ``(batch, context + horizon, features)``."""
        output = model(x[:, : self.context], mask[:, : self.context])
        return gaussian_nll(output, x[:, self.context :], mask[:, self.context :])

    def score_batch(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> WindowScores:
        """Scaled one-step residual of each window's last step, from the steps before it.

        ``x``, ``mask``: ``(batch, window, features)``. Returns the step's root-mean-square
        scaled residual over its observed features, the RMS predictive spread behind it
        (robust-scale units) and each feature's share of the squared scaled residuals.
        """
        output = model(x[:, :-1], mask[:, :-1])
        spread = torch.exp(0.5 * output.log_var[:, 0].float())
        observed = mask[:, -1]
        count = observed.sum(dim=1)
        squared = ((x[:, -1] - output.mean[:, 0].float()) / spread) ** 2 * observed
        score = torch.sqrt(squared.sum(dim=1) / count.clamp(min=1.0))
        uncertainty = torch.sqrt((spread**2 * observed).sum(dim=1) / count.clamp(min=1.0))
        unscorable = (count == 0) | (mask[:, :-1].sum(dim=(1, 2)) == 0)
        nan = torch.full_like(score, math.nan)
        return WindowScores(
            score=torch.where(unscorable, nan, score),
            uncertainty=torch.where(unscorable, nan, uncertainty),
            contributions=squared / squared.sum(dim=1, keepdim=True).clamp(min=1e-12),
        )

    def score(self, windows: Windows) -> Scores:
        """Per-step scores pooled over the last ``score_steps`` steps (root mean square), and
        the forecast made at the last step."""
        steps = super().score(windows)
        contributions = None
        if steps.contributions is not None:
            weights = np.nan_to_num(steps.score**2)[..., None] * np.nan_to_num(steps.contributions)
            pooled = _trailing_sum(weights, self.score_steps)
            total = pooled.sum(axis=2, keepdims=True)
            contributions = np.where(
                np.isfinite(steps.score)[..., None], pooled / np.maximum(total, 1e-12), np.nan
            ).astype(np.float32)
        return Scores(
            score=_trailing_rms(steps.score, self.score_steps),
            uncertainty=None
            if steps.uncertainty is None
            else _trailing_rms(steps.uncertainty, self.score_steps),
            contributions=contributions,
            forecast=self.forecast(windows),
        )

    # ----------------------------------------------------------------------- forecasts
    @torch.no_grad()
    def predict(self, values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forecasts of the steps after each context, in robust-scale units.

        Args:
            values: ``(batch, context, features)`` standardised values, missing = 0.
            mask: the same shape, 1 where observed.

        Returns:
            mean and standard deviation, ``(batch, horizon, features)`` each, for steps 1..H.
        """
        assert self.model_ is not None
        self.model_.eval()
        means, sigmas = [], []
        chunk = self.score_batch_size or default_score_batch_size(self.device)
        for start in range(0, len(values), chunk):
            x = torch.from_numpy(values[start : start + chunk]).to(self.device)
            m = torch.from_numpy(mask[start : start + chunk]).to(self.device)
            with autocast(self.device):
                output = self.model_(x, m)
            means.append(output.mean.float().cpu())
            sigmas.append(torch.exp(0.5 * output.log_var.float()).cpu())
        return torch.cat(means).numpy(), torch.cat(sigmas).numpy()

    def forecast_distribution(
        self, windows: Windows, steps: np.ndarray | None = None
    ) -> ForecastDistribution:
        """Predictive distributions of the forecasts made at ``steps`` of ``windows``.

        ``steps``: indices into ``windows``' time axis (default: the last step), each at least
        ``context - 1`` so that a full context precedes it. All the model's features are
        forecast, whatever ``export_metrics`` holds.
        """
        features = self._require_fitted()
        n_time = len(windows.timestamps)
        origins = np.array([n_time - 1]) if steps is None else np.asarray(steps, dtype=np.int64)
        if origins.size and (origins.min() < self.context - 1 or origins.max() >= n_time):
            raise ValueError(
                f"forecast origins must lie in [{self.context - 1}, {n_time - 1}] "
                f"(a full {self.context}-step context before each), got "
                f"[{origins.min()}, {origins.max()}]"
            )
        begin = int(origins.min()) - self.context + 1 if origins.size else 0
        end = int(origins.max()) + 1 if origins.size else 0
        span = windows.reindex_features(features).tail(n_time - begin).head(end - begin)
        standard, mask = self.scaler_.transform(span, clip=MAX_STANDARD)
        return self._distribution(span.keys, features, standard, mask, origins - begin, begin)

    def forecast_distributions(
        self, windows: Windows, first: int = 0, max_elements: int = MAX_CHUNK_ELEMENTS
    ) -> Iterator[ForecastDistribution]:
        """The forecasts made at every step from ``first`` (and ``context - 1`` at the earliest)
        to the last of ``windows``, in chunks of consecutive steps of at most ``max_elements``
        elements (entities x steps x max(context, H) x features) each, in time order."""
        features = self._require_fitted()
        windows = windows.reindex_features(features)
        standard, mask = self.scaler_.transform(windows, clip=MAX_STANDARD)
        n_entities, n_time, n_features = standard.shape
        origins = np.arange(max(first, self.context - 1), n_time)
        per_step = max(1, n_entities * max(self.context, self.horizon) * n_features)
        chunk = max(1, max_elements // per_step)
        keys = windows.keys
        for start in range(0, origins.size, chunk):
            yield self._distribution(keys, features, standard, mask, origins[start : start + chunk])

    def _distribution(
        self,
        keys: list[str],
        features: list[str],
        standard: np.ndarray,
        mask: np.ndarray,
        origins: np.ndarray,
        offset: int = 0,
    ) -> ForecastDistribution:
        """Forecasts made at ``origins`` (indices into ``standard``'s time axis, each with a
        full context) of standardised ``(entities, time, features)`` values and their mask;
        ``offset`` is added to the origins reported."""
        n_entities, _, n_features = standard.shape
        n_steps = origins.size
        starts = torch.from_numpy(origins - self.context + 1)
        values = sliding_windows(torch.from_numpy(standard), self.context)[:, starts]
        masks = sliding_windows(torch.from_numpy(mask), self.context)[:, starts]
        shape = (n_entities * n_steps, self.context, n_features)
        mean, sigma = self.predict(
            values.reshape(shape).contiguous().numpy(), masks.reshape(shape).contiguous().numpy()
        )
        mean = mean.reshape(n_entities, n_steps, self.horizon, n_features)
        sigma = sigma.reshape(n_entities, n_steps, self.horizon, n_features)
        observed = masks.numpy().any(axis=2)
        valid = mask[:, origins].any(axis=2) & observed.any(axis=2)
        mean = np.where(valid[:, :, None, None], mean, np.nan).astype(np.float32)
        sigma = np.where(valid[:, :, None, None], sigma, np.nan).astype(np.float32)
        centers, scales = _entity_parameters(self.scaler_, keys)
        return ForecastDistribution(
            features=list(features),
            origins=origins + offset,
            mean=mean,
            sigma=sigma,
            observed=observed,
            valid=valid,
            center=centers,
            scale=scales,
        )

    def forecast(self, windows: Windows) -> Forecast | None:
        """Forecasts made at the last step of ``windows`` for ``export_metrics``, in original
        units; None when nothing is to be forecast or the windows are shorter than the context."""
        features = self._require_fitted()
        exported, _ = resolve_export_metrics(self.export_metrics, features)
        if not exported or len(windows.timestamps) < self.context:
            return None
        distribution = self.forecast_distribution(windows)
        rows = np.array(self.horizon_steps) - 1
        columns = np.array([features.index(name) for name in exported])
        mean = distribution.mean[:, 0][:, rows][:, :, columns]
        sigma = distribution.sigma[:, 0][:, rows][:, :, columns]
        quantile = NormalDist().inv_cdf(0.5 + self.interval / 2.0)
        center = distribution.center[:, None, columns]
        scale = distribution.scale[:, None, columns]
        result = [
            center + scale * part
            for part in (mean, mean - quantile * sigma, mean + quantile * sigma)
        ]
        return Forecast(
            features=exported,
            horizons_seconds=np.array(self.horizon_steps, dtype=np.float64) * windows.step,
            mean=result[0].astype(np.float32),
            lower=result[1].astype(np.float32),
            upper=result[2].astype(np.float32),
            interval=self.interval,
        )


def _trailing_sum(values: np.ndarray, span: int) -> np.ndarray:
    """Sum over each step and the ``span - 1`` steps before it along axis 1 (fewer at the
    start); ``values`` ``(entities, time, ...)`` without NaN."""
    cumulative = np.cumsum(values, axis=1, dtype=np.float64)
    shifted = np.zeros_like(cumulative)
    shifted[:, span:] = cumulative[:, :-span] if span < values.shape[1] else 0.0
    return cumulative - shifted


def _trailing_rms(values: np.ndarray, span: int) -> np.ndarray:
    """Root mean square of the finite values among each step and the ``span - 1`` before it;
    NaN where the step itself is NaN. ``values``: ``(entities, time)``."""
    finite = np.isfinite(values)
    total = _trailing_sum(np.where(finite, values, 0.0) ** 2, span)
    count = _trailing_sum(finite.astype(np.float64), span)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.sqrt(total / count)
    return np.where(finite, pooled, np.nan).astype(np.float32)


def _entity_parameters(scaler: RobustScaler, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Robust centers and scales ``(entities, features)`` of ``keys`` (defaults for new ones)."""
    assert scaler.default_center_ is not None and scaler.default_scale_ is not None
    centers = np.stack([scaler.centers_.get(key, scaler.default_center_) for key in keys])
    scales = np.stack([scaler.scales_.get(key, scaler.default_scale_) for key in keys])
    return centers, scales
