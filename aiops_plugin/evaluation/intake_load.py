"""OTLP log intake under load: the rate the agent sustains, then ten times it.

The agent runs as ``aiops-plugin run`` (logs on, SQLite store, its mining job running, its metric
source a closed port: the metric side idles). Sender processes use the real OpenTelemetry SDK
(``LoggerProvider`` -> ``BatchLogRecordProcessor`` -> ``OTLPLogExporter``, gzip); an exporter
subclass counts the records whose export the agent acknowledged. First the offered rate doubles
from ``--start-rate`` until the agent refuses some of it (429 / 503) or accepts less than 95 %:
the last rate before that is the sustained rate. Then the senders offer ten times that for
``--overload-seconds``. Reported: offered and accepted rates, refusals by reason (counted by
the agent), acknowledged records lost (acknowledged but not in the store: must be 0) and
duplicated, ``/metrics`` latency while overloaded (p50, p99, max; scraped every 0.5 s with a
10 s timeout, Prometheus' default scrape timeout), and the agent's peak RSS.

    python -m aiops_plugin.evaluation.intake_load --markdown docs/reliability.md
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from aiops_plugin.demo.ports import free_port

TOKEN = "load-test-token"
HOSTS = 8


def _agent_config(workdir: Path, port: int) -> dict[str, Any]:
    return {
        "prometheus": {"url": f"http://127.0.0.1:{free_port()}", "retries": 0, "timeout": "1s"},
        "entities": [{"name": "hosts", "labels": ["instance"], "queries": {"up": "up"}}],
        "detectors": {"device": "cpu"},
        "store": {"data_dir": str(workdir / "data")},
        "server": {"host": "127.0.0.1", "port": port},
        "logs": {
            "enabled": True,
            "entities": [{"group": "hosts", "label": "instance", "attribute": "host.name"}],
            "intake": {"token": TOKEN},
            "embedder": {"device": "cpu"},
        },
    }


def _sender(url: str, tag: str, sender: int, rate: float, seconds: float, out: Any) -> None:
    """One SDK exporter offering ``rate`` records/s for ``seconds``; puts its counts on ``out``."""
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExportResult
    from opentelemetry.sdk.resources import Resource

    counts = {"acknowledged": 0, "failed": 0}

    class Counting(OTLPLogExporter):
        def export(self, batch):  # noqa: ANN001, ANN202 - the SDK's signature
            result = super().export(batch)
            key = "acknowledged" if result == LogRecordExportResult.SUCCESS else "failed"
            counts[key] += len(batch)
            return result

    provider = LoggerProvider(resource=Resource.create({"host.name": f"node-{sender % HOSTS}"}))
    exporter = Counting(
        endpoint=f"{url}/v1/logs",
        headers={"Authorization": f"Bearer {TOKEN}"},
        compression=Compression.Gzip,
        timeout=10,
    )
    provider.add_log_record_processor(
        BatchLogRecordProcessor(
            exporter,
            max_queue_size=200_000,
            max_export_batch_size=1000,
            schedule_delay_millis=50,
        )
    )
    logger = provider.get_logger("load")
    started = time.monotonic()
    emitted = 0
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(rate * elapsed) - emitted
        for _ in range(min(due, 2000)):
            logger.emit(
                body=f"{tag}-s{sender}-{emitted} GET /api/item/{emitted % 97} 200 in "
                f"{emitted % 40} ms",
                severity_number=SeverityNumber.INFO,
                severity_text="INFO",
            )
            emitted += 1
        if due <= 0:
            time.sleep(0.005)
    provider.force_flush(30_000)
    provider.shutdown()
    out.put({"sender": sender, "emitted": emitted, **counts})


@dataclass
class Phase:
    name: str
    offered_rate: float
    seconds: float
    emitted: int
    acknowledged: int
    failed: int
    refused: dict[str, float]
    scrape_seconds: list[float]
    statuses: dict[int, int] | None = None
    retry_after: list[str] | None = None

    @property
    def accepted_rate(self) -> float:
        return self.acknowledged / self.seconds


def _metrics(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {
        sample.name + "".join(f"|{v}" for v in sample.labels.values()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _run_phase(name: str, url: str, rate: float, seconds: float, senders: int) -> Phase:
    before = _metrics(url)
    queue: Any = multiprocessing.get_context("spawn").Queue()
    processes = [
        multiprocessing.get_context("spawn").Process(
            target=_sender, args=(url, name.replace(" ", "_"), i, rate / senders, seconds, queue)
        )
        for i in range(senders)
    ]
    scrapes: list[float] = []
    done = threading.Event()
    scraper = _scraper(url, scrapes, done)
    for process in processes:
        process.start()
    scraper.start()
    results = [queue.get(timeout=seconds + 120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    done.set()
    scraper.join()
    refused = _refused(before, _metrics(url))
    return Phase(
        name,
        rate,
        seconds,
        sum(r["emitted"] for r in results),
        sum(r["acknowledged"] for r in results),
        sum(r["failed"] for r in results),
        refused,
        scrapes,
    )


def _burst_requests(count: int, records: int) -> list[bytes]:
    """Pre-encoded OTLP requests of unique records: senders that cost nothing, so the agent,
    not the sending CPU, is what saturates."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    bodies = []
    for i in range(count):
        request = ExportLogsServiceRequest()
        resource_logs = request.resource_logs.add()
        resource_logs.resource.attributes.append(
            KeyValue(key="host.name", value=AnyValue(string_value=f"node-{i % HOSTS}"))
        )
        scope = resource_logs.scope_logs.add()
        for j in range(records):
            record = scope.log_records.add(severity_number=9, severity_text="INFO")
            record.body.string_value = f"burst-{i}-{j} GET /api/item/{j % 97} 200 in {j % 40} ms"
        bodies.append(gzip.compress(request.SerializeToString(), compresslevel=1))
    return bodies


def _scraper(url: str, scrapes: list[float], done: threading.Event) -> threading.Thread:
    """``/metrics`` every 0.5 s with Prometheus' default 10 s timeout, latencies into
    ``scrapes`` (inf: no answer in time)."""

    def scrape() -> None:
        while not done.wait(0.5):
            started = time.perf_counter()
            try:
                requests.get(f"{url}/metrics", timeout=10)
                scrapes.append(time.perf_counter() - started)
            except requests.RequestException:
                scrapes.append(float("inf"))

    return threading.Thread(target=scrape, daemon=True)


def _refused(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        reason: after.get(f"aiops_logs_rejected_total|{reason}", 0.0)
        - before.get(f"aiops_logs_rejected_total|{reason}", 0.0)
        for reason in ("queue_full", "store_unavailable")
    }


def _run_burst(url: str, seconds: float, threads: int, records: int = 1000) -> Phase:
    """``threads`` senders posting pre-encoded requests back to back for ``seconds``, each
    waiting out Retry-After on 429 / 503 and sending the same request again, as SDKs do."""
    before = _metrics(url)
    bodies = _burst_requests(int(seconds * 40), records)
    lock = threading.Lock()
    counts = {"sent": 0, "acknowledged": 0, "next": 0}
    statuses: dict[int, int] = {}
    retry_after: set[str] = set()
    stop = time.monotonic() + seconds

    def send() -> None:
        session = requests.Session()
        headers = {
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
            "Authorization": f"Bearer {TOKEN}",
        }
        while time.monotonic() < stop:
            with lock:
                if counts["next"] >= len(bodies):
                    return
                body = bodies[counts["next"]]
                counts["next"] += 1
            while time.monotonic() < stop:
                answer = session.post(f"{url}/v1/logs", data=body, headers=headers, timeout=30)
                with lock:
                    statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                    counts["sent"] += records
                    if answer.status_code == 200:
                        counts["acknowledged"] += records
                if answer.status_code == 200:
                    break
                retry_after.add(answer.headers.get("Retry-After", "missing"))
                time.sleep(float(answer.headers.get("Retry-After", "1")))

    scrapes: list[float] = []
    done = threading.Event()
    scraper = _scraper(url, scrapes, done)
    workers = [threading.Thread(target=send) for _ in range(threads)]
    started = time.monotonic()
    scraper.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started
    done.set()
    scraper.join()
    return Phase(
        f"burst, {threads} raw senders",
        counts["sent"] / elapsed,
        elapsed,
        counts["sent"],
        counts["acknowledged"],
        0,
        _refused(before, _metrics(url)),
        scrapes,
        statuses,
        sorted(retry_after),
    )


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(start_rate: float, phase_seconds: float, overload_seconds: float, senders: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        port = free_port()
        config_path = workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(_agent_config(workdir, port)))
        log_file = (workdir / "agent.log").open("wb")
        agent = subprocess.Popen(
            [sys.executable, "-m", "aiops_plugin.cli", "run", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"{url}/healthz", timeout=1).ok:
                        break
                except requests.RequestException:
                    time.sleep(0.5)
            phases: list[Phase] = []
            rate, sustained = start_rate, None
            while rate <= start_rate * 2**8:
                phase = _run_phase(f"ramp {rate:.0f}/s", url, rate, phase_seconds, senders)
                phases.append(phase)
                if sum(phase.refused.values()) > 0 or phase.acknowledged < 0.95 * phase.emitted:
                    break
                sustained = phase
                rate *= 2
            base = sustained.accepted_rate if sustained is not None else phases[0].accepted_rate
            overload = _run_phase("10x overload", url, 10 * base, overload_seconds, max(senders, 4))
            phases.append(overload)
            phases.append(_run_burst(url, overload_seconds, threads=8))
            time.sleep(5)  # the writer commits what it queued
            database = workdir / "data" / "aiops.db"
            with sqlite3.connect(database) as connection:
                stored, distinct = connection.execute(
                    "SELECT count(*), count(DISTINCT body) FROM log_records"
                ).fetchone()
            peak = _peak_rss_mb(agent.pid)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=120)
            log_file.close()
    acknowledged = sum(p.acknowledged for p in phases)
    return {
        "phases": phases,
        "sustained_rate": base,
        "acknowledged": acknowledged,
        "stored": stored,
        "lost": max(0, acknowledged - stored),
        "duplicated": stored - distinct,
        "peak_rss_mb": peak,
        "agent_exit": agent.returncode,
    }


def markdown(result: dict, command: str) -> str:
    lines = [
        "### OTLP intake under load",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; agent and senders on the same machine.",
        "",
        "| phase | offered records/s | accepted records/s | emitted | acknowledged | not "
        "acknowledged (SDK gave up) | refused 429 | refused 503 | /metrics p50 / p99 / max s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in result["phases"]:
        scrapes = np.array(phase.scrape_seconds) if phase.scrape_seconds else np.array([np.nan])
        lines.append(
            f"| {phase.name} | {phase.offered_rate:.0f} | {phase.accepted_rate:.0f} | "
            f"{phase.emitted} | {phase.acknowledged} | {phase.failed} | "
            f"{phase.refused['queue_full']:.0f} | {phase.refused['store_unavailable']:.0f} | "
            f"{np.percentile(scrapes, 50):.3f} / {np.percentile(scrapes, 99):.3f} / "
            f"{scrapes.max():.3f} |"
        )
    burst = result["phases"][-1]
    lines += [
        "",
        f"*Emitted*: records the SDK senders logged (*acknowledged*: exported with a 200; the "
        f"difference was dropped by the SDK's own queue, a sender-side limit); the burst's "
        f"*emitted* counts every record sent, retries included. Burst answers: "
        f"{dict(sorted(burst.statuses.items()))}, Retry-After values {burst.retry_after}.",
        "",
        f"Sustained rate {result['sustained_rate']:.0f} records/s. Acknowledged "
        f"{result['acknowledged']}, stored {result['stored']}: **{result['lost']} lost, "
        f"{result['duplicated']} duplicated**. Agent peak RSS {result['peak_rss_mb']:.0f} MB; "
        f"exit code after SIGTERM {result['agent_exit']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start-rate", type=float, default=1000.0)
    parser.add_argument("--phase-seconds", type=float, default=15.0)
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--markdown", type=Path, help="append the section to this file")
    args = parser.parse_args(argv)
    command = "python -m aiops_plugin.evaluation.intake_load " + " ".join(argv or sys.argv[1:])
    result = run(args.start_rate, args.phase_seconds, args.overload_seconds, args.senders)
    text = markdown(result, command.strip())
    print(text)
    if args.markdown is not None:
        _replace_section(args.markdown, text)
    return 0 if result["lost"] == 0 and result["duplicated"] == 0 else 1


def _replace_section(path: Path, text: str) -> None:
    begin, end = "<!-- BEGIN intake-load -->", "<!-- END intake-load -->"
    current = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)


if __name__ == "__main__":
    raise SystemExit(main())
