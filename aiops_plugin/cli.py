"""``aiops-plugin`` command line: thin: parse, call, print.

A bad configuration exits with code 2 and a message naming the file and the field; a failure the
user can act on (Prometheus unreachable) exits with code 1 and one line, never a traceback.
The user-facing ``--help`` text is :data:`HELP`, not this note.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from aiops_plugin.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from aiops_plugin.agent import Agent

HELP = (
    "AIOps for Prometheus: an agent that reads your metrics with PromQL on a schedule, scores "
    "anomalies per entity (host, pod, service) and exports the scores, anomaly probabilities and "
    "forecasts on its own /metrics, for Prometheus to scrape and alert on.\n\n"
    "Start with `aiops-plugin check-config FILE`, then `aiops-plugin run --config FILE`; `fit` "
    "and `score --once` run one fit or one scoring cycle by hand, `demo` shows the whole path on "
    "this machine.\n\n"
    "Exit codes: 0 done, 1 failed (e.g. Prometheus unreachable), 2 bad configuration or usage."
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)

#: ``readable=False``: an unreadable file is reported by ``load_config``, in one line
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="YAML configuration file", readable=False)
]
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("apscheduler", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # each retry is already summed up by the agent's own error line
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def _load(path: Path, starting: bool = True) -> Config:
    """The configuration at ``path``; ``starting``: an agent starts from it here, so its shard
    (which may come from the environment, the pod's ordinal) must be known too."""
    try:
        config = load_config(path)
        if starting:
            from aiops_plugin.agent import check_startable

            check_startable(config)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG) from exc
    return config


def _agent(config: Config) -> Agent:
    """The agent of ``config``; a store it cannot open is one line and exit code 1."""
    from aiops_plugin.agent import Agent
    from aiops_plugin.store import StoreError

    try:
        return Agent(config)
    except StoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from exc


@contextlib.contextmanager
def _cycle_errors_reported() -> Iterator[None]:
    """Prometheus unreachable, or a cycle that scored no group: one line, exit code 1."""
    from aiops_plugin.agent import CycleFailed
    from aiops_plugin.sources.prometheus import SourceUnavailable

    try:
        yield
    except SourceUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from exc
    except CycleFailed as exc:
        cause = exc.__cause__
        message = cause if isinstance(cause, SourceUnavailable) else f"no group scored: {exc}"
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(EXIT_FAILED) from exc


@app.command("check-config")
def check_config(
    path: Annotated[Path, typer.Argument(help="YAML configuration file", readable=False)],
) -> None:
    """Validate a configuration file; exit 2 with the file and field named when it is invalid."""
    config = _load(path, starting=False)
    groups = ", ".join(f"{g.name} ({len(g.queries)} queries)" for g in config.entities)
    typer.echo(
        f"{path}: OK. entity groups: {groups}; detectors: {config.detectors.enabled_names()}"
    )


@app.command()
def run(config: ConfigOption, verbose: bool = False) -> None:
    """Run the agent: scheduled fit and inference, /metrics, /healthz, /readyz; SIGHUP or a
    change of the file reloads the configuration."""
    from aiops_plugin.api import HttpServer

    _setup_logging(verbose)
    _agent(_load(config)).run(http=HttpServer.for_agent, config_path=config)


@app.command()
def fit(config: ConfigOption, verbose: bool = False) -> None:
    """Fit every enabled detector on the configured history window and store the models."""
    _setup_logging(verbose)
    agent = _agent(_load(config))
    agent.start_up()
    with _cycle_errors_reported():
        summary = agent.fit()
    for group, detectors in summary.items():
        typer.echo(f"{group}: {detectors}")


@app.command()
def score(
    config: ConfigOption,
    once: Annotated[bool, typer.Option("--once", help="score one cycle and print a table")] = False,
    verbose: bool = False,
) -> None:
    """Score the current data once with the stored models (fitting first where none exists)."""
    if not once:
        typer.echo(
            "error: only --once is supported; use `aiops-plugin run` to keep scoring", err=True
        )
        raise typer.Exit(EXIT_BAD_CONFIG)
    _setup_logging(verbose)
    agent = _agent(_load(config))
    agent.start_up()
    with _cycle_errors_reported():
        if agent.missing_models():
            typer.echo(f"fitting first, no stored model for {agent.missing_models()}", err=True)
            agent.fit()
        results = agent.infer()
    for result in results:
        typer.echo(_format_group(result))


def _format_group(result) -> str:  # noqa: ANN001 - GroupResult, imported lazily
    lines = [f"# group {result.group}"]
    if result.error:
        lines.append(f"  error: {result.error}")
    detectors = list(result.scores)
    if result.entities:
        header = ["entity", *detectors]
        rows = [
            [
                "/".join(labels[name] for name in sorted(labels)),
                *(_cell(result.scores[d][i]) for d in detectors),
            ]
            for i, labels in enumerate(result.entities)
        ]
        widths = [max(len(str(row[c])) for row in [header, *rows]) for c in range(len(header))]
        for row in [header, *rows]:
            lines.append(
                "  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True))
            )
    for key, reason in result.skipped.items():
        lines.append(f"  skipped {key}: {reason}")
    return "\n".join(lines)


def _cell(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.3f}" + (" !" if value >= 1.0 else "")


@app.command()
def benchmark(
    dataset: Annotated[list[str], typer.Option(help="smd, asd or nab; repeat for several")],
    detectors: Annotated[str, typer.Option(help="comma-separated detector names")] = (
        "mad,iforest,pca,cblof"
    ),
    entities: Annotated[
        str | None, typer.Option(help="comma-separated entities (default: all found)")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="folder holding smd/, asd/, nab/ (default ../shared/data)")
    ] = None,
    report_dir: Annotated[Path, typer.Option(help="where report.md, metrics.csv, PNGs go")] = Path(
        "reports/benchmark"
    ),
    false_alarm_rate: Annotated[float, typer.Option(help="sets the score scale: 1.0")] = 0.001,
    markdown: Annotated[
        Path | None, typer.Option(help="also write the markdown report to this file")
    ] = None,
    plots: Annotated[int, typer.Option(help="timeline plots per dataset")] = 3,
    slice_rows: Annotated[
        int | None,
        typer.Option(help="quick run: N train rows and N test rows around the first anomaly"),
    ] = None,
    refit_every: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="refit and recalibrate before every N test rows, as schedule.fit_every does "
            "(default: one fit on the train split)",
        ),
    ] = None,
    fit_window: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="rows of history each fit reads (the trailing ones), as schedule.fit_window "
            "does (default: the train split's length)",
        ),
    ] = None,
    fused_subsets: Annotated[
        str | None,
        typer.Option(
            help="more fused rows over subsets of the detectors, from the same fits: "
            "semicolon-separated comma lists, e.g. 'mad,pca;multiscale,forecaster'",
        ),
    ] = None,
) -> None:
    """Benchmark detectors on real labelled data through the agent's own scoring path."""
    from aiops_plugin.detectors.registry import DETECTORS
    from aiops_plugin.evaluation.benchmark import (
        run_benchmark,
        write_markdown_section,
        write_report,
    )
    from aiops_plugin.evaluation.datasets import DatasetError

    _setup_logging(False)
    unknown = sorted({name.strip() for name in detectors.split(",")} - set(DETECTORS) - {""})
    if unknown:
        typer.echo(f"error: unknown detector(s) {unknown}; known: {sorted(DETECTORS)}", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG)
    command = "aiops-plugin " + " ".join(map(shlex.quote, sys.argv[1:]))
    names = [name.strip() for name in detectors.split(",") if name.strip()]
    subsets = [
        [name.strip() for name in subset.split(",") if name.strip()]
        for subset in (fused_subsets or "").split(";")
        if subset.strip()
    ]
    outside = sorted({name for subset in subsets for name in subset} - set(names))
    if outside:
        typer.echo(
            f"error: --fused-subsets names {outside}, which are not in --detectors {names}",
            err=True,
        )
        raise typer.Exit(EXIT_BAD_CONFIG)
    try:
        run = run_benchmark(
            dataset,
            [name.strip() for name in detectors.split(",") if name.strip()],
            [name.strip() for name in entities.split(",")] if entities else None,
            data_root,
            false_alarm_rate,
            command=command,
            slice_rows=slice_rows,
            refit_every=refit_every,
            fit_window=fit_window,
            fused_subsets=subsets,
        )
    except DatasetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG) from exc
    report = write_report(run, report_dir, plots)
    if markdown:
        write_markdown_section(markdown, "metrics", report.read_text())
    typer.echo(report.read_text())
    typer.echo(f"report: {report} (csv and plots beside it); wall time {run.wall_seconds:.0f} s")


@app.command()
def perf(
    entities: Annotated[str, typer.Option(help="comma-separated fleet sizes")] = "100,1000",
    detectors: Annotated[str, typer.Option(help="comma-separated detector names")] = "mad,pca",
    fit_steps: Annotated[int, typer.Option(min=50, help="steps of history to fit on")] = 1440,
    cycles: Annotated[int, typer.Option(min=1, help="cycles measured per fleet size")] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    features: Annotated[
        int | None, typer.Option(min=1, help="metrics per entity (default: all 38 of SMD)")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="folder holding smd/ (default ../shared/data)")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="write the 'perf' section of this file")
    ] = None,
    section: Annotated[str, typer.Option(help="name of the markdown section")] = "perf",
    image: Annotated[Path | None, typer.Option(help="PNG of cycle time against entities")] = None,
    profile: Annotated[
        Path | None, typer.Option(help="cProfile of the cycles, one file per size (PATH.N.txt)")
    ] = None,
) -> None:
    """Fit and cycle time, scrape and memory against the number of entities: a fleet tiled from
    real SMD series in a real Prometheus, through the agent's own reader, fit and cycle."""
    from aiops_plugin.evaluation import perf as perf_benchmark

    argv = ["--entities", entities, "--detectors", detectors, "--fit-steps", str(fit_steps)]
    argv += ["--cycles", str(cycles), "--device", device]
    if features is not None:
        argv += ["--features", str(features)]
    if data_root is not None:
        argv += ["--data-root", str(data_root)]
    if markdown is not None:
        argv += ["--markdown", str(markdown), "--section", section]
    if image is not None:
        argv += ["--image", str(image)]
    if profile is not None:
        argv += ["--profile", str(profile)]
    raise typer.Exit(perf_benchmark.main(argv))


@app.command("benchmark-logs")
def benchmark_logs(
    data_root: Annotated[
        Path | None, typer.Option(help="folder holding loghub/ (default ../shared/data)")
    ] = None,
    embedder: Annotated[str, typer.Option(help="embedder model (local path)")] = (
        "all-MiniLM-L6-v2"
    ),
    markdown: Annotated[
        Path | None, typer.Option(help="write the 'logs' section of this file")
    ] = None,
) -> None:
    """Replay loghub BGL through the OTLP receiver and evaluate the log anomaly score."""
    from aiops_plugin.evaluation.benchmark import write_markdown_section
    from aiops_plugin.evaluation.datasets import DatasetError
    from aiops_plugin.evaluation.logs_benchmark import log_markdown, run_log_benchmark

    _setup_logging(False)
    command = "aiops-plugin " + " ".join(map(shlex.quote, sys.argv[1:]))
    try:
        result = run_log_benchmark(data_root, embedder_model=embedder, command=command)
    except DatasetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG) from exc
    text = log_markdown(result)
    if markdown:
        write_markdown_section(markdown, "logs", text)
    typer.echo(text)


@app.command("benchmark-forecast")
def benchmark_forecast(
    dataset: Annotated[list[str], typer.Option(help="smd, asd or nab; repeat for several")],
    entities: Annotated[
        str | None, typer.Option(help="comma-separated entities (default: all found)")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="folder holding smd/, asd/, nab/ (default ../shared/data)")
    ] = None,
    stride: Annotated[int, typer.Option(help="forecast from every Nth test step")] = 10,
    markdown: Annotated[
        Path | None, typer.Option(help="write the 'forecast' section of this file")
    ] = None,
) -> None:
    """Forecast quality of the forecaster (MSE, MAE, RMSE, MAPE per horizon) against a
    seasonal-naive and a DLinear-style linear baseline."""
    from aiops_plugin.evaluation.benchmark import write_markdown_section
    from aiops_plugin.evaluation.datasets import DatasetError
    from aiops_plugin.evaluation.forecasting import forecast_markdown, run_forecast_benchmark

    _setup_logging(False)
    command = "aiops-plugin " + " ".join(map(shlex.quote, sys.argv[1:]))
    try:
        run = run_forecast_benchmark(
            dataset,
            [name.strip() for name in entities.split(",")] if entities else None,
            data_root,
            stride=stride,
            command=command,
        )
    except DatasetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG) from exc
    text = forecast_markdown(run)
    if markdown:
        write_markdown_section(markdown, "forecast", text)
    typer.echo(text)


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="where Prometheus, Alertmanager and the store keep their data")
    ] = Path("./aiops-demo"),
    port: Annotated[int, typer.Option(help="port of the agent's /metrics")] = 9108,
    keep_running: Annotated[
        bool, typer.Option(help="keep everything running after the alert")
    ] = False,
) -> None:
    """Local demo: real Prometheus + Alertmanager on 127.0.0.1, a real SMD sample as history,
    the agent scoring it, and an alert delivered through Alertmanager."""
    from aiops_plugin.demo.runner import run_demo

    _setup_logging(False)
    raise typer.Exit(run_demo(workdir, agent_port=port, keep_running=keep_running))


dashboards_app = typer.Typer(
    no_args_is_help=True,
    help="Grafana dashboards (dashboards/): export for file provisioning, push over the HTTP API.",
)
app.add_typer(dashboards_app, name="dashboards")

DashboardsDirOption = Annotated[
    Path | None,
    typer.Option("--dashboards-dir", help="dashboard JSON folder (default: the shipped one)"),
]


@dashboards_app.command("export")
def dashboards_export(
    directory: Annotated[Path, typer.Argument(help="folder to write <uid>.json files into")],
    dashboards_dir: DashboardsDirOption = None,
) -> None:
    """Write the dashboards for Grafana's file provisioning (a provider's options.path)."""
    from aiops_plugin.dashboards import DashboardError, export_dashboards

    try:
        written = export_dashboards(directory, dashboards_dir)
    except DashboardError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    for path in written:
        typer.echo(str(path))


def _grafana_token(token_file: Path | None, config: Config | None) -> str | None:
    """--token-file, else AIOPS_GRAFANA_TOKEN, else grafana.token of the configuration."""
    from aiops_plugin.config import ENV_GRAFANA_TOKEN

    if token_file is not None:
        try:
            return token_file.read_text().strip()
        except OSError as exc:
            typer.echo(f"error: --token-file {token_file}: {exc}", err=True)
            raise typer.Exit(EXIT_BAD_CONFIG) from exc
    return os.environ.get(ENV_GRAFANA_TOKEN) or (config.grafana.token if config else None)


@dashboards_app.command("push")
def dashboards_push(
    grafana_url: Annotated[
        str | None,
        typer.Option("--grafana-url", envvar="AIOPS_GRAFANA_URL", help="Grafana's base URL"),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="file holding a service-account token (else AIOPS_GRAFANA_TOKEN)"),
    ] = None,
    folder: Annotated[
        str | None, typer.Option(help="folder title (default: grafana.folder, 'AIOps')")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="take url, token and folder from its grafana section"),
    ] = None,
    dashboards_dir: DashboardsDirOption = None,
    message: Annotated[str, typer.Option(help="version-history message")] = (
        "aiops-plugin dashboards push"
    ),
) -> None:
    """Upload every dashboard into a Grafana folder, overwriting by uid.

    Grafana keeps the version history; dashboards stored unchanged are left alone."""
    from urllib.parse import urlparse

    from aiops_plugin.config import GrafanaConfig
    from aiops_plugin.dashboards import DashboardError, load_dashboards
    from aiops_plugin.grafana import GrafanaError, connect, push_dashboards

    loaded = _load(config) if config else None
    settings = loaded.grafana if loaded else GrafanaConfig()
    url = grafana_url or settings.url
    if not url:
        typer.echo("error: give --grafana-url (or AIOPS_GRAFANA_URL, or grafana.url)", err=True)
        raise typer.Exit(EXIT_BAD_CONFIG)
    token = _grafana_token(token_file, loaded)
    if not token and not urlparse(url).password:
        typer.echo(
            "error: no Grafana credentials: set AIOPS_GRAFANA_TOKEN, --token-file, grafana.token, "
            "or user:password in the URL",
            err=True,
        )
        raise typer.Exit(EXIT_BAD_CONFIG)
    try:
        dashboards = load_dashboards(dashboards_dir)
        results = push_dashboards(
            connect(url, token, settings.timeout),
            dashboards,
            folder_title=folder or settings.folder,
            message=message,
        )
    except (DashboardError, GrafanaError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    for result in results:
        typer.echo(
            f"{result.status:9} {result.uid:16} version {result.version}  {result.url or ''}"
        )


if __name__ == "__main__":
    app()
