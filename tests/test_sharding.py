"""Shards: stable, disjoint and complete ownership, and three agents on one real PostgreSQL.

The three agents are three :class:`Agent` objects in this process, each with its own reader,
exporter and store connection, sharing only the PostgreSQL database and the real Prometheus:
what separate pods share. "Killing" one closes its store and drops it; its restart is a new
agent on the same configuration.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from aiops_plugin.agent import Agent
from aiops_plugin.config import Config
from aiops_plugin.demo.ports import free_port
from aiops_plugin.evaluation import shard_reads
from aiops_plugin.sharding import owned_mask, resolve_shard, shard_of, store_group
from aiops_plugin.sources.prometheus import PrometheusReader, ReadResult
from aiops_plugin.store import Store
from aiops_plugin.store.models import LogMinerStateRow, LogRecordRow, LogTemplateRow
from aiops_plugin.windows import entity_key
from tests.agent_process import AgentProcess
from tests.test_agent import (  # noqa: F401 - fixture
    METRIC,
    QUERY,
    History,
    history,
    make_config,
)

INSTANCES = ["machine-1-7", "machine-1-7-shifted", "vanished", "holey"]


def test_ownership_is_stable_disjoint_and_complete() -> None:
    keys = [entity_key({"namespace": "shop", "pod": f"pod-{i:05d}"}) for i in range(3000)]
    for shards in (1, 2, 3, 7):
        masks = np.stack([owned_mask(keys, shard, shards) for shard in range(shards)])
        assert (masks.sum(axis=0) == 1).all()  # every entity has exactly one owner
        assert masks.mean(axis=1).max() < 1.15 / shards  # and the shares are even
    # another interpreter (another pod, a restart) computes the same owners: not hash()
    code = (
        "from aiops_plugin.sharding import shard_of; import sys; "
        "print([shard_of(line.strip(), 7) for line in sys.stdin])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input="\n".join(keys[:50]), capture_output=True, text=True
    )
    assert done.stdout.strip() == str([shard_of(key, 7) for key in keys[:50]])


def test_the_shard_comes_from_the_setting_the_environment_or_the_pod_ordinal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AIOPS_SHARD", raising=False)
    assert resolve_shard(1, None) == 0
    assert resolve_shard(3, 1) == 1
    monkeypatch.setenv("HOSTNAME", "aiops-aiops-plugin-2")
    assert resolve_shard(3, None) == 2
    monkeypatch.setenv("AIOPS_SHARD", "0")
    assert resolve_shard(3, None) == 0
    monkeypatch.delenv("AIOPS_SHARD")
    monkeypatch.setenv("HOSTNAME", "aiops-aiops-plugin-5")
    with pytest.raises(ValueError, match="shard 5 is outside 0..2"):
        resolve_shard(3, None)
    monkeypatch.setenv("HOSTNAME", "laptop")
    with pytest.raises(ValueError, match="set sharding.shard or AIOPS_SHARD"):
        resolve_shard(3, None)
    with pytest.raises(ValueError, match="sharding.shard 3 is outside 0..2"):
        Config.model_validate(
            {
                "entities": [{"name": "g", "labels": ["instance"], "queries": {"up": "up"}}],
                "sharding": {"shards": 3, "shard": 3},
            }
        )
    assert store_group("smd", 1, 3) == "smd@1/3" and store_group("smd", 0, 1) == "smd"


def _split_read(
    history: History,  # noqa: F811
    query: str,
    labels: tuple[str, ...] = ("instance",),
) -> tuple[ReadResult, list[ReadResult]]:
    """The group read whole and by each of three shards, over the last 300 s of history."""
    config = make_config(history.prometheus.url, Path("/tmp"))
    group = config.entities[0].model_copy(update={"queries": {"smd": query}, "labels": labels})
    whole = PrometheusReader(config.prometheus).read_range(group, history.end - 300, history.end)
    parts = [
        PrometheusReader(config.prometheus, shard, 3).read_range(
            group, history.end - 300, history.end
        )
        for shard in range(3)
    ]
    return whole, parts


def _assert_partition(whole: ReadResult, parts: list[ReadResult]) -> None:
    """The shards' entities are disjoint, their owners', and together the whole read, with
    the same values."""
    assert whole.windows is not None
    seen = [set() if part.windows is None else set(part.windows.keys) for part in parts]
    assert set().union(*seen) == set(whole.windows.keys)
    assert sum(len(keys) for keys in seen) == len(whole.windows.keys)
    for shard, part in enumerate(parts):
        assert all(shard_of(key, 3) == shard for key in seen[shard])
        if part.windows is not None:
            rows = [whole.windows.keys.index(key) for key in part.windows.keys]
            np.testing.assert_array_equal(part.windows.values, whole.windows.values[rows])


def test_each_shard_receives_only_its_own_entities_series(history: History) -> None:  # noqa: F811
    # the plain query and one whose label_replace regex needs escaping on the way back
    # (the parser's printer does not escape strings)
    escaped = rf'label_replace({QUERY}, "site", "dc\\1", "instance", "[a-z]+(-\\d+)*.*")'
    for query in (QUERY, escaped):
        whole, parts = _split_read(history, query)
        _assert_partition(whole, parts)
        assert [part.foreign_series for part in parts] == [0, 0, 0], query
        assert not any(part.failures for part in parts)


def test_entities_of_several_labels_are_listed_from_the_series_index(
    history: History,  # noqa: F811
) -> None:
    query = f"sum by (instance, job, dim) ({METRIC})"
    whole, parts = _split_read(history, query, ("instance", "job"))
    _assert_partition(whole, parts)
    assert [part.foreign_series for part in parts] == [0, 0, 0]


def test_a_query_that_narrowing_would_change_is_read_in_full(history: History) -> None:  # noqa: F811
    # each machine's share of the fleet's total: with the selectors narrowed to one shard's
    # machines the total, and so every value, would change; the first read's check sees it
    share = f"{QUERY} / on (dim) group_left () sum by (dim) ({QUERY})"
    whole, parts = _split_read(history, share)
    _assert_partition(whole, parts)
    assert whole.windows is not None
    features = len(whole.windows.features)
    for part in parts:
        mine = 0 if part.windows is None else len(part.windows.keys)
        # every other entity's series came in and was skipped
        assert part.foreign_series >= (len(whole.windows.keys) - mine) * features


def _scored(agent: Agent) -> set[str]:
    text = generate_latest(agent.exporter.registry).decode()
    return {
        sample.labels["instance"]
        for family in text_string_to_metric_families(text)
        if family.name == "aiops_anomaly_score"
        for sample in family.samples
        if sample.labels["detector"] == "fused"
    }


@pytest.mark.e2e
def test_three_shards_on_one_postgresql_split_the_fleet_and_survive_a_restart(
    history: History,  # noqa: F811
    postgresql_url: str,
    tmp_path: Path,
) -> None:
    def shard_agent(shard: int) -> Agent:
        config = make_config(
            history.prometheus.url,
            tmp_path / f"shard-{shard}",
            store={"url": postgresql_url},
            sharding={"shards": 3, "shard": shard},
        )
        agent = Agent(config, store=Store.open(postgresql_url))
        agent.start_up()
        return agent

    agents = [shard_agent(shard) for shard in range(3)]
    for agent in agents:
        agent.fit(now=history.end)
        agent.infer(now=history.end)
    scored = [_scored(agent) for agent in agents]
    for agent in agents:  # each read only its own entities' series
        foreign = agent.exporter.monitoring.get_sample_value(
            "aiops_read_foreign_series", {"entity_group": "smd"}
        )
        assert foreign == 0
    owners = {name: shard_of(entity_key({"instance": name}), 3) for name in INSTANCES}
    for shard, names in enumerate(scored):
        assert names == {n for n, o in owners.items() if o == shard and n != "vanished"}
    # one model per shard in the shared store, each fitted on its own entities only
    for shard in range(3):
        config = agents[shard].config
        version = agents[shard].store.latest_model_version(
            "mad", f"smd@{shard}/3", config.model_hash("mad", "smd")
        )
        assert version is not None
        assert version.n_entities == sum(1 for o in owners.values() if o == shard)
    assert agents[0].store.latest_model_version("mad", "smd") is None  # no unsharded row

    # shard 1 is killed and restarted: it loads its own model, refits nothing, scores the same
    agents[1].store.close()
    restarted = shard_agent(1)
    assert restarted.missing_models() == []
    restarted.infer(now=history.end)
    assert _scored(restarted) == scored[1]
    assert len(restarted.store.recent_jobs(kind="fit")) == 3  # the three first fits, no more
    for agent in (agents[0], agents[2], restarted):
        agent.store.close()


def test_a_shard_that_cannot_be_told_is_a_clear_error_at_start(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "entities: [{name: g, labels: [instance], queries: {up: up}}]\nsharding: {shards: 3}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "aiops_plugin.cli", "fit", "--config", str(path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HOSTNAME": "laptop"},
    )
    assert done.returncode == 2, done.stderr
    assert "sharding.shards is 3 but this agent's shard is unknown" in done.stderr
    # validating the file offline needs no shard: that is the pod's business
    checked = subprocess.run(
        [sys.executable, "-m", "aiops_plugin.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HOSTNAME": "laptop"},
    )
    assert checked.returncode == 0, checked.stderr


# ------------------------------------------------------------------------------ sharded logs

LOG_HOSTS = [f"node-{i:02d}" for i in range(12)]
LOG_TOKEN = "shard-test-token"


def _log_shard_config(path: Path, postgresql_url: str, shard: int, port: int) -> Path:
    """An agent of three whose metric source is down (a closed port: this test is about the
    log side, which runs whatever Prometheus does)."""
    config = {
        "prometheus": {"url": f"http://127.0.0.1:{free_port()}", "retries": 0, "timeout": "2s"},
        "entities": [{"name": "hosts", "labels": ["instance"], "queries": {"up": "up"}}],
        "detectors": {"device": "cpu"},
        "schedule": {"infer_every": "1s"},
        "store": {"url": postgresql_url},
        "server": {"host": "127.0.0.1", "port": port},
        "sharding": {"shards": 3, "shard": shard},
        "logs": {
            "enabled": True,
            "entities": [{"group": "hosts", "label": "instance", "attribute": "host.name"}],
            "intake": {"token": LOG_TOKEN},
            "embedder": {"device": "cpu"},
            "templates": {"batch_records": 20},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _send_logs(url: str, host: str, bodies: list[str]) -> None:
    """The real SDK exporter of one host; returns once every record was acknowledged."""
    provider = LoggerProvider(resource=Resource.create({"host.name": host}))
    exporter = OTLPLogExporter(
        endpoint=f"{url}/v1/logs",
        headers={"Authorization": f"Bearer {LOG_TOKEN}"},
        compression=Compression.Gzip,
        timeout=10,
    )
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter, schedule_delay_millis=50))
    logger = provider.get_logger("shard-test")
    for body in bodies:
        logger.emit(body=body, severity_number=SeverityNumber.INFO, severity_text="INFO")
    assert provider.force_flush(10_000)
    provider.shutdown()


def _bodies(host: str, start: int, count: int) -> list[str]:
    kinds = (
        "GET /api/cart/{i} 200 in {ms} ms",
        "user {i} logged in from 10.0.{ms}.7",
        "cache miss for key item-{i}, loading took {ms} ms",
    )
    return [
        f"{host} " + kinds[i % 3].format(i=i, ms=(7 * i) % 90) for i in range(start, start + count)
    ]


@pytest.mark.e2e
def test_three_agent_processes_mine_each_log_record_exactly_once_across_a_kill(
    postgresql_url: str, tmp_path: Path
) -> None:
    """Three ``aiops-plugin run`` processes on one PostgreSQL, each behind its own port as pods
    behind one Service. Records of every host are sent to every shard (round robin); each shard
    mines only its own hosts' records, in its own Drain3 tree. Shard 1 is killed with SIGKILL
    while records arrive and started again: every acknowledged record is stored once and mined
    once (the Drain3 cluster sizes of each tree add up to the records it owns)."""
    ports = [free_port() for _ in range(3)]
    shards = [
        AgentProcess(
            _log_shard_config(tmp_path / f"shard-{i}.yaml", postgresql_url, i, ports[i]),
            ports[i],
            tmp_path / f"shard-{i}.log",
        )
        for i in range(3)
    ]
    owners = {host: shard_of(entity_key({"instance": host}), 3) for host in LOG_HOSTS}
    assert set(owners.values()) == {0, 1, 2}
    sent: list[str] = []
    try:
        for shard in shards:
            shard.start()
        for i, host in enumerate(LOG_HOSTS):  # the first half, round robin over the shards
            bodies = _bodies(host, 0, 40)
            _send_logs(shards[i % 3].url, host, bodies)
            sent += bodies
        shards[1].kill()
        for i, host in enumerate(LOG_HOSTS):  # the second half reaches the live shards only
            bodies = _bodies(host, 40, 40)
            _send_logs(shards[0 if i % 2 else 2].url, host, bodies)
            sent += bodies
        shards[1].start()
        with Store.open(postgresql_url) as store:
            deadline = time.monotonic() + 180
            while True:
                with store.engine.connect() as connection:
                    unmined = connection.scalar(
                        select(func.count()).where(LogRecordRow.template_id.is_(None))
                    )
                if unmined == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert unmined == 0
            with store.engine.connect() as connection:
                records = connection.execute(
                    select(LogRecordRow.body, LogRecordRow.entity_key, LogTemplateRow.miner).join(
                        LogTemplateRow, LogTemplateRow.id == LogRecordRow.template_id
                    )
                ).all()
                sizes = dict(
                    connection.execute(
                        select(LogTemplateRow.miner, func.sum(LogTemplateRow.count)).group_by(
                            LogTemplateRow.miner
                        )
                    ).all()
                )
                trees = set(connection.scalars(select(LogMinerStateRow.miner)))
    finally:
        for shard in shards:
            shard.stop()
    assert sorted(body for body, _, _ in records) == sorted(sent)  # none lost, none twice
    for _, key, miner in records:  # mined by the owner, in the owner's tree
        assert miner == f"{shard_of(key, 3)}/3"
    owned = Counter(miner for _, _, miner in records)
    assert sizes == {miner: owned[miner] for miner in owned}  # each record mined once
    assert trees == {"0/3", "1/3", "2/3"}


def test_the_shard_reads_benchmark_splits_a_fleet_read_from_a_real_prometheus() -> None:
    # 20 hosts x 38 metrics: an answer size whose compressed stream once gave the JSON parser
    # an empty read before its end (taken for a truncated answer)
    rows, n_features = shard_reads.measure(20, 3, 60, 16, None)
    assert n_features == 38
    for read in {row.read for row in rows}:
        whole = [r for r in rows if r.read == read and r.shard == "whole fleet"]
        parts = [r for r in rows if r.read == read and r.shard != "whole fleet"]
        assert [r.entities for r in whole] == [20]
        assert sum(r.entities for r in parts) == 20
        assert all(r.foreign_series == 0 for r in parts)
