"""``aiops-plugin perf``: the agent's fit and cycle against the size of the fleet, on this machine.

A synthetic fleet built from real series: the shared SMD machines tiled to N entities, entity
``i`` a copy of machine ``i mod M``'s rows from a seeded offset, multiplied by seeded jitter
(``1 + 0.02 * noise``, per value) so no two entities are identical. It is written as OpenMetrics,
backfilled into a real Prometheus with ``promtool tsdb create-blocks-from openmetrics``, read
back by the agent's own reader, fitted by :meth:`Agent.fit` on ``--fit-steps`` of history and
run through ``--cycles`` real cycles (fetch -> features -> infer -> calibrate -> export) at
successive steps, with ``/metrics`` scraped over HTTP after each.

Each N runs in a process of its own, so the peak RSS reported is that N's alone. Phase seconds
are the agent's own ``aiops_cycle_duration_seconds`` (the mean over the cycles), fit seconds its
``aiops_fit_duration_seconds`` per detector. The history is time-compressed into the recent
past (a step of 60 s, ending a few minutes ago): Prometheus accepts no history older than its
retention or newer than now.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import requests
import torch
from torch import nn

from aiops_plugin.config import DetectorsConfig
from aiops_plugin.demo import PrometheusServer, backfill, free_port
from aiops_plugin.demo.openmetrics import write_openmetrics_fleet
from aiops_plugin.detectors.base import choose_device
from aiops_plugin.detectors.deep import default_score_batch_size
from aiops_plugin.detectors.training import autocast
from aiops_plugin.evaluation import datasets
from aiops_plugin.memory import return_freed_memory
from aiops_plugin.windows import Windows

if TYPE_CHECKING:
    from aiops_plugin.agent import Agent

SECTION = "perf"
METRIC = "perf_metric_value"
GROUP = "fleet"
STEP_SECONDS = 60.0
PHASES = ("fetch", "features", "infer", "calibrate", "export")
JITTER = 0.02


@dataclass
class PerfResult:
    """One fleet size's measurements (seconds unless named otherwise)."""

    entities: int
    features: int
    detectors: list[str]
    fit_steps: int
    cycles: int
    #: writing the OpenMetrics file and promtool's backfill (set-up, not the product)
    setup_seconds: float
    fit_seconds: float
    fit_seconds_by_detector: dict[str, float]
    #: mean over the cycles, per phase
    phase_seconds: dict[str, float]
    cycle_seconds: float
    #: each cycle's seconds: the first reads the whole buffer, the later ones the new steps
    cycle_seconds_each: list[float]
    scrape_seconds: float
    scrape_bytes: int
    scrape_series: int
    peak_rss_mb: float
    peak_gpu_mb: float | None
    device: str
    dtype: str
    score_batch_size: int
    notes: list[str] = field(default_factory=list)
    #: deep detector -> windows/s of its scoring and of its bare reference kernel, same shapes
    kernels: dict[str, dict[str, float]] = field(default_factory=dict)


class _ConvAttention(nn.Module):
    """Bare Conv1d + self-attention over a window: the reference for ``multiscale`` (one
    scale, one pass) and, with a second conv instead of attention, for one denoising step."""

    def __init__(self, n_features: int, width: int, heads: int, attention: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv1d(n_features, width, 3, padding=1)
        self.attention = (
            nn.MultiheadAttention(width, heads, batch_first=True) if attention else None
        )
        self.out = None if attention else nn.Conv1d(width, n_features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(x.transpose(1, 2))
        if self.out is not None:
            return self.out(torch.relu(hidden)).transpose(1, 2)
        hidden = hidden.transpose(1, 2)
        return self.attention(hidden, hidden, hidden, need_weights=False)[0]


class _RecurrentAttention(nn.Module):
    """Bare GRU (``forecaster``) or CNN + BiLSTM (``fusion``) then self-attention."""

    def __init__(self, n_features: int, width: int, heads: int, fusion: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(n_features, width, 3, padding=1) if fusion else None
        self.recurrent = (
            nn.LSTM(width, width // 2, batch_first=True, bidirectional=True)
            if fusion
            else nn.GRU(n_features, width, batch_first=True)
        )
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        hidden = self.recurrent(x)[0]
        return self.attention(hidden, hidden, hidden, need_weights=False)[0]


def reference_kernel(name: str, settings: DetectorsConfig, n_features: int) -> nn.Module | None:
    """The bare kernel a deep detector's network is built around, at its configured widths."""
    if name == "multiscale":
        return _ConvAttention(n_features, settings.multiscale.d_model, settings.multiscale.heads)
    if name == "forecaster":
        return _RecurrentAttention(
            n_features, settings.forecaster.hidden, settings.forecaster.heads
        )
    if name == "diffusion":
        return _ConvAttention(n_features, settings.diffusion.d_model, 1, attention=False)
    if name == "fusion":
        width = 2 * settings.fusion.lstm_hidden
        return _RecurrentAttention(n_features, width, settings.fusion.heads, fusion=True)
    return None


def _best_rate(run: Callable[[], object], windows: int, repeats: int = 3) -> float:
    """Windows per second of the fastest of ``repeats`` timed runs, after one warm-up."""
    run()
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
    return windows / best


def kernel_shares(agent: Agent, n_windows: int) -> dict[str, dict[str, float]]:
    """Per deep detector of the agent's group: windows/s of its scoring of ``n_windows``
    windows (its own ``score_latest``, scaling and all) and of its bare reference kernel on a
    batch of the same shape, in the same process."""
    shares: dict[str, dict[str, float]] = {}
    for (name, _group), model in agent.models.items():
        detector = model.detector
        kernel = reference_kernel(name, agent.config.detectors, len(model.features))
        if kernel is None:
            continue
        window = detector.window
        rng = np.random.default_rng(0)
        values = rng.standard_normal((n_windows, detector.context_steps + 1, len(model.features)))
        windows = Windows.from_array(
            values.astype(np.float32),
            step=STEP_SECONDS,
            entities=[{"instance": f"kernel-{i}"} for i in range(n_windows)],
        )
        windows.features[:] = model.features
        batch = torch.from_numpy(values[:, -window:].astype(np.float32)).to(agent.device)
        kernel = kernel.to(agent.device).eval()

        def bare(kernel: nn.Module = kernel, batch: torch.Tensor = batch) -> object:
            with torch.inference_mode(), autocast(agent.device):
                return kernel(batch)

        detector_rate = _best_rate(lambda d=detector, w=windows: d.score_latest(w), n_windows)
        reference_rate = _best_rate(bare, n_windows)
        shares[name] = {
            "detector_windows_per_s": detector_rate,
            "reference_windows_per_s": reference_rate,
            "share": detector_rate / reference_rate,
        }
    return shares


def fleet_values(
    machines: Sequence[np.ndarray], entity: int, steps: int, seed: int = 0
) -> np.ndarray:
    """``(steps, features)`` rows of entity ``entity``: machine ``entity mod M`` from a seeded
    offset, times seeded jitter."""
    rng = np.random.default_rng([seed, entity])
    rows = machines[entity % len(machines)]
    offset = int(rng.integers(0, max(1, len(rows) - steps)))
    window = rows[offset : offset + steps].astype(np.float64)
    return window * (1.0 + JITTER * rng.standard_normal(window.shape))


def backfill_fleet(
    tsdb: Path,
    n: int,
    machines: Sequence[np.ndarray],
    features: Sequence[str],
    timestamps: np.ndarray,
) -> None:
    """The fleet of ``n`` hosts (``host-00000`` ...) over ``timestamps`` written as TSDB blocks
    in ``tsdb`` for a Prometheus to start on (the OpenMetrics file in between is removed)."""
    history = tsdb.parent / "fleet.om"
    entities = [{"instance": f"host-{i:05d}", "job": "perf"} for i in range(n)]
    steps = len(timestamps)
    write_openmetrics_fleet(
        history,
        METRIC,
        entities,
        "dim",
        features,
        lambda i: fleet_values(machines, i, steps),
        timestamps,
    )
    backfill(history, tsdb)
    history.unlink()


def _machines(
    data_root: Path | None, steps: int, n_features: int | None = None
) -> tuple[list[np.ndarray], list[str]]:
    """The SMD machines with at least ``steps`` rows, their first ``n_features`` metrics."""
    names = datasets.list_entities("smd", data_root)
    machines, features = [], []
    for name in names:
        series = datasets.load("smd", name, data_root)
        rows = np.concatenate([series.train, series.test])[:, :n_features]
        if len(rows) >= steps:
            machines.append(rows)
            features = list(series.feature_names)[:n_features]
    if not machines:
        raise datasets.DatasetError(f"no SMD machine has {steps} rows for the perf fleet")
    return machines, features


def _config(
    prometheus_url: str,
    workdir: Path,
    n: int,
    detectors: Sequence[str],
    fit_steps: int,
    device: str,
) -> dict:
    detector_settings: dict = {"device": device}
    for name in (
        "mad",
        "pca",
        "iforest",
        "cblof",
        "multiscale",
        "forecaster",
        "diffusion",
        "fusion",
    ):
        detector_settings[name] = {"enabled": name in detectors}
    return {
        "prometheus": {"url": prometheus_url, "step": f"{STEP_SECONDS:g}s", "timeout": "120s"},
        "entities": [
            {
                "name": GROUP,
                "labels": ["instance"],
                "queries": {"smd": f"sum by (instance, dim) ({METRIC})"},
                "max_entities": n,
            }
        ],
        "detectors": detector_settings,
        "schedule": {"fit_window": f"{fit_steps * STEP_SECONDS:g}s"},
        "store": {"data_dir": str(workdir / "data")},
        "server": {"host": "127.0.0.1", "port": free_port()},
    }


def _sum(registry, name: str, labels: dict[str, str]) -> float:  # noqa: ANN001
    return float(registry.get_sample_value(name, labels) or 0.0)


def measure(
    n: int,
    detectors: Sequence[str],
    fit_steps: int,
    cycles: int,
    data_root: Path | None = None,
    device_name: str = "auto",
    workdir: Path | None = None,
    n_features: int | None = None,
    profile: Path | None = None,
) -> PerfResult:
    """Build the fleet of ``n`` entities, fit, run ``cycles`` cycles; in this process.
    ``profile``: write the cycles' cProfile (top functions by cumulative time) there."""
    from aiops_plugin.agent import Agent
    from aiops_plugin.api import HttpServer
    from aiops_plugin.config import Config

    began = time.perf_counter()
    steps = fit_steps + cycles + 1
    machines, features = _machines(data_root, steps, n_features)
    end = (time.time() // STEP_SECONDS - 3) * STEP_SECONDS
    timestamps = end - STEP_SECONDS * np.arange(steps - 1, -1, -1, dtype=np.float64)
    with tempfile.TemporaryDirectory(prefix="aiops-perf-", dir=workdir) as scratch:
        root = Path(scratch)
        backfill_fleet(root / "tsdb", n, machines, features, timestamps)
        setup = time.perf_counter() - began
        device = choose_device(device_name)
        with PrometheusServer(tsdb_dir=root / "tsdb", workdir=root / "prometheus") as prometheus:
            prometheus.start()
            config = Config.model_validate(
                _config(prometheus.url, root, n, detectors, fit_steps, device_name)
            )
            agent = Agent(config)
            agent.start_up()
            monitoring = agent.exporter.monitoring
            fit_now = float(timestamps[fit_steps])
            started = time.perf_counter()
            agent.fit(now=fit_now)
            fit_seconds = time.perf_counter() - started
            fit_by_detector = {
                name: _sum(
                    monitoring,
                    "aiops_fit_duration_seconds_sum",
                    {"entity_group": GROUP, "detector": name},
                )
                for name in detectors
            }
            server = HttpServer.for_agent(agent)
            server.start()
            url = f"http://{config.server.host}:{config.server.port}/metrics"
            phase_totals = dict.fromkeys(PHASES, 0.0)
            scrape_total = 0.0
            each: list[float] = []
            scrape_bytes = scrape_series = 0
            notes: list[str] = []
            profiler = cProfile.Profile() if profile is not None else None
            try:
                for k in range(cycles):
                    before = {
                        p: _sum(monitoring, "aiops_cycle_duration_seconds_sum", {"phase": p})
                        for p in PHASES
                    }
                    cycle_began = time.perf_counter()
                    if profiler is not None:
                        profiler.enable()
                    results = agent.infer(now=fit_now + STEP_SECONDS * (k + 1))
                    if profiler is not None:
                        profiler.disable()
                    each.append(time.perf_counter() - cycle_began)
                    for p in PHASES:
                        after = _sum(monitoring, "aiops_cycle_duration_seconds_sum", {"phase": p})
                        phase_totals[p] += after - before[p]
                    for result in results:
                        if result.error:
                            notes.append(f"cycle {k + 1}: {result.error}")
                        scored = len(result.entities)
                        if scored != n:
                            notes.append(f"cycle {k + 1}: {scored} of {n} entities scored")
                    scrape_began = time.perf_counter()
                    answer = requests.get(url, timeout=120)
                    scrape_total += time.perf_counter() - scrape_began
                    answer.raise_for_status()
                    scrape_bytes = len(answer.content)
                    scrape_series = sum(
                        1
                        for line in answer.content.split(b"\n")
                        if line.startswith(b"aiops_anomaly_score{")
                    )
                kernels = kernel_shares(agent, min(n, default_score_batch_size(device)))
            finally:
                server.stop()
                agent.store.close()
            if profiler is not None and profile is not None:
                report = io.StringIO()
                pstats.Stats(profiler, stream=report).sort_stats("cumulative").print_stats(25)
                profile.write_text(report.getvalue())
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return PerfResult(
        entities=n,
        features=len(features),
        detectors=list(detectors),
        fit_steps=fit_steps,
        cycles=cycles,
        setup_seconds=setup,
        fit_seconds=fit_seconds,
        fit_seconds_by_detector=fit_by_detector,
        phase_seconds={p: phase_totals[p] / cycles for p in PHASES},
        cycle_seconds=sum(each) / cycles,
        cycle_seconds_each=each,
        scrape_seconds=scrape_total / cycles,
        scrape_bytes=scrape_bytes,
        scrape_series=scrape_series,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_gpu_mb=peak_gpu,
        device=str(device),
        dtype="bfloat16 autocast" if device.type == "cuda" else "float32",
        score_batch_size=default_score_batch_size(device),
        notes=sorted(set(notes)),
        kernels=kernels,
    )


def fit_memory(
    n: int,
    n_features: int,
    fit_steps: int,
    detectors: Sequence[str],
    data_root: Path | None = None,
    answer_samples: int = 2_000_000,
) -> dict[str, float]:
    """Peak memory of a fit at a given size, without Prometheus: the fleet's block assembled as
    the reader leaves it (float32 values + mask), every detector fitted with its calibration
    slice and the group calibration, as :meth:`Agent.fit` does; then one range answer of
    ``answer_samples`` samples decoded (``prometheus.max_samples_per_request``: the most the
    reader holds in JSON at once). Run it in a process of its own: RSS is a process peak."""
    from aiops_plugin.calibration.stage import GroupCalibration
    from aiops_plugin.config import DetectorsConfig
    from aiops_plugin.detectors.registry import FittedModel, build_detector
    from aiops_plugin.sources.prometheus import decode_points
    from aiops_plugin.windows import Windows

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    return_freed_memory()  # as the agent does at start-up
    machines, _ = _machines(data_root, fit_steps, n_features)
    values = np.empty((n, fit_steps, n_features), dtype=np.float32)
    for i in range(n):
        values[i] = fleet_values(machines, i, fit_steps)
    windows = Windows.from_array(
        values, step=STEP_SECONDS, entities=[{"instance": f"host-{i:05d}"} for i in range(n)]
    )
    del values
    measured = {"block_mb": windows.values.nbytes / 2**20, "rss_block_mb": rss_mb()}
    started = time.perf_counter()
    raw, keys = {}, windows.keys
    settings = DetectorsConfig()
    for name in detectors:
        began = time.perf_counter()
        detector = build_detector(name, settings, torch.device("cpu"))
        _, raw[name] = FittedModel.fit_split(detector, windows, 0.25)
        measured[f"fit_{name}_s"] = time.perf_counter() - began
        measured[f"rss_after_{name}_mb"] = rss_mb()
    GroupCalibration(list(detectors), 0.05).fit(raw, keys)
    measured["fit_s"] = time.perf_counter() - started
    measured["rss_fit_mb"] = rss_mb()
    per_series = 1000
    answer = [
        {
            "metric": {"instance": f"host-{i:05d}", "dim": "m00"},
            "values": [[1.7e9 + 60 * t, f"{0.5 + 1e-6 * t:.6f}"] for t in range(per_series)],
        }
        for i in range(answer_samples // per_series)
    ]
    for item in answer:
        decode_points(item["values"], 1.7e9, 60.0, per_series)
    measured["rss_with_answer_mb"] = rss_mb()
    return measured


def measure_in_subprocess(n: int, arguments: argparse.Namespace) -> PerfResult:
    """:func:`measure` in a fresh interpreter, so each N's peak RSS is its own."""
    command = [
        sys.executable,
        "-m",
        "aiops_plugin.evaluation.perf",
        "--one",
        str(n),
        "--detectors",
        ",".join(arguments.detectors),
        "--fit-steps",
        str(arguments.fit_steps),
        "--cycles",
        str(arguments.cycles),
        "--device",
        arguments.device,
    ]
    if arguments.features is not None:
        command += ["--features", str(arguments.features)]
    if arguments.profile is not None:
        command += ["--profile", str(arguments.profile.with_suffix(f".{n}.txt"))]
    if arguments.data_root is not None:
        command += ["--data-root", str(arguments.data_root)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"perf run of {n} entities failed:\n{done.stderr[-4000:]}")
    return PerfResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def markdown(results: Sequence[PerfResult], command: str) -> str:
    first = results[0]
    lines = [
        "## Performance: fit and cycle against the number of entities",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads; Python {platform.python_version()}, torch "
        f"{torch.__version__}, device {first.device}, {first.dtype}, scoring batch "
        f"{first.score_batch_size} windows. Detectors: {', '.join(first.detectors)}; "
        f"{first.features} metrics per entity (SMD machines tiled with seeded shifts and "
        f"jitter), 1-minute steps, fit on {first.fit_steps} steps, {first.cycles} cycles at "
        "successive steps; a real Prometheus (backfilled with promtool), the agent's own "
        "reader, fit and cycle, `/metrics` scraped over HTTP after each cycle. Seconds are "
        "the agent's `aiops_cycle_duration_seconds` per phase (mean over the cycles); RSS is "
        "the peak of a process that ran that size alone.",
        "",
        "| entities | fit s | "
        + " | ".join(f"{p} s" for p in PHASES)
        + " | cycle s | first cycle s | later cycles s | entities / s | scrape s | scrape MB "
        "| score series | peak RSS MB |",
        "|" + "---|" * (len(PHASES) + 10),
    ]
    for r in results:
        lines.append(
            f"| {r.entities} | {r.fit_seconds:.1f} | "
            + " | ".join(f"{r.phase_seconds[p]:.2f}" for p in PHASES)
            + f" | {r.cycle_seconds:.2f} | {r.cycle_seconds_each[0]:.2f} | "
            + (
                f"{np.mean(r.cycle_seconds_each[1:]):.2f}"
                if len(r.cycle_seconds_each) > 1
                else "n/a"
            )
            + f" | {r.entities / max(r.cycle_seconds, 1e-9):.0f} | "
            f"{r.scrape_seconds:.3f} | {r.scrape_bytes / 1e6:.1f} | {r.scrape_series} | "
            f"{r.peak_rss_mb:.0f} |"
        )
    lines += ["", "Fit seconds per detector (training and its calibration slice):", ""]
    lines += ["| entities | " + " | ".join(first.detectors) + " |"]
    lines += ["|" + "---|" * (len(first.detectors) + 1)]
    for r in results:
        lines.append(
            f"| {r.entities} | "
            + " | ".join(f"{r.fit_seconds_by_detector.get(d, 0.0):.1f}" for d in r.detectors)
            + " |"
        )
    kernel_rows = [(r, name, k) for r in results for name, k in r.kernels.items()]
    if kernel_rows:
        lines += [
            "",
            "Deep detectors against their bare reference kernel (same window, width and batch; "
            "the detector's windows/s is its whole scoring path, Monte-Carlo samples and DDIM "
            "steps included; the kernel is one forward pass of a bare conv + attention "
            "(`multiscale`), GRU + attention (`forecaster`), two-conv denoising step "
            "(`diffusion`) or CNN + BiLSTM + attention (`fusion`) block):",
            "",
            "| entities | detector | detector windows / s | reference windows / s | share |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.entities} | {name} | {k['detector_windows_per_s']:.0f} | "
            f"{k['reference_windows_per_s']:.0f} | {100 * k['share']:.1f} % |"
            for r, name, k in kernel_rows
        ]
    notes = [f"{r.entities}: {note}" for r in results for note in r.notes]
    if notes:
        lines += ["", "Notes: " + " / ".join(notes)]
    lines.append("")
    return "\n".join(lines)


def plot(results: Sequence[PerfResult], path: Path) -> None:
    """Cycle seconds per phase against the number of entities (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    sizes = [r.entities for r in results]
    for phase in PHASES:
        axis.plot(sizes, [max(r.phase_seconds[phase], 1e-4) for r in results], "o-", label=phase)
    axis.plot(sizes, [r.cycle_seconds for r in results], "k--", label="whole cycle")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("entities")
    axis.set_ylabel("seconds per cycle")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiops-plugin perf", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--entities", default="100,1000", help="comma-separated fleet sizes")
    parser.add_argument("--detectors", default="mad,pca", help="comma-separated detectors")
    parser.add_argument("--fit-steps", type=int, default=1440, help="steps of history to fit on")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--features", type=int, default=None, help="metrics per entity (default: all 38 of SMD)"
    )
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, help="write a named section of this file")
    parser.add_argument("--section", default=SECTION, help="the section's name (default perf)")
    parser.add_argument("--image", type=Path, help="PNG of cycle time against entities")
    parser.add_argument(
        "--profile", type=Path, help="cProfile of the cycles, one file per size (PATH.N.txt)"
    )
    parser.add_argument(
        "--fit-memory",
        type=int,
        metavar="N",
        help="instead: peak memory of a fit of N entities (--features, --fit-steps, "
        "--detectors) without Prometheus, and of one decoded range answer; prints JSON",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from aiops_plugin.evaluation.benchmark import write_markdown_section

    arguments = _parser().parse_args(argv)
    arguments.detectors = [d.strip() for d in arguments.detectors.split(",") if d.strip()]
    if arguments.fit_memory is not None:
        measured = fit_memory(
            arguments.fit_memory,
            arguments.features or 38,
            arguments.fit_steps,
            arguments.detectors,
            arguments.data_root,
        )
        print(json.dumps(measured))
        return 0
    if arguments.one is not None:
        result = measure(
            arguments.one,
            arguments.detectors,
            arguments.fit_steps,
            arguments.cycles,
            arguments.data_root,
            arguments.device,
            n_features=arguments.features,
            profile=arguments.profile,
        )
        print(json.dumps(asdict(result)))
        return 0
    sizes = [int(size) for size in arguments.entities.split(",") if size.strip()]
    results = [measure_in_subprocess(n, arguments) for n in sizes]
    given = list(sys.argv[1:] if argv is None else argv)
    text = markdown(results, "aiops-plugin perf " + " ".join(map(shlex.quote, given)))
    print(text)
    if arguments.markdown is not None:
        write_markdown_section(arguments.markdown, arguments.section, text)
    if arguments.image is not None:
        plot(results, arguments.image)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
