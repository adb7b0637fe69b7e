"""Which agent of a sharded deployment owns an entity.

With ``sharding.shards: N`` the chart runs N agents as a StatefulSet; agent ``i`` (its pod
ordinal, the number after the last ``-`` of its host name) owns the entities whose stable hash
of their identifying labels, modulo N, is ``i``. The hash is BLAKE2b of the entity key (the
labels as canonical JSON), not Python's ``hash``, which is salted per process: every agent, on
every restart, computes the same owner, so the shards are disjoint and together cover the fleet.

Each agent reads only its own entities' series of its groups' queries: the reader lists the
entities of a query and reads it with their label values pinned in its selectors
(:mod:`aiops_plugin.sources.shard_filter`); a query that narrowing would change is read in full
and the others' series skipped while decoding. Memory and every later phase are proportional to
the agent's share either way.

The agents share one PostgreSQL store. Anomaly events are per entity and so already disjoint;
the rows that belong to one agent's model of a group (model and calibration versions) are kept
under :func:`store_group`, the group's name qualified by the shard.

Logs: every agent accepts OTLP records for any entity (one Service in front of all of them) and
stores each with its entity's hash (``log_records.entity_hash``, :func:`entity_hash`); each agent
mines, embeds and scores only the records whose hash modulo N is its shard
(:func:`owned_condition`), with a Drain3 tree of its own (``log_miner_state`` and
``log_templates`` rows keyed by :func:`miner_key`). A record is therefore mined by exactly one
agent, and a log entity lands on the same agent as the metric entity of the same labels.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, true

#: Environment variable that names the shard explicitly (otherwise: the pod ordinal).
ENV_SHARD = "AIOPS_SHARD"
_ORDINAL = re.compile(r"-(\d+)$")


@functools.lru_cache(maxsize=65_536)
def entity_hash(key: str) -> int:
    """The stable hash of an entity key: 63 bits of its BLAKE2b digest, so that it fits the
    signed 64-bit integer column ``log_records.entity_hash`` on every database."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def shard_of(key: str, shards: int) -> int:
    """The shard (``0 .. shards - 1``) that owns the entity with key ``key``."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    return entity_hash(key) % shards


def owned_condition(hash_column: Any, shard: int, shards: int) -> ColumnElement[bool]:
    """SQL condition on an entity-hash column: the row's entity is owned by ``shard`` (always
    true when not sharded). The same arithmetic as :func:`shard_of`, done by the database."""
    if shards == 1:
        return true()
    return (hash_column % shards) == shard


def miner_key(shard: int, shards: int) -> str:
    """Whose Drain3 tree a template or miner state belongs to: ``""`` when not sharded,
    ``"shard/shards"`` otherwise (a change of ``shards`` starts new trees; old templates keep
    their ids, so records mined before stay readable)."""
    return "" if shards == 1 else f"{shard}/{shards}"


def owned_mask(keys: Iterable[str], shard: int, shards: int) -> np.ndarray:
    """Bool per key: owned by ``shard`` of ``shards``."""
    return np.array([shard_of(key, shards) == shard for key in keys], dtype=bool)


def ordinal_of(hostname: str) -> int | None:
    """The StatefulSet pod ordinal at the end of ``hostname`` (``aiops-plugin-2`` -> 2)."""
    match = _ORDINAL.search(hostname.strip())
    return int(match.group(1)) if match else None


def resolve_shard(shards: int, shard: int | None) -> int:
    """This agent's shard: ``shard`` when configured, else ``$AIOPS_SHARD``, else the ordinal
    of the host name (a StatefulSet pod's); 0 when not sharded. A ValueError says what is
    missing or out of range."""
    if shards == 1:
        if shard not in (None, 0):
            raise ValueError(f"sharding.shard is {shard} but sharding.shards is 1")
        return 0
    if shard is None and os.environ.get(ENV_SHARD, "").strip():
        text = os.environ[ENV_SHARD].strip()
        if not text.isdigit():
            raise ValueError(f"{ENV_SHARD}={text!r} is not a shard number")
        shard = int(text)
    if shard is None:
        hostname = os.environ.get("HOSTNAME", "") or os.uname().nodename
        shard = ordinal_of(hostname)
        if shard is None:
            raise ValueError(
                f"sharding.shards is {shards} but this agent's shard is unknown: set "
                f"sharding.shard or {ENV_SHARD}, or run it as a StatefulSet pod (host name "
                f"{hostname!r} ends in no ordinal)"
            )
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is outside 0..{shards - 1} (sharding.shards={shards})")
    return shard


def store_group(group: str, shard: int, shards: int) -> str:
    """The name a shard's model and calibration rows of ``group`` are stored under: the group
    itself when not sharded, ``group@shard/shards`` otherwise."""
    return group if shards == 1 else f"{group}@{shard}/{shards}"
