"""Shared fixtures of the test suite."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from aiops_plugin.store import Store
from tests.postgres_fixture import *  # noqa: F403


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database: a SQLite file, or a fresh database on the session's PostgreSQL
    (``postgresql_url``); tests taking it run against both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'aiops.db'}"
    return request.getfixturevalue("postgresql_url")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """An open, migrated store on ``store_url``."""
    with Store.open(store_url) as opened:
        yield opened
