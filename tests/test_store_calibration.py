"""Calibration versions in the store, on SQLite and on the session's real PostgreSQL server."""

from __future__ import annotations

import math
import struct
from datetime import UTC
from typing import Any

import numpy as np
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, func, inspect, select

from aiops_plugin.store import CalibrationVersion, Store
from aiops_plugin.store.models import CalibrationVersionRow
from aiops_plugin.store.repo import MIGRATIONS_DIR

TABLE = "calibration_versions"
STATE = {
    "version": 1,
    "tail_fraction": 0.05,
    "prior_exceedances": None,
    "pool": {"knots": [0.0, 0.5, 1.25], "xi": -0.125, "sigma": 1e-300},
    "entities": [{"key": "a:9100", "knots": [[0.1, 0.2], [0.3, 5e-324]]}],
}


def alembic_config(url: str) -> Config:
    """The configuration ``Store.upgrade`` builds, for running other Alembic commands by hand."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def calibration_schema(url: str) -> tuple[set[str], set[str]]:
    """(table names, index names of ``calibration_versions``) of the database at ``url``."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            schema = inspect(connection)
            tables = set(schema.get_table_names())
            indexes = (
                {index["name"] for index in schema.get_indexes(TABLE)} if TABLE in tables else set()
            )
    finally:
        engine.dispose()
    return tables, indexes


def save_calibration(
    store: Store, settings_hash: str = "s1", **overrides: Any
) -> CalibrationVersion:
    fields: dict[str, Any] = {
        "group": "hosts",
        "detector": "multiscale",
        "settings_hash": settings_hash,
        "model_versions": {"multiscale": 7},
        "method": "conformal+gpd tail",
        "state": STATE,
        "slice_start": 1714564800.0,
        "slice_end": 1714568400.5,
        "n_steps": 240,
    }
    fields.update(overrides)
    return store.save_calibration_version(**fields)


def count_rows(store: Store) -> int:
    with store.engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(CalibrationVersionRow))


def test_migration_creates_calibration_versions_and_downgrade_drops_it(store_url: str) -> None:
    Store.open(store_url).close()
    tables, indexes = calibration_schema(store_url)
    assert TABLE in tables
    assert indexes == {"ix_calibration_versions_group_detector_hash_created_at"}

    command.downgrade(alembic_config(store_url), "0002")
    tables, _ = calibration_schema(store_url)
    assert TABLE not in tables
    assert {"model_versions", "log_records"} <= tables

    command.upgrade(alembic_config(store_url), "head")
    assert TABLE in calibration_schema(store_url)[0]


def test_latest_calibration_version_is_the_newest_for_group_detector_and_hash(
    store: Store,
) -> None:
    save_calibration(store, "s1")
    newest_s1 = save_calibration(store, "s1", n_steps=300, model_versions={"multiscale": 8})
    save_calibration(store, "s2")
    save_calibration(store, "s1", detector="fused")
    save_calibration(store, "s1", group="pods")

    latest = store.latest_calibration_version("hosts", "multiscale", "s1")
    assert latest == newest_s1
    assert (latest.n_steps, latest.model_versions) == (300, {"multiscale": 8})
    assert (latest.slice_start, latest.slice_end) == (1714564800.0, 1714568400.5)
    assert latest.method == "conformal+gpd tail"
    assert latest.created_at.tzinfo == UTC


def test_latest_calibration_version_is_none_for_other_hash_detector_and_group(
    store: Store,
) -> None:
    save_calibration(store, "s1")
    assert store.latest_calibration_version("hosts", "multiscale", "s-changed") is None
    assert store.latest_calibration_version("hosts", "probability", "s1") is None
    assert store.latest_calibration_version("pods", "multiscale", "s1") is None


def test_calibration_state_round_trips_floats_bit_for_bit(store: Store) -> None:
    state = {**STATE, "grid": [math.nextafter(0.0, 1.0), -0.0, 1 / 3, 1e308, -2.5e-300]}
    save_calibration(store, state=state, slice_start=None, slice_end=None)

    loaded = store.latest_calibration_version("hosts", "multiscale", "s1")
    assert loaded.state == state
    assert loaded.state["pool"]["sigma"] == 1e-300
    assert loaded.state["entities"][0]["knots"][1][1] == 5e-324
    bits = [struct.pack("<d", value) for value in loaded.state["grid"]]
    assert bits == [struct.pack("<d", value) for value in state["grid"]]
    assert isinstance(loaded.state["version"], int)
    assert (loaded.slice_start, loaded.slice_end) == (None, None)


def test_prune_calibration_versions_keeps_the_newest(store: Store) -> None:
    saved = [save_calibration(store, f"s{i % 2}") for i in range(7)]
    other = save_calibration(store, detector="fused")

    assert store.prune_calibration_versions("hosts", "multiscale", keep=3) == 4
    assert store.prune_calibration_versions("hosts", "multiscale", keep=3) == 0
    with store.engine.connect() as connection:
        remaining = set(connection.scalars(select(CalibrationVersionRow.id)))
    assert remaining == {version.id for version in saved[-3:]} | {other.id}
    with pytest.raises(ValueError, match="keep must be >= 0"):
        store.prune_calibration_versions("hosts", "multiscale", keep=-1)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (float("nan"), "is nan"),
        (float("inf"), "is inf"),
        (np.float32(0.5), "is a float32"),
    ],
)
def test_non_json_state_is_rejected_naming_group_and_detector(
    store: Store, bad: object, reason: str
) -> None:
    state = {**STATE, "pool": {**STATE["pool"], "knots": [0.0, bad]}}
    with pytest.raises(ValueError, match=reason) as raised:
        save_calibration(store, group="web", detector="fused", state=state)
    message = str(raised.value)
    assert "group 'web'" in message
    assert "detector 'fused'" in message
    assert "state['pool']['knots'][1]" in message
    assert count_rows(store) == 0


def test_non_string_state_key_and_non_finite_slice_are_rejected(store: Store) -> None:
    with pytest.raises(ValueError, match="JSON keys must be strings"):
        save_calibration(store, state={**STATE, 3: 1.0})
    with pytest.raises(ValueError, match="slice_end is nan"):
        save_calibration(store, slice_end=float("nan"))
    with pytest.raises(ValueError, match="integer ids"):
        save_calibration(store, model_versions={"multiscale": "7"})
    assert count_rows(store) == 0
