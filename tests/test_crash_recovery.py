"""The agent killed with SIGKILL (no chance to clean up) and started again, on SQLite and on a
real PostgreSQL: mid-ingest, every OTLP record that got a 200 is in the store once; mid-fit, no
half-written model version is left, the interrupted job is recorded as such, and the restarted
agent fits and scores without manual repair."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from sqlalchemy import func, select

from aiops_plugin.config import Config
from aiops_plugin.demo.ports import free_port
from aiops_plugin.detectors.registry import FittedModel
from aiops_plugin.store import Store
from aiops_plugin.store.models import AnomalyEventRow, JobRun, LogRecordRow, ModelVersionRow
from tests.agent_process import AgentProcess
from tests.test_agent import QUERY, ROWS, History, history  # noqa: F401 - fixture

TOKEN = "crash-test-token"


def _agent(config: dict[str, Any], workdir: Path) -> AgentProcess:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return AgentProcess(path, config["server"]["port"], workdir / "agent.log")


class _Sender(threading.Thread):
    """The real SDK exporter sending without pause; remembers the bodies of every export the
    agent acknowledged (a 200)."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(daemon=True)
        self.url, self.name_ = url, name
        self.acknowledged: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        acknowledged = self.acknowledged

        class Remembering(OTLPLogExporter):
            def export(self, batch):  # noqa: ANN001, ANN202 - the SDK's signature
                result = super().export(batch)
                if result == LogRecordExportResult.SUCCESS:
                    acknowledged.extend(str(item.log_record.body) for item in batch)
                return result

        provider = LoggerProvider(resource=Resource.create({"host.name": self.name_}))
        exporter = Remembering(
            endpoint=f"{self.url}/v1/logs",
            headers={"Authorization": f"Bearer {TOKEN}"},
            compression=Compression.Gzip,
            timeout=3,
        )
        provider.add_log_record_processor(
            BatchLogRecordProcessor(exporter, max_export_batch_size=200, schedule_delay_millis=20)
        )
        logger = provider.get_logger("crash")
        n = 0
        while not self.stop.is_set():
            for _ in range(100):
                logger.emit(
                    body=f"{self.name_} request {n} served in {n % 50} ms",
                    severity_number=SeverityNumber.INFO,
                )
                n += 1
            time.sleep(0.01)
        provider.force_flush(10_000)
        provider.shutdown()


def _log_config(store_url: str, workdir: Path) -> dict[str, Any]:
    return {
        "prometheus": {"url": f"http://127.0.0.1:{free_port()}", "retries": 0, "timeout": "1s"},
        "entities": [{"name": "hosts", "labels": ["instance"], "queries": {"up": "up"}}],
        "detectors": {"device": "cpu"},
        "store": {"url": store_url},
        "server": {"host": "127.0.0.1", "port": free_port()},
        "logs": {
            "enabled": True,
            "entities": [{"group": "hosts", "label": "instance", "attribute": "host.name"}],
            "intake": {"token": TOKEN},
            "embedder": {"device": "cpu"},
        },
    }


@pytest.mark.e2e
def test_sigkill_mid_ingest_loses_no_acknowledged_record(store_url: str, tmp_path: Path) -> None:
    if store_url.startswith("sqlite"):
        (tmp_path / "data").mkdir(exist_ok=True)
    agent = _agent(_log_config(store_url, tmp_path), tmp_path)
    senders = [_Sender(agent.url, f"web-{i}") for i in range(2)]
    try:
        agent.start()
        for sender in senders:
            sender.start()
        time.sleep(3)
        agent.kill()  # while both senders are sending
        time.sleep(1)
        agent.start()  # the senders' retries reach the new process
        time.sleep(2)
        for sender in senders:
            sender.stop.set()
        for sender in senders:
            sender.join(timeout=60)
        with Store.open(store_url) as store, store.engine.connect() as connection:
            bodies = list(connection.scalars(select(LogRecordRow.body)))
            deadline = time.monotonic() + 60
            unmined = None
            while time.monotonic() < deadline:  # mining resumes by itself after the crash
                unmined = connection.scalar(
                    select(func.count()).where(LogRecordRow.template_id.is_(None))
                )
                if unmined == 0:
                    break
                time.sleep(0.5)
    finally:
        agent.stop()
    acknowledged = [body for sender in senders for body in sender.acknowledged]
    assert len(acknowledged) > 1000, "the senders sent too little for the test to mean anything"
    stored = set(bodies)
    assert len(stored) == len(bodies)  # nothing stored twice
    assert [body for body in acknowledged if body not in stored] == []  # nothing lost
    assert unmined == 0


@pytest.mark.e2e
def test_sigkill_mid_fit_leaves_no_half_written_model(
    history: History,  # noqa: F811
    store_url: str,
    tmp_path: Path,
) -> None:
    if store_url.startswith("sqlite"):
        (tmp_path / "data").mkdir(exist_ok=True)
    config = {
        "prometheus": {"url": history.prometheus.url, "step": "1s", "timeout": "5s"},
        "entities": [{"name": "smd", "labels": ["instance"], "queries": {"smd": QUERY}}],
        "detectors": {
            "device": "cpu",
            "mad": {"window": 30},
            # a deep fit long enough to be killed in (minutes of epochs on this data)
            "multiscale": {"enabled": True, "window": 32, "epochs": 200, "d_model": 16},
        },
        "schedule": {"fit_window": f"{ROWS - 1}s", "infer_every": "1s"},
        "store": {"url": store_url},
        "server": {"host": "127.0.0.1", "port": free_port()},
    }
    agent = _agent(config, tmp_path)
    try:
        agent.start()
        with Store.open(store_url) as store:
            _wait_for_running_job(store, "fit", poll=0.2)
            time.sleep(2)  # into the multiscale epochs
            agent.kill()
            with store.engine.connect() as connection:
                versions = connection.execute(
                    select(ModelVersionRow.detector, ModelVersionRow.state)
                ).all()
            # whatever was committed before the kill is whole; multiscale was mid-training
            assert "multiscale" not in {detector for detector, _ in versions}
            parsed = Config.model_validate(config)
            for _, state in versions:
                FittedModel.from_bytes(bytes(state), parsed.detectors, torch.device("cpu"))
            # restarted with a short fit: the killed job is marked, the fit runs, it scores
            config["detectors"]["multiscale"]["epochs"] = 1
            config["detectors"]["multiscale"]["max_train_windows"] = 300
            agent.path.write_text(yaml.safe_dump(config))
            agent.start()
            agent.wait_ready()
            with store.engine.connect() as connection:
                statuses = [
                    row.status
                    for row in connection.execute(
                        select(JobRun.status).where(JobRun.kind == "fit").order_by(JobRun.id)
                    )
                ]
            assert statuses[0] == "interrupted" and "succeeded" in statuses[1:]
    finally:
        agent.stop()


@pytest.mark.e2e
def test_sigkill_mid_infer_recovers_without_repair(
    history: History,  # noqa: F811
    store_url: str,
    tmp_path: Path,
) -> None:
    """Killed while an inference cycle runs (the job row says so), the agent starts again,
    marks that job interrupted, loads its models without refitting and is ready; no entity
    has two open anomaly events (an event's writes are one transaction)."""
    if store_url.startswith("sqlite"):
        (tmp_path / "data").mkdir(exist_ok=True)
    config = {
        "prometheus": {"url": history.prometheus.url, "step": "1s", "timeout": "5s"},
        "entities": [{"name": "smd", "labels": ["instance"], "queries": {"smd": QUERY}}],
        "detectors": {"device": "cpu", "mad": {"window": 30}, "pca": {"enabled": True}},
        "schedule": {"fit_window": f"{ROWS - 1}s", "infer_every": "1s"},
        "store": {"url": store_url},
        "server": {"host": "127.0.0.1", "port": free_port()},
    }
    agent = _agent(config, tmp_path)
    try:
        agent.start()
        agent.wait_ready()
        with Store.open(store_url) as store:
            _wait_for_running_job(store, "infer", poll=0.01)
            agent.kill()
            fits_before = _count_jobs(store, "fit")
            agent.start()
            agent.wait_ready()
            assert _count_jobs(store, "fit") == fits_before  # models loaded, not refitted
            with store.engine.connect() as connection:
                statuses = set(
                    connection.scalars(select(JobRun.status).where(JobRun.kind == "infer"))
                )
                open_per_entity = connection.execute(
                    select(AnomalyEventRow.entity_id, AnomalyEventRow.detector, func.count())
                    .where(AnomalyEventRow.end_at.is_(None))
                    .group_by(AnomalyEventRow.entity_id, AnomalyEventRow.detector)
                ).all()
            assert "interrupted" in statuses and "succeeded" in statuses
            assert all(count == 1 for _, _, count in open_per_entity)
    finally:
        agent.stop()


def _count_jobs(store: Store, kind: str) -> int:
    with store.engine.connect() as connection:
        return int(connection.scalar(select(func.count()).where(JobRun.kind == kind)))


def _wait_for_running_job(store: Store, kind: str, poll: float, timeout: float = 60.0) -> None:
    """Until the store records a ``kind`` job as running (the moment to kill the agent)."""
    query = select(func.count()).where(JobRun.kind == kind, JobRun.status == "running")
    deadline = time.monotonic() + timeout
    while True:
        with store.engine.connect() as connection:
            if connection.scalar(query):
                return
        assert time.monotonic() < deadline, f"no {kind} job ran within {timeout:g} s"
        time.sleep(poll)
