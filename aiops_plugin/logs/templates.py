"""Drain3 template mining of stored log records, with Drain3's state kept in the store.

The OTLP receiver writes every accepted record to ``log_records`` with ``template_id`` NULL;
:meth:`LogTemplateMiner.mine_pending` assigns templates afterwards, in record-id order, so intake
never waits on the parser. A template is a Drain3 cluster; its id (its ``log_templates`` row)
must keep its meaning for as long as the store lives: log features, embeddings and models refer
to it.

Consistency choice: each batch writes the records' ``template_id``, the touched ``log_templates``
rows and Drain3's state snapshot (the tree's ``log_miner_state`` row) in ONE transaction. If the
process dies before the commit, nothing of the batch is written: its records are still NULL and
are mined again from the previous snapshot, which hands out the same cluster ids (Drain3 is
deterministic given its state and the input). If the commit fails in a running process, the
in-memory tree is rebuilt from the last committed snapshot for the same reason. Snapshotting
outside the transaction would let the snapshot and the rows disagree after a crash: a snapshot
behind the rows re-issues ids that records already carry for other templates; one ahead of them
leaves templates without records.

One miner per Drain3 tree: two processes mining one tree would both continue the same snapshot
and give the same ids to different templates. A sharded deployment has one tree per shard
(:func:`~aiops_plugin.sharding.miner_key`): each shard mines only the records of the entities it
owns (by ``log_records.entity_hash``), its snapshot is its own ``log_miner_state`` row, and its
Drain3 cluster ids are mapped to store-wide template ids (``log_templates.id``, allocated by the
database; ``(miner, cluster_id)`` is unique), which is what records refer to.

This module also owns the ``log_templates`` queries of the embedding cache
(:func:`templates_to_embed`, :func:`save_template_embeddings`, :func:`template_vectors`), so the
embedder itself never writes SQL.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import drain3
import numpy as np
from drain3.masking import MaskingInstruction
from drain3.persistence_handler import PersistenceHandler
from drain3.template_miner_config import TemplateMinerConfig
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from aiops_plugin.config import LogTemplatesConfig
from aiops_plugin.sharding import miner_key, owned_condition
from aiops_plugin.store.models import LogMinerStateRow, LogRecordRow, LogTemplateRow
from aiops_plugin.store.repo import Store, StoreError

# Ids per ``IN (...)`` list: far below SQLite's bound-parameter limit.
_IN_CHUNK = 500

EntityRef = tuple[str, str]
"""``(entity_group, entity_key)`` of a log record."""


@dataclass
class MiningReport:
    """What :meth:`LogTemplateMiner.mine_pending` did.

    Attributes:
        records: records mined (given a ``template_id``).
        new_templates: Drain3 clusters created.
        changed_templates: templates that existed before the call and that Drain3 generalised
            (``cluster_template_changed``); their stored embedding is stale now.
        overflow: ``(entity_group, entity_key)`` -> records whose template is not among the
            entity's first ``max_templates_per_entity`` templates (see
            :class:`LogTemplateMiner`).
        seconds: wall time of the call.
    """

    records: int = 0
    new_templates: int = 0
    changed_templates: int = 0
    overflow: dict[EntityRef, int] = field(default_factory=dict)
    seconds: float = 0.0

    def overflow_by_group(self) -> dict[str, int]:
        """Overflowing records per entity group: ``aiops_log_templates_overflow_total``'s
        increments (per group, not per entity, to bound the metric's cardinality)."""
        totals: Counter[str] = Counter()
        for (group, _key), count in self.overflow.items():
            totals[group] += count
        return dict(totals)


class StorePersistence(PersistenceHandler):
    """Drain3's persistence in ``log_miner_state``, the row of tree ``miner``.

    While bound to a session (:meth:`joining`) a snapshot is written in that session's
    transaction, so it commits or rolls back together with the records it describes; otherwise
    it is written in a transaction of its own.
    """

    def __init__(self, store: Store, miner: str = "") -> None:
        self._store = store
        self._miner = miner
        self._session: Session | None = None

    def load_state(self) -> bytes | None:
        """The last committed snapshot, or None on a fresh store."""
        with _transaction(self._store, "reading the template miner state") as session:
            state = session.scalar(
                select(LogMinerStateRow.state).where(LogMinerStateRow.miner == self._miner)
            )
            return None if state is None else bytes(state)

    def save_state(self, state: bytes) -> None:
        if self._session is not None:
            self._write(self._session, state)
            return
        with _transaction(self._store, "saving the template miner state") as session:
            self._write(session, state)

    def _write(self, session: Session, state: bytes) -> None:
        row = session.scalar(select(LogMinerStateRow).where(LogMinerStateRow.miner == self._miner))
        if row is None:
            session.add(LogMinerStateRow(miner=self._miner, state=state, updated_at=_now()))
        else:
            row.state, row.updated_at = state, _now()

    @contextmanager
    def joining(self, session: Session) -> Iterator[None]:
        """Write snapshots taken inside this block through ``session``."""
        self._session = session
        try:
            yield
        finally:
            self._session = None


class _BatchSnapshotMiner(drain3.TemplateMiner):
    """Drain3's miner, snapshotting only when told to (once per batch, inside the batch's
    transaction) instead of after every new or changed cluster, which would serialise the whole
    tree once per such message and write it outside the records' transaction."""

    def get_snapshot_reason(self, change_type: str, cluster_id: int) -> str | None:
        return None


@dataclass
class _Progress:
    """Committed work of one ``mine_pending`` call, summed over its batches."""

    records: int = 0
    created: set[int] = field(default_factory=set)
    changed: set[int] = field(default_factory=set)
    overflow: Counter[EntityRef] = field(default_factory=Counter)


@dataclass
class _TemplateUpdate:
    """A template touched by a batch: its text and size after the batch, and when it was seen."""

    template: str
    size: int
    first_seen: datetime
    last_seen: datetime


class LogTemplateMiner:
    """Assigns Drain3 templates to the store's unmined log records.

    Per-entity cap: an entity's first ``max_templates_per_entity`` distinct templates (in record
    order) are its template set. A record whose template is outside that set is still mined and
    keeps its template id, but is counted as overflow in :attr:`MiningReport.overflow`. It is
    not dropped because a burst of never-seen templates is what an incident often looks like
    (new error paths, stack traces): dropping it would blind the log anomaly score exactly then.
    The cap bounds the per-entity state that log features keep; sustained overflow usually means
    a masking rule misses a variable field (a request id, a timestamp format), which the
    ``aiops_log_templates_overflow_total{entity_group}`` metric makes visible.

    An entity's set is loaded from the store the first time the entity is seen in a process, so a
    restart continues it; records deleted by retention leave it at the next restart.

    ``shard`` of ``shards``: mine only the records of the entities that shard owns, in that
    shard's own tree (module docstring).
    """

    def __init__(
        self, store: Store, config: LogTemplatesConfig, shard: int = 0, shards: int = 1
    ) -> None:
        self._store = store
        self._config = config
        self.miner = miner_key(shard, shards)
        self._owned = owned_condition(LogRecordRow.entity_hash, shard, shards)
        self._persistence = StorePersistence(store, self.miner)
        #: this tree's Drain3 cluster id -> store-wide template id
        self._template_ids: dict[int, int] = {}
        self._drain: _BatchSnapshotMiner | None = self._load_drain()
        self._entity_templates: dict[EntityRef, set[int]] = {}

    def mine_pending(self, limit: int = 10_000) -> MiningReport:
        """Mine up to ``limit`` records whose ``template_id`` is NULL, oldest id first, in
        transactions of ``batch_records`` records each. One caller at a time.

        When a batch fails (``StoreError``), its in-memory effects are discarded: Drain3 is
        restored from the last committed snapshot before the next batch, so the records of the
        failed batch get the ids they would have got.
        """
        started = time.perf_counter()
        progress = _Progress()
        while progress.records < limit:
            batch = min(self._config.batch_records, limit - progress.records)
            try:
                if self._drain is None:
                    self._drain = self._load_drain()
                mined = self._mine_batch(self._drain, batch, progress)
            except BaseException:
                self._drain = None
                self._template_ids.clear()
                self._entity_templates.clear()
                raise
            if mined == 0:
                break
        return MiningReport(
            records=progress.records,
            new_templates=len(progress.created),
            changed_templates=len(progress.changed - progress.created),
            overflow=dict(progress.overflow),
            seconds=time.perf_counter() - started,
        )

    def backlog(self) -> tuple[int, datetime | None]:
        """Records this miner owns that wait to be mined, and when the oldest was received."""
        with _transaction(self._store, "counting unmined log records") as session:
            count, oldest = session.execute(
                select(func.count(LogRecordRow.id), func.min(LogRecordRow.received_at)).where(
                    LogRecordRow.template_id.is_(None), self._owned
                )
            ).one()
        return int(count), oldest

    def template_texts(self) -> dict[int, str]:
        """Template id -> current template text, for every template in the store."""
        return template_texts(self._store)

    def _load_drain(self) -> _BatchSnapshotMiner:
        """Drain3 restored from the store's snapshot (a fresh tree when there is none)."""
        config = self._config
        miner_config = TemplateMinerConfig()
        miner_config.drain_sim_th = config.similarity_threshold
        miner_config.drain_depth = config.depth
        miner_config.drain_max_children = config.max_children
        miner_config.drain_max_clusters = config.max_templates
        miner_config.parametrize_numeric_tokens = config.parametrize_numeric_tokens
        miner_config.masking_instructions = [
            MaskingInstruction(rule.pattern, rule.mask_with) for rule in config.masking
        ]
        miner = _BatchSnapshotMiner(self._persistence, miner_config)
        with _transaction(self._store, "reading the template ids") as session:
            self._template_ids = dict(
                session.execute(
                    select(LogTemplateRow.cluster_id, LogTemplateRow.id).where(
                        LogTemplateRow.miner == self.miner
                    )
                ).all()
            )
        if miner.drain.clusters_counter == 0:
            # No snapshot (never mined, or deleted by hand): number after this tree's stored
            # clusters so that no cluster id is ever given to a second template.
            miner.drain.clusters_counter = max(self._template_ids, default=0)
            self._template_ids.clear()  # the old clusters are not in the new tree
        return miner

    def _mine_batch(self, drain: _BatchSnapshotMiner, limit: int, progress: _Progress) -> int:
        """Mine one batch in one transaction (records, templates and snapshot); records mined.

        ``progress`` is only updated once the transaction has committed."""
        with _transaction(self._store, "mining log templates") as session:
            records = session.execute(
                select(
                    LogRecordRow.id,
                    LogRecordRow.entity_group,
                    LogRecordRow.entity_key,
                    LogRecordRow.observed_at,
                    LogRecordRow.body,
                )
                .where(LogRecordRow.template_id.is_(None), self._owned)
                .order_by(LogRecordRow.id)
                .limit(limit)
            ).all()
            if not records:
                return 0
            clusters: list[int] = []
            touched: dict[int, _TemplateUpdate] = {}
            created: set[int] = set()
            changed: set[int] = set()
            for record in records:
                result = drain.add_log_message(record.body)
                cluster_id = int(result["cluster_id"])
                if result["change_type"] == "cluster_created":
                    created.add(cluster_id)
                elif result["change_type"] == "cluster_template_changed":
                    changed.add(cluster_id)
                clusters.append(cluster_id)
                _touch(touched, cluster_id, result, record.observed_at)
            ids = _upsert_templates(session, self.miner, self._template_ids, touched)
            self._load_entity_templates(
                session, {(record.entity_group, record.entity_key) for record in records}
            )
            overflow: Counter[EntityRef] = Counter()
            for record, cluster_id in zip(records, clusters, strict=True):
                entity = (record.entity_group, record.entity_key)
                if not self._admit(entity, ids[cluster_id]):
                    overflow[entity] += 1
            session.execute(
                update(LogRecordRow),
                [
                    {"id": record.id, "template_id": ids[cluster_id]}
                    for record, cluster_id in zip(records, clusters, strict=True)
                ],
            )
            with self._persistence.joining(session):
                drain.save_state(f"batch of {len(records)} records")
        self._template_ids.update(ids)
        created, changed = {ids[c] for c in created}, {ids[c] for c in changed}
        progress.records += len(records)
        progress.created |= created
        progress.changed |= changed
        progress.overflow.update(overflow)
        return len(records)

    def _admit(self, entity: EntityRef, template_id: int) -> bool:
        """Whether the template is in the entity's capped template set (adding it if there is
        room)."""
        known = self._entity_templates[entity]
        if template_id in known:
            return True
        if len(known) < self._config.max_templates_per_entity:
            known.add(template_id)
            return True
        return False

    def _load_entity_templates(self, session: Session, entities: set[EntityRef]) -> None:
        """Load the template sets of entities not seen before in this process: each entity's
        first ``max_templates_per_entity`` templates by first record id, as mined so far."""
        missing = sorted(entities - self._entity_templates.keys())
        for entity in missing:
            self._entity_templates[entity] = set()
        keys = sorted({key for _group, key in missing})
        wanted = set(missing)
        cap = self._config.max_templates_per_entity
        for start in range(0, len(keys), _IN_CHUNK):
            first_record = func.min(LogRecordRow.id)
            rows = session.execute(
                select(LogRecordRow.entity_group, LogRecordRow.entity_key, LogRecordRow.template_id)
                .where(
                    LogRecordRow.entity_key.in_(keys[start : start + _IN_CHUNK]),
                    LogRecordRow.template_id.is_not(None),
                )
                .group_by(
                    LogRecordRow.entity_group, LogRecordRow.entity_key, LogRecordRow.template_id
                )
                .order_by(first_record)
            )
            for group, key, template_id in rows:
                if (group, key) not in wanted:
                    continue  # same key in another group, or an entity already loaded
                known = self._entity_templates[(group, key)]
                if len(known) < cap:
                    known.add(int(template_id))


def template_texts(store: Store) -> dict[int, str]:
    """Template id -> current template text, for every template in the store."""
    with _transaction(store, "reading log templates") as session:
        rows = session.execute(select(LogTemplateRow.id, LogTemplateRow.template))
        return {row.id: row.template for row in rows}


def template_totals(store: Store) -> tuple[int, int]:
    """``(templates, lines)``: templates in the store, and log lines mined into them."""
    with _transaction(store, "counting log templates") as session:
        templates, lines = session.execute(
            select(func.count(LogTemplateRow.id), func.coalesce(func.sum(LogTemplateRow.count), 0))
        ).one()
    return int(templates), int(lines)


def templates_to_embed(
    store: Store, model_id: str, exclude_miners: Collection[str] = ()
) -> dict[int, str]:
    """Templates whose stored vector is missing or stale: never embedded, generalised by Drain3
    since (``embedded_template != template``), or embedded by another model than ``model_id``.

    ``exclude_miners``: trees whose templates another agent embeds (the other live shards');
    templates of trees no agent mines any more are embedded by everyone who asks."""
    query = select(LogTemplateRow.id, LogTemplateRow.template).where(
        or_(
            LogTemplateRow.embedding.is_(None),
            LogTemplateRow.embedded_template.is_(None),
            LogTemplateRow.embedded_template != LogTemplateRow.template,
            LogTemplateRow.embedding_model.is_(None),
            LogTemplateRow.embedding_model != model_id,
        )
    )
    if exclude_miners:
        query = query.where(LogTemplateRow.miner.not_in(sorted(exclude_miners)))
    with _transaction(store, "reading templates to embed") as session:
        return {row.id: row.template for row in session.execute(query)}


def save_template_embeddings(
    store: Store, model_id: str, texts: Mapping[int, str], vectors: np.ndarray
) -> None:
    """Store ``vectors[i]`` (shape ``(len(texts), dim)``) as the embedding of the i-th template of
    ``texts``, with the text it was computed from.

    The text is stored rather than assumed: if Drain3 generalised a template between reading and
    writing, ``embedded_template`` differs from ``template`` and the next pass embeds it again.
    """
    if len(texts) != len(vectors):
        raise ValueError(f"{len(texts)} templates but {len(vectors)} vectors")
    rows = [
        {
            "id": template_id,
            "embedding": np.asarray(vector, dtype="<f4").tobytes(),
            "embedding_model": model_id,
            "embedded_template": text,
        }
        for (template_id, text), vector in zip(texts.items(), vectors, strict=True)
    ]
    if not rows:
        return
    with _transaction(store, "saving template embeddings") as session:
        session.execute(update(LogTemplateRow), rows)


def template_vectors(store: Store, model_id: str | None = None) -> dict[int, np.ndarray]:
    """Template id -> stored embedding, float32 of shape ``(dim,)``, L2-normalised.

    Pass the embedder's ``model_id`` to leave out vectors of another model (different space,
    possibly different dim) that are still waiting to be re-embedded.
    """
    query = select(LogTemplateRow.id, LogTemplateRow.embedding).where(
        LogTemplateRow.embedding.is_not(None)
    )
    if model_id is not None:
        query = query.where(LogTemplateRow.embedding_model == model_id)
    with _transaction(store, "reading template embeddings") as session:
        return {
            row.id: np.frombuffer(bytes(row.embedding), dtype="<f4").astype(np.float32)
            for row in session.execute(query)
        }


def _touch(
    touched: dict[int, _TemplateUpdate],
    template_id: int,
    result: Mapping[str, Any],
    seen_at: datetime,
) -> None:
    """Track a template's latest text and size (from Drain3's ``add_log_message`` result) and
    its time span within a batch."""
    seen = touched.get(template_id)
    if seen is None:
        touched[template_id] = _TemplateUpdate(
            result["template_mined"], int(result["cluster_size"]), seen_at, seen_at
        )
        return
    seen.template = result["template_mined"]
    seen.size = int(result["cluster_size"])
    seen.first_seen = min(seen.first_seen, seen_at)
    seen.last_seen = max(seen.last_seen, seen_at)


def _upsert_templates(
    session: Session,
    miner: str,
    known: Mapping[int, int],
    touched: Mapping[int, _TemplateUpdate],
) -> dict[int, int]:
    """Write the batch's templates of tree ``miner`` (keyed by cluster id; ``known``: cluster id
    -> template id of those already stored): text and count from Drain3, seen-times widened
    only. Returns cluster id -> template id for every touched cluster; new rows get their id
    from the database (flushed inside the batch's transaction)."""
    by_id = {known[cluster]: cluster for cluster in touched if cluster in known}
    existing: dict[int, LogTemplateRow] = {}
    ids = list(by_id)
    for start in range(0, len(ids), _IN_CHUNK):
        query = select(LogTemplateRow).where(LogTemplateRow.id.in_(ids[start : start + _IN_CHUNK]))
        existing.update((by_id[row.id], row) for row in session.scalars(query))
    added: list[LogTemplateRow] = []
    for cluster_id, seen in touched.items():
        row = existing.get(cluster_id)
        if row is None:
            row = LogTemplateRow(
                miner=miner,
                cluster_id=cluster_id,
                template=seen.template,
                count=seen.size,
                first_seen=seen.first_seen,
                last_seen=seen.last_seen,
            )
            session.add(row)
            added.append(row)
            continue
        row.template = seen.template
        row.count = seen.size
        row.first_seen = min(row.first_seen, seen.first_seen)
        row.last_seen = max(row.last_seen, seen.last_seen)
    session.flush()
    ids_of = {cluster_id: row.id for cluster_id, row in existing.items()}
    ids_of.update((row.cluster_id, row.id) for row in added)
    return ids_of


def _now() -> datetime:
    return datetime.now(UTC)


@contextmanager
def _transaction(store: Store, action: str) -> Iterator[Session]:
    """One session on the store's engine, committed on success; DB errors -> StoreError."""
    try:
        with Session(store.engine, expire_on_commit=False) as session, session.begin():
            yield session
    except SQLAlchemyError as exc:
        raise StoreError(f"{action} failed on {store.display_url}: {store._reason(exc)}") from exc
