"""Forecast quality of the ``forecaster`` detector, measured as its seed paper measures it.

For every entity of a labelled dataset (:mod:`aiops_plugin.evaluation.datasets`) the forecaster is
fitted on the train split exactly as the agent fits it (:func:`build_detector`, the default
settings, ``horizon_steps`` from the default ``calibration.horizons`` and the dataset's step) and
asked, at every ``stride``-th step of the test split, for the values 1..H steps ahead from the
``window - 1`` steps before. The same origins and context are given to the baselines:

- ``seasonal-naive``: the value one season (1 day in steps) before the target,
  ``y[t + h - season]``; the last value ``y[t]`` where that is not in the history or missing.
- ``last value``: ``y[t]`` for every horizon (persistence), for reference.
- ``linear (DLinear-style)``: DLinear's two linear layers over the moving-average trend and the
  remainder compose into one linear map of the look-back window, so we fit that map directly:
  one ``L -> H`` ridge least-squares map shared by every channel (DLinear with
  ``individual=False``), fitted on every fully observed window of the train split, in closed form.
  It is the train-split optimum of the family every DLinear with this look-back belongs to.

Measures, at each configured horizon (``calibration.horizons`` in steps, rounded up):

- MSE, MAE, RMSE in robust-standardised units: each entity-feature's median and MAD scale from
  the train split (the forecaster's own scaler, values clipped at +-50), so SMD's 38 channels
  weigh alike. Only observed targets count.
- MAPE (%) in the metric's original units, only over targets whose ``|y|`` is at least
  ``MAPE_FLOOR_FRACTION`` of that feature's 99th percentile of ``|y|`` on the train split (and
  above zero): near-zero values would make it explode. The share of targets it covers is reported.

Errors are averaged per entity first, then over the entities of a dataset (each entity weighs the
same, as in the detection benchmark).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aiops_plugin.config import CalibrationConfig, DetectorsConfig
from aiops_plugin.detectors.forecaster import ForecasterDetector
from aiops_plugin.detectors.registry import build_detector
from aiops_plugin.evaluation import datasets
from aiops_plugin.evaluation.benchmark import machine_description, series_windows
from aiops_plugin.windows import Windows

SEASON_SECONDS = 86400.0
MAPE_FLOOR_FRACTION = 0.1
RIDGE = 1e-3
METHODS = ("forecaster", "linear (DLinear-style)", "seasonal-naive", "last value")


@dataclass
class HorizonErrors:
    """One method's errors at one horizon on one entity."""

    dataset: str
    entity: str
    method: str
    horizon_steps: int
    horizon_seconds: float
    mse: float
    mae: float
    rmse: float
    mape: float
    mape_coverage: float
    targets: int


@dataclass
class ForecastRun:
    command: str
    datasets: list[str]
    rows: list[HorizonErrors]
    fit_seconds: dict[str, list[float]]
    origins: dict[str, int]
    stride: int
    wall_seconds: float
    machine: str
    settings: dict = field(default_factory=dict)


def horizon_steps_for(step_seconds: float) -> list[int]:
    """The default early-warning horizons in steps of ``step_seconds``, rounded up."""
    return sorted(
        {max(1, math.ceil(h / step_seconds - 1e-9)) for h in CalibrationConfig().horizons}
    )


def _windows_of(values: np.ndarray, origins: np.ndarray, length: int) -> np.ndarray:
    """``values`` ``(time, features)`` -> ``(origins, length, features)``, each ending at its
    origin (inclusive)."""
    index = origins[:, None] + np.arange(-length + 1, 1)[None, :]
    return values[index]


def fit_linear_map(
    standard: np.ndarray, mask: np.ndarray, context: int, horizon: int
) -> np.ndarray:
    """Ridge least-squares ``(context + 1, horizon)`` map (last row: bias) from a channel's
    ``context`` standardised values to its next ``horizon``, shared by all channels; fitted on
    every fully observed train window of every channel. ``standard``, ``mask``: ``(time, F)``."""
    length = context + horizon
    x = torch.from_numpy(standard).unfold(0, length, 1)  # (windows, F, length)
    m = torch.from_numpy(mask).unfold(0, length, 1)
    samples = x.reshape(-1, length)[m.reshape(-1, length).min(dim=1).values > 0].double()
    inputs = torch.cat([samples[:, :context], torch.ones(len(samples), 1, dtype=torch.float64)], 1)
    gram = inputs.T @ inputs
    gram += RIDGE * gram.diagonal().mean() * torch.eye(context + 1, dtype=torch.float64)
    return torch.linalg.solve(gram, inputs.T @ samples[:, context:]).float().numpy()


def _errors(
    predicted: np.ndarray,
    target: np.ndarray,
    observed: np.ndarray,
    predicted_raw: np.ndarray,
    target_raw: np.ndarray,
    floor: np.ndarray,
) -> tuple[float, float, float, float, int]:
    """MSE, MAE (standardised), MAPE % and its coverage (original units), target count."""
    error = (predicted - target)[observed]
    mse, mae = float(np.mean(error**2)), float(np.mean(np.abs(error)))
    eligible = observed & (np.abs(target_raw) >= floor) & (floor > 0)
    mape = float("nan")
    if eligible.any():
        relative = np.abs(predicted_raw - target_raw)[eligible] / np.abs(target_raw[eligible])
        mape = 100.0 * float(np.mean(relative))
    return mse, mae, mape, float(eligible.sum() / max(observed.sum(), 1)), int(observed.sum())


def evaluate_series(
    series: datasets.LabelledSeries,
    detectors: DetectorsConfig,
    stride: int,
    device: torch.device,
) -> tuple[list[HorizonErrors], float, int]:
    """Fit on the train split, forecast from every ``stride``-th test origin, and compare."""
    steps = horizon_steps_for(series.step_seconds)
    detectors = detectors.model_copy(deep=True)
    detectors.forecaster.horizon_steps = steps
    detector = build_detector("forecaster", detectors, device)
    assert isinstance(detector, ForecasterDetector)

    def windows(values: np.ndarray) -> Windows:
        return series_windows(series, values)

    started = time.perf_counter()
    detector.fit(windows(series.train))
    fit_seconds = time.perf_counter() - started
    context, horizon = detector.context, detector.horizon
    full = np.concatenate([series.train, series.test])
    standard, mask = detector.scaler_.transform(windows(full))
    standard, mask = standard[0], mask[0]
    observed_raw = np.isfinite(full)
    first = max(len(series.train) - 1, context - 1)
    origins = np.arange(first, len(full) - horizon, stride)

    contexts = _windows_of(standard, origins, context)
    forecaster_mean, _ = detector.predict(contexts, _windows_of(mask, origins, context))
    train_standard, train_mask = standard[: len(series.train)], mask[: len(series.train)]
    linear = fit_linear_map(train_standard, train_mask, context, horizon)
    linear_mean = np.einsum("olf,lh->ohf", contexts, linear[:-1]) + linear[-1][None, :, None]
    season = max(1, round(SEASON_SECONDS / series.step_seconds))

    key = windows(series.train).keys[0]
    center, scale = detector.scaler_.centers_[key], detector.scaler_.scales_[key]
    with np.errstate(all="ignore"):
        floor = MAPE_FLOOR_FRACTION * np.nanquantile(np.abs(series.train), 0.99, axis=0)
    floor = np.nan_to_num(floor, nan=0.0)
    rows: list[HorizonErrors] = []
    for h in steps:
        targets = origins + h
        target, observed = standard[targets], mask[targets] > 0
        target_raw = full[targets]
        lagged = targets - season
        seasonal_ok = (lagged >= 0)[:, None] & observed_raw[np.maximum(lagged, 0)]
        last = standard[origins]
        seasonal = np.where(seasonal_ok, standard[np.maximum(lagged, 0)], last)
        predictions = {
            "forecaster": forecaster_mean[:, h - 1],
            "linear (DLinear-style)": linear_mean[:, h - 1],
            "seasonal-naive": seasonal,
            "last value": last,
        }
        for method in METHODS:
            predicted = predictions[method]
            predicted_raw = center + scale * predicted
            mse, mae, mape, coverage, count = _errors(
                predicted, target, observed, predicted_raw, target_raw, floor
            )
            rows.append(
                HorizonErrors(
                    dataset=series.dataset,
                    entity=series.entity,
                    method=method,
                    horizon_steps=h,
                    horizon_seconds=h * series.step_seconds,
                    mse=mse,
                    mae=mae,
                    rmse=math.sqrt(mse),
                    mape=mape,
                    mape_coverage=coverage,
                    targets=count,
                )
            )
    return rows, fit_seconds, len(origins)


def run_forecast_benchmark(
    dataset_names: Sequence[str],
    entities: Sequence[str] | None = None,
    data_root: Path | None = None,
    stride: int = 10,
    detectors: DetectorsConfig | None = None,
    device: torch.device | None = None,
    command: str = "",
    progress: bool = True,
) -> ForecastRun:
    """Evaluate every entity of every dataset; seeds are fixed in the configuration."""
    started = time.perf_counter()
    torch.manual_seed(0)
    detectors = detectors or DetectorsConfig()
    device = device or torch.device("cpu")
    all_series = datasets.load_datasets(dataset_names, entities, data_root)
    rows: list[HorizonErrors] = []
    fit_seconds: dict[str, list[float]] = {}
    origins: dict[str, int] = {}
    for series in tqdm(all_series, desc="forecast", unit="fit", disable=not progress):
        part, seconds, count = evaluate_series(series, detectors, stride, device)
        rows += part
        fit_seconds.setdefault(series.dataset, []).append(seconds)
        origins[series.dataset] = origins.get(series.dataset, 0) + count
    return ForecastRun(
        command=command,
        datasets=list(dataset_names),
        rows=rows,
        fit_seconds=fit_seconds,
        origins=origins,
        stride=stride,
        wall_seconds=time.perf_counter() - started,
        machine=machine_description(device),
        settings=detectors.forecaster.model_dump(
            exclude={"enabled", "horizon_steps", "export_metrics", "interval"}
        ),
    )


def _cell(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _horizon_name(seconds: float) -> str:
    minutes = seconds / 60.0
    return f"{minutes:g} min" if minutes < 120 else f"{minutes / 60:g} h"


def forecast_markdown(run: ForecastRun) -> str:
    """The ``forecast`` section of docs/benchmarks.md."""
    lines = [
        "## Forecast quality (forecaster)",
        "",
        f"Command: `{run.command}`",
        "",
        f"Machine: {run.machine}. Wall time: {run.wall_seconds:.0f} s. Fitted on each entity's "
        f"train split, forecasts from every {run.stride}th test step (the origin) for the "
        "configured early-warning horizons (5, 15, 30 min, in steps of the dataset, rounded up). "
        "MSE, MAE and RMSE are in robust-standardised units (each entity-feature's train median "
        "and MAD scale, so SMD's 38 channels weigh alike); MAPE is in the metrics' own units, only "
        f"over targets with |y| >= {MAPE_FLOOR_FRACTION:g} x that feature's train 99th "
        "percentile of |y| ('MAPE cov.' = share of targets it covers). Means over entities.",
        "",
        "Baselines: seasonal-naive = the value one day earlier (last value where the history is "
        "shorter or the value missing); linear (DLinear-style) = one ridge least-squares map of "
        "the same look-back window to the horizon, shared by all channels, fitted on the train "
        "split in closed form (DLinear's trend and remainder layers compose into such a map); "
        "last value = persistence, for reference.",
        "",
        f"Forecaster settings: `{run.settings}`",
        "",
    ]
    for dataset in run.datasets:
        rows = [row for row in run.rows if row.dataset == dataset]
        if not rows:
            continue
        entities = sorted({row.entity for row in rows})
        fits = run.fit_seconds.get(dataset, [])
        lines += [
            f"### {dataset.upper()} ({len(entities)} entities, {run.origins.get(dataset, 0)} "
            f"origins; forecaster fit {np.mean(fits):.1f} s per entity on average)",
            "",
            "| horizon | method | MSE | MAE | RMSE | MAPE % | MAPE cov. |",
            "|---|---|---|---|---|---|---|",
        ]
        for horizon in sorted({row.horizon_seconds for row in rows}):
            for method in METHODS:
                mine = [r for r in rows if r.horizon_seconds == horizon and r.method == method]
                mse, mae, rmse = (
                    float(np.mean([getattr(r, key) for r in mine]))
                    for key in ("mse", "mae", "rmse")
                )
                mapes = [r.mape for r in mine if math.isfinite(r.mape)]
                mape = float(np.mean(mapes)) if mapes else float("nan")
                coverage = float(np.mean([r.mape_coverage for r in mine]))
                steps = mine[0].horizon_steps
                lines.append(
                    f"| {_horizon_name(horizon)} ({steps} step{'s' * (steps > 1)}) | {method} | "
                    f"{_cell(mse)} | "
                    f"{_cell(mae)} | {_cell(rmse)} | {_cell(mape, 1)} | {coverage:.0%} |"
                )
        lines.append("")
    return "\n".join(lines)
