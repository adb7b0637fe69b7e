"""Drain3 template mining over the store: masking, stable ids across restarts, consistency of a
failed batch, the per-entity cap, and which templates need (re-)embedding.

Synthetic lines only live in this file; loghub's real lines are read from ``shared/`` at test time
(their licence forbids copying them into the repository).
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import alembic.command
import alembic.config
import numpy as np
import pytest
from sqlalchemy import create_engine, delete, insert, select, text

from aiops_plugin.config import LogTemplatesConfig
from aiops_plugin.logs.templates import (
    LogTemplateMiner,
    save_template_embeddings,
    template_texts,
    template_vectors,
    templates_to_embed,
)
from aiops_plugin.sharding import entity_hash
from aiops_plugin.store.models import LogMinerStateRow, LogRecordRow, LogTemplateRow
from aiops_plugin.store.repo import MIGRATIONS_DIR, Store, StoreError

LOGHUB = Path(__file__).parents[2] / "shared" / "data" / "loghub"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

#: A trigger that makes the store refuse to write one record's template id: a real failure in
#: the middle of a batch's transaction.
REFUSE_UPDATE = {
    "sqlite": [
        "CREATE TRIGGER refuse BEFORE UPDATE OF template_id ON log_records "
        "WHEN NEW.id = {record_id} BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$",
        "CREATE TRIGGER refuse BEFORE UPDATE OF template_id ON log_records FOR EACH ROW "
        "WHEN (NEW.id = {record_id}) EXECUTE FUNCTION refuse()",
    ],
}
DROP_REFUSE = {"sqlite": "DROP TRIGGER refuse", "postgresql": "DROP TRIGGER refuse ON log_records"}


def add_records(
    store: Store, bodies: list[str], entity_key: str = "web-1", group: str = "web"
) -> list[int]:
    """Insert records as the OTLP receiver does (``template_id`` NULL); their ids in order."""
    with store.engine.begin() as connection:
        first = connection.scalar(select(LogRecordRow.id).order_by(LogRecordRow.id.desc())) or 0
        connection.execute(
            insert(LogRecordRow),
            [
                {
                    "received_at": T0,
                    "observed_at": T0 + timedelta(seconds=first + i),
                    "entity_group": group,
                    "entity_key": entity_key,
                    "severity_number": 9,
                    "severity_text": "INFO",
                    "body": body,
                }
                for i, body in enumerate(bodies)
            ],
        )
    return list(range(first + 1, first + 1 + len(bodies)))


def record_clusters(store: Store) -> list[tuple[int, str] | None]:
    """Per record in record order: the Drain3 cluster id of its template and the template's
    text (None while unmined)."""
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(LogTemplateRow.cluster_id, LogTemplateRow.template)
            .select_from(LogRecordRow)
            .outerjoin(LogTemplateRow, LogTemplateRow.id == LogRecordRow.template_id)
            .order_by(LogRecordRow.id)
        ).all()
    return [None if cluster is None else (cluster, text) for cluster, text in rows]


def record_templates(store: Store) -> list[int | None]:
    """``template_id`` of every record, in record order."""
    with store.engine.connect() as connection:
        return list(connection.scalars(select(LogRecordRow.template_id).order_by(LogRecordRow.id)))


@pytest.mark.parametrize(
    ("line", "template"),
    [
        ("connection from 10.20.30.40:5432 closed", "connection from <IP> closed"),
        ("retry after 250.5 ms, attempt 3", "retry after <NUM> ms, attempt <NUM>"),
        ("object at 0x7ffde4a0 freed", "object at <HEX> freed"),
        ("commit 9fceb02d0ae598e9 pushed", "commit <HEX> pushed"),
        ("request 3fa85f64-5717-4562-b3fc-2c963f66afa6 done", "request <UUID> done"),
        ("cannot open /var/log/app/server.log for writing", "cannot open <PATH> for writing"),
    ],
    ids=["ip", "numbers", "hex-0x", "hex-id", "uuid", "path"],
)
def test_masking_replaces_variable_fields(store: Store, line: str, template: str) -> None:
    add_records(store, [line])
    LogTemplateMiner(store, LogTemplatesConfig()).mine_pending()
    assert list(template_texts(store).values()) == [template]


def test_lines_differing_only_in_masked_fields_share_one_template(store: Store) -> None:
    add_records(
        store,
        [
            f"user {user} logged in from 192.168.{i}.7 in {i * 13} ms session {i:08x}ffff"
            for i, user in enumerate(["ann", "bob", "cy", "dee"])
        ],
    )
    report = LogTemplateMiner(store, LogTemplatesConfig()).mine_pending()
    assert (report.records, report.new_templates) == (4, 1)
    assert list(template_texts(store).values()) == [
        "user <*> logged in from <IP> in <NUM> ms session <HEX>"
    ]
    assert len(set(record_templates(store))) == 1
    with store.engine.connect() as connection:
        row = connection.execute(select(LogTemplateRow)).one()
    assert (row.count, row.first_seen, row.last_seen) == (4, T0, T0 + timedelta(seconds=3))


def test_mine_pending_takes_the_oldest_records_up_to_the_limit(store: Store) -> None:
    add_records(store, [f"job {i} finished" for i in range(5)])
    report = LogTemplateMiner(store, LogTemplatesConfig(batch_records=2)).mine_pending(limit=3)
    assert report.records == 3
    assert [template is not None for template in record_templates(store)] == [True] * 3 + [
        False
    ] * 2


def test_template_ids_survive_a_restart(store_url: str) -> None:
    lines = ["disk sda1 is 91% full", "worker pool resized to 8", "cache warmed in 12 s"]
    with Store.open(store_url) as store:
        add_records(store, lines)
        LogTemplateMiner(store, LogTemplatesConfig()).mine_pending()
        before = template_texts(store)
        first_ids = record_templates(store)
    assert len(before) == 3

    with Store.open(store_url) as store:
        miner = LogTemplateMiner(store, LogTemplatesConfig())
        add_records(store, [lines[1], "kernel panic: not syncing"])
        report = miner.mine_pending()
        after = template_texts(store)
        ids = record_templates(store)
        with store.engine.connect() as connection:
            assert connection.scalar(select(LogMinerStateRow.id)) == 1
    assert report.new_templates == 1
    assert ids[:3] == first_ids
    assert ids[3] == first_ids[1]
    assert ids[4] not in before
    assert {template_id: after[template_id] for template_id in before} == before


def test_failed_batch_writes_nothing_and_mining_again_gives_the_same_templates(
    store: Store, tmp_path: Path
) -> None:
    """A failed batch leaves its records unmined; mining them again gives each record the
    template (text, and Drain3 cluster of the tree) it would have got without the failure.
    The store-wide ids may skip numbers (a PostgreSQL sequence does not roll back)."""
    lines = [f"sensor {i} reading {i * 7} C" for i in range(3)] + [
        "fan speed set to 1200 rpm",
        "power supply 2 failed",
        "fan speed set to 900 rpm",
    ]
    with Store.open(f"sqlite:///{tmp_path / 'reference.db'}") as reference:
        add_records(reference, lines)
        LogTemplateMiner(reference, LogTemplatesConfig()).mine_pending()
        expected = record_clusters(reference)

    ids = add_records(store, lines)
    with store.engine.begin() as connection:
        for statement in REFUSE_UPDATE[store.engine.dialect.name]:
            connection.execute(text(statement.format(record_id=ids[4])))
    miner = LogTemplateMiner(store, LogTemplatesConfig(batch_records=3))
    with pytest.raises(StoreError, match="disk full"):
        miner.mine_pending()
    assert record_clusters(store) == expected[:3] + [None] * 3
    assert sorted(template_texts(store).values()) == sorted({text for _, text in expected[:3]})

    with store.engine.begin() as connection:
        connection.execute(text(DROP_REFUSE[store.engine.dialect.name]))
    assert miner.mine_pending().records == 3
    assert record_clusters(store) == expected
    assert sorted(template_texts(store).values()) == sorted({text for _, text in expected})
    # one id per template: records with the same cluster carry the same id, and only they do
    pairs = set(zip(record_templates(store), record_clusters(store), strict=True))
    assert len(pairs) == len({cluster for _, cluster in pairs}) == len({i for i, _ in pairs})


def test_a_lost_snapshot_never_gives_an_old_id_to_a_new_template(store: Store) -> None:
    add_records(store, ["disk sda1 is 91% full", "worker pool resized to 8"])
    LogTemplateMiner(store, LogTemplatesConfig()).mine_pending()
    before = template_texts(store)
    with store.engine.begin() as connection:
        connection.execute(delete(LogMinerStateRow))

    add_records(store, ["kernel panic: not syncing"])
    LogTemplateMiner(store, LogTemplatesConfig()).mine_pending()
    after = template_texts(store)
    assert {i: after[i] for i in before} == before
    assert min(after.keys() - before.keys()) > max(before)


def test_entity_template_cap_counts_overflow_without_dropping_records(store_url: str) -> None:
    config = LogTemplatesConfig(max_templates_per_entity=2)
    a = ["user login succeeded", "disk quota exceeded on volume data", "cache warmed"]
    with Store.open(store_url) as store:
        add_records(store, [a[0], a[1], a[2], a[0], a[2]], entity_key="web-1")
        add_records(store, [a[2]], entity_key="web-2")
        add_records(store, [a[2]], entity_key="db-1", group="db")
        report = LogTemplateMiner(store, config).mine_pending()
        assert report.records == 7
        assert None not in record_templates(store)
        assert report.overflow == {("web", "web-1"): 2}
        assert report.overflow_by_group() == {"web": 2}

    with Store.open(store_url) as store:
        add_records(store, [a[2], a[0]], entity_key="web-1")
        report = LogTemplateMiner(store, config).mine_pending()
    assert report.overflow == {("web", "web-1"): 1}


def test_generalised_template_is_flagged_for_reembedding(store: Store) -> None:
    miner = LogTemplateMiner(store, LogTemplatesConfig())
    add_records(store, ["worker pool resized to small", "replica lag is fine"])
    miner.mine_pending()
    texts = template_texts(store)
    vectors = np.eye(2, 4, dtype=np.float32)
    assert templates_to_embed(store, "model-a") == texts
    save_template_embeddings(store, "model-a", texts, vectors)
    assert templates_to_embed(store, "model-a") == {}
    stored = template_vectors(store, "model-a")
    assert all(np.array_equal(stored[i], v) for i, v in zip(texts, vectors, strict=True))

    add_records(store, ["worker pool resized to large"])
    report = miner.mine_pending()
    assert (report.new_templates, report.changed_templates) == (0, 1)
    generalised = next(i for i, t in template_texts(store).items() if "<*>" in t)
    assert templates_to_embed(store, "model-a") == {generalised: "worker pool resized to <*>"}
    assert templates_to_embed(store, "model-b") == template_texts(store)
    assert template_vectors(store, "model-b") == {}


@pytest.mark.parametrize(
    ("system", "entity_column", "loghub_templates"),
    [("BGL", "Node", 120), ("HDFS", "Component", 14)],
)
def test_real_loghub_lines_give_about_as_many_templates_as_loghub(
    store: Store, system: str, entity_column: str, loghub_templates: int
) -> None:
    path = LOGHUB / system / f"{system}_2k.log_structured.csv"
    assert path.is_file(), f"loghub sample missing: {path} (see shared/data/loghub/PROVENANCE.md)"
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    event_ids = [row["EventId"] for row in rows]
    assert len(set(event_ids)) == loghub_templates
    for key in sorted({row[entity_column] for row in rows}):
        add_records(store, [row["Content"] for row in rows if row[entity_column] == key], key)
    with store.engine.connect() as connection:
        bodies = list(connection.scalars(select(LogRecordRow.body).order_by(LogRecordRow.id)))
    by_body = defaultdict(list)
    for row in rows:
        by_body[row["Content"]].append(row["EventId"])

    report = LogTemplateMiner(store, LogTemplatesConfig()).mine_pending()

    assert report.records == len(rows)
    assert loghub_templates / 1.5 <= report.new_templates <= loghub_templates * 1.5
    events_of_template: defaultdict[int | None, Counter[str]] = defaultdict(Counter)
    for body, template_id in zip(bodies, record_templates(store), strict=True):
        events_of_template[template_id][by_body[body].pop()] += 1
    purity = sum(c.most_common(1)[0][1] for c in events_of_template.values()) / len(rows)
    assert purity >= 0.95, f"mined templates mix loghub events: purity {purity:.3f}"


def test_upgrade_from_unsharded_logs_keeps_templates_ids_and_the_tree(
    store_url: str, tmp_path: Path
) -> None:
    """A store written before sharded logs (revision 0004: template id = Drain3 cluster id, one
    miner state row) upgrades in place: records get their entity hash, templates and state
    become the unsharded tree's, and mining goes on with the same tree: a known message gets
    its old template, a new one a fresh id (on PostgreSQL the id sequence was moved past the
    ids written by hand)."""
    # a real Drain3 snapshot and its templates, as the previous version wrote them
    with Store.open(f"sqlite:///{tmp_path / 'before.db'}") as before:
        add_records(before, ["disk sda1 is 91% full", "worker pool resized to 8"])
        LogTemplateMiner(before, LogTemplatesConfig()).mine_pending()
        with before.engine.connect() as connection:
            state = connection.scalar(select(LogMinerStateRow.state))
            templates = connection.execute(
                select(LogTemplateRow.id, LogTemplateRow.template, LogTemplateRow.count)
            ).all()
    old = alembic.config.Config()
    old.set_main_option("script_location", str(MIGRATIONS_DIR))
    old.set_main_option("sqlalchemy.url", store_url.replace("%", "%%"))
    if store_url.startswith("sqlite"):
        (tmp_path / "data").mkdir(exist_ok=True)
    alembic.command.upgrade(old, "0004")
    engine = create_engine(store_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO log_templates (id, template, first_seen, last_seen, count) "
                "VALUES (:id, :template, :at, :at, :count)"
            ),
            [{"id": i, "template": t, "at": T0, "count": n} for i, t, n in templates],
        )
        connection.execute(
            text(
                "INSERT INTO log_records (received_at, observed_at, entity_group, entity_key, "
                "severity_number, severity_text, body, template_id) "
                "VALUES (:at, :at, 'web', :key, 9, 'INFO', :body, :template)"
            ),
            [
                {"at": T0, "key": "web-1", "body": "disk sda1 is 91% full", "template": 1},
                {"at": T0, "key": "web-2", "body": "worker pool resized to 8", "template": 2},
            ],
        )
        connection.execute(
            text("INSERT INTO log_miner_state (id, state, updated_at) VALUES (1, :s, :at)"),
            {"s": state, "at": T0},
        )
    engine.dispose()

    with Store.open(store_url) as store:
        with store.engine.connect() as connection:
            hashes = connection.execute(
                select(LogRecordRow.entity_key, LogRecordRow.entity_hash)
            ).all()
            assert hashes and all(h == entity_hash(key) for key, h in hashes)
            rows = connection.execute(
                select(LogTemplateRow.id, LogTemplateRow.cluster_id, LogTemplateRow.miner)
            ).all()
            assert sorted(rows) == [(i, i, "") for i, _, _ in sorted(templates)]
        add_records(store, ["disk sdb2 is 95% full", "kernel panic: not syncing"])
        assert LogTemplateMiner(store, LogTemplatesConfig()).mine_pending().records == 2
        texts = template_texts(store)
        assert record_templates(store)[2] == 1  # the old template, from the old tree
        new = record_templates(store)[3]
        assert new not in {i for i, _, _ in templates} and texts[new] == "kernel panic: not syncing"
