"""What one shard of N reads from Prometheus, against one agent reading the whole fleet.

The perf fleet (:mod:`.perf`: SMD machines tiled to ``--entities`` hosts with jitter, backfilled
into a real Prometheus) is read by the agent's own reader, unsharded and as each shard of
``--shards``, over two ranges: a cycle's read (the last ``--cycle-steps`` steps, what a cycle
reads when its buffer is cold) and a fit's read (``--fit-steps``). Per read: wall seconds, bytes
of the HTTP answers, series received, the other shards' series among them (received and
skipped), and the entities decoded; the wall time includes Prometheus' own work, which runs on
the same cores here, the reader's CPU seconds do not. Each shard's own-share read costs a
listing of the query's entity label values from Prometheus' index besides its range answers
(and, once per process and query, one instant evaluation of the query each way: the check that
narrowing it changes nothing); all are in the bytes and requests.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from aiops_plugin.config import Config
from aiops_plugin.demo import PrometheusServer
from aiops_plugin.evaluation.perf import STEP_SECONDS, _config, _machines, backfill_fleet
from aiops_plugin.sources.prometheus import PrometheusReader

SECTION = "shard-reads"


@dataclass
class ReadRow:
    read: str
    shard: str
    seconds: float
    #: CPU seconds of this process (the reader's decoding; Prometheus runs apart)
    cpu_seconds: float
    answer_bytes: int
    requests: int
    series_received: int
    foreign_series: int
    entities: int


def _read(config: Config, shard: int, shards: int, start: float, end: float, label: str) -> ReadRow:
    reader = PrometheusReader(config.prometheus, shard, shards)
    counted = {"bytes": 0, "requests": 0}

    def count(response: requests.Response, *args: object, **kwargs: object) -> None:
        counted["bytes"] += len(response.content)
        counted["requests"] += 1

    reader.session.hooks["response"].append(count)
    began, cpu_began = time.perf_counter(), time.process_time()
    result = reader.read_range(config.entities[0], start, end)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    entities = 0 if result.windows is None else len(result.windows.entities)
    features = 0 if result.windows is None else len(result.windows.features)
    return ReadRow(
        read=label,
        shard="whole fleet" if shards == 1 else f"{shard} of {shards}",
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        answer_bytes=counted["bytes"],
        requests=counted["requests"],
        series_received=entities * features + result.foreign_series,
        foreign_series=result.foreign_series,
        entities=entities,
    )


def measure(
    n: int, shards: int, fit_steps: int, cycle_steps: int, data_root: Path | None
) -> tuple[list[ReadRow], int]:
    """The reads of a fleet of ``n``; also its number of features."""
    steps = fit_steps + 1
    machines, features = _machines(data_root, steps)
    end = (time.time() // STEP_SECONDS - 3) * STEP_SECONDS
    timestamps = end - STEP_SECONDS * np.arange(steps - 1, -1, -1, dtype=np.float64)
    rows: list[ReadRow] = []
    with tempfile.TemporaryDirectory(prefix="aiops-shard-reads-") as scratch:
        root = Path(scratch)
        backfill_fleet(root / "tsdb", n, machines, features, timestamps)
        with PrometheusServer(tsdb_dir=root / "tsdb", workdir=root / "prometheus") as prometheus:
            prometheus.start()
            config = Config.model_validate(
                _config(prometheus.url, root, n, ["mad"], fit_steps, "cpu")
            )
            last = float(timestamps[-1])
            ranges = {
                f"cycle ({cycle_steps} steps)": (last - (cycle_steps - 1) * STEP_SECONDS, last),
                f"fit ({fit_steps} steps)": (float(timestamps[1]), last),
            }
            for label, (start, stop) in ranges.items():
                rows.append(_read(config, 0, 1, start, stop, label))
                rows += [_read(config, i, shards, start, stop, label) for i in range(shards)]
    return rows, len(features)


def markdown(rows: Sequence[ReadRow], n: int, n_features: int, command: str) -> str:
    lines = [
        f"## Shard reads: {n} entities x {n_features} metrics",
        "",
        f"Command: `{command}`",
        "",
        "Each shard reads its share: the `instance` values of the query's selectors listed from "
        "Prometheus' index (label-values API), then the range with its own entities' values "
        "pinned in the query's selectors (the first read of a query also checks once, with an "
        "instant evaluation each way, that narrowing changes nothing). "
        "*Bytes*: the HTTP answers' bodies, listings included; *foreign*: other shards' series "
        "received and skipped.",
        "",
        "| read | reader | seconds | reader CPU s | MB received | requests | series received "
        "| foreign | entities |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.read} | {row.shard} | {row.seconds:.2f} | {row.cpu_seconds:.2f} "
            f"| {row.answer_bytes / 1e6:.1f} "
            f"| {row.requests} | {row.series_received} | {row.foreign_series} | {row.entities} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from aiops_plugin.evaluation.benchmark import write_markdown_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=1440)
    parser.add_argument("--cycle-steps", type=int, default=128)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, help="write the shard-reads section of this file")
    arguments = parser.parse_args(argv)
    rows, n_features = measure(
        arguments.entities,
        arguments.shards,
        arguments.fit_steps,
        arguments.cycle_steps,
        arguments.data_root,
    )
    given = list(sys.argv[1:] if argv is None else argv)
    command = "python -m aiops_plugin.evaluation.shard_reads " + " ".join(map(shlex.quote, given))
    text = markdown(rows, arguments.entities, n_features, command)
    print(text)
    if arguments.markdown is not None:
        write_markdown_section(arguments.markdown, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
