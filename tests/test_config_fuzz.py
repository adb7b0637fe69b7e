"""Hostile configurations: every value that would break the agent later is refused at load,
with the field named, and everything that loads gives an agent that starts and runs a cycle.

The named cases are the ones an evaluation of the running agent found passing ``check-config``
and then crashing ``run`` (or answering 500, or raising every few minutes). The mutation test
changes one part of a complete configuration (every field with its default) at a time, with
values chosen to hurt: NaN, infinities, 1e300, negative and huge integers, broken patterns and
formats, deep nesting, wrong types, missing and unknown keys.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiops_plugin.agent import Agent, CycleFailed, check_startable
from aiops_plugin.config import Config, ConfigError, load_config
from aiops_plugin.demo.ports import free_port
from aiops_plugin.store import StoreError

BASE = {
    "prometheus": {"url": "http://127.0.0.1:9", "retries": 0, "timeout": "1s"},
    "entities": [{"name": "hosts", "labels": ["instance"], "queries": {"up": "up"}}],
    "logs": {
        "enabled": True,
        "entities": [{"group": "hosts", "label": "instance", "attribute": "host.name"}],
    },
    "detectors": {"device": "cpu"},
}


def full_config(data_dir: Path) -> dict[str, Any]:
    """``BASE`` with every field spelled out at its default (so any of them can be mutated)."""
    raw = Config.model_validate(BASE).model_dump(mode="json")
    raw["store"] = {"url": None, "data_dir": str(data_dir)}
    raw["server"]["port"] = free_port()
    return raw


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schedule": {"infer_every": math.nan}}, "schedule.infer_every"),
        ({"schedule": {"infer_every": math.inf}}, "schedule.infer_every"),
        ({"schedule": {"infer_every": 1.0e300}}, "schedule.infer_every"),
        ({"detectors": {"device": "-5s"}}, "detectors.device"),
        ({"store": {"url": "mysql://x"}}, "store.url"),
        ({"server": {"host": "not a host!!"}}, "server.host"),
        ({"logs": {"intake": {"commit_timeout": 1.0e300}}}, "logs.intake.commit_timeout"),
        ({"logs": {"intake": {"retention": 1.0e14}}}, "logs.intake.retention"),
        ({"logs": {"templates": {"masking": [{"pattern": "(", "mask_with": "X"}]}}}, "pattern"),
        ({"logs": {"templates": {"batch_records": 1.0e300}}}, "logs.templates.batch_records"),
        ({"logs": {"intake": {"queue_records": 2**40}}}, "logs.intake.queue_records"),
        (
            {
                "logs": {
                    "entities": [
                        {"group": "hosts", "label": "instance", "value_format": "{0}{value}"}
                    ]
                }
            },
            "logs.entities.0.value_format",
        ),
    ],
)
def test_check_config_refuses_what_would_break_the_agent(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    raw = copy.deepcopy(BASE)
    for section, values in change.items():
        if isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, "-m", "aiops_plugin.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert field in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'a: "\xff\xfe"\n', "not UTF-8"),
        (("a: " + "[" * 1000 + "]" * 1000 + "\n").encode(), "nested too deeply"),
        (("a: " + "{b: " * 400 + "1" + "}" * 400 + "\n").encode(), "a: Extra inputs"),
    ],
)
def test_unreadable_files_are_exit_2_not_a_traceback(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    done = subprocess.run(
        [sys.executable, "-m", "aiops_plugin.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


HOSTILE: list[Any] = [
    math.nan,
    math.inf,
    -math.inf,
    1.0e300,
    -1.0e300,
    -1,
    0,
    1,
    2**63,
    -(2**63),
    0.5,
    -0.5,
    "",
    " ",
    "(",
    "[",
    "{0}",
    "{value",
    "x" * 5000,
    "\x00",
    "ünïcødé ✓",
    "-5s",
    "0s",
    "1e309",
    "5m",
    "http://",
    "sqlite://",
    "cuda:99",
    None,
    True,
    False,
    [],
    {},
    [[[[]]]],
    {"a": {"b": {}}},
]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of ``node`` (mappings and list items), the leaves and the branches."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def mutate(raw: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], str]:
    """One change to a copy of ``raw``, and a description of it."""
    mutated = copy.deepcopy(raw)
    path = rng.choice(_paths(mutated))
    parent = mutated
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    roll = rng.random()
    if roll < 0.1 and isinstance(parent, dict):
        del parent[last]
        return mutated, f"deleted {path}"
    if roll < 0.2 and isinstance(parent, dict):
        parent[f"unknown_{rng.randrange(100)}"] = 1
        return mutated, f"unknown key beside {path}"
    value = rng.choice(HOSTILE)
    parent[last] = copy.deepcopy(value)
    return mutated, f"{path} = {value!r:.60}"


#: An error line naming its field (``  schedule.infer_every: ...``), or a check across fields
#: (``  (top level): ...``) whose message names them.
_FIELD_LINE = re.compile(
    r"^  ([\w\-]+(\.[\w\-]+)*: |\(top level\): .*\b[a-z_]+\.[a-z_0-9.]+)", re.MULTILINE
)


def test_random_mutations_are_refused_with_the_field_named_or_give_a_working_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 mutations: each loads, or fails with :class:`ConfigError` naming the file and a
    field. Every one that loads makes an agent that starts (store migrated, models loaded) and
    runs an inference cycle, which fails only as a cycle does when Prometheus is down."""
    monkeypatch.chdir(tmp_path)  # relative paths a mutation writes stay in the test's folder
    for name in ("AIOPS_STORE_URL", "AIOPS_LOGS_TOKEN", "AIOPS_SHARD"):
        monkeypatch.delenv(name, raising=False)
    rng = random.Random(20261203)
    refused = loaded = 0
    for i in range(300):
        raw, change = mutate(full_config(tmp_path / f"data-{i}"), rng)
        path = tmp_path / f"mutation-{i}.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
        try:
            config = load_config(path)
        except ConfigError as exc:
            message = str(exc)
            assert message.startswith(str(path)), (change, message)
            assert _FIELD_LINE.search(message) or "nested too deeply" in message, (change, message)
            refused += 1
            continue
        loaded += 1
        try:
            check_startable(config)  # what `run` checks before it starts: exit 2 if not
        except ValueError as exc:
            assert re.search(r"\b(sharding|logs\.embedder)\.", str(exc)), (change, exc)
            continue
        try:
            agent = Agent(config)
        except StoreError as exc:  # what `run` says in one line (exit 1), e.g. no data folder
            assert "store" in str(exc) or "folder" in str(exc), (change, exc)
            continue
        try:
            agent.start_up()
            with contextlib.suppress(CycleFailed):  # Prometheus is a closed port
                agent.infer()
            assert agent.exporter.exposition(), change
        finally:
            if agent.log_intake is not None:
                agent.log_intake.close()
            agent.store.close()
    assert refused > 50 and loaded > 30, (refused, loaded)


def test_a_store_that_cannot_be_opened_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A data folder that cannot be made (a name too long for the file system): `run` says
    so in one line, no traceback."""
    raw = copy.deepcopy(BASE)
    raw["store"] = {"data_dir": str(tmp_path / ("x" * 300))}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, "-m", "aiops_plugin.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: cannot create the folder") and "Traceback" not in (
        done.stderr + done.stdout
    )
