"""A real PostgreSQL server for the test session, and a fresh database per test.

Use from ``tests/conftest.py`` with ``from tests.postgres_fixture import *``. Fixtures:

- ``postgresql_server`` (session): one server on 127.0.0.1, started once, stopped and deleted at
  the end of the session.
- ``postgresql_url`` (function): SQLAlchemy URL of a new, empty database, dropped after the test.

The server binaries are taken from ``$AIOPS_PG_BIN``, else the newest
``/usr/lib/postgresql/*/bin``, else ``initdb`` on ``PATH``; without them the fixture fails (a
PostgreSQL test that silently skips proves nothing). ``initdb`` refuses to run as root, so under
root the server runs as the ``postgres`` user through ``runuser``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psycopg2
import pytest

__all__ = ["PostgresServer", "postgresql_server", "postgresql_url", "start_server", "stop_server"]

START_TIMEOUT_S = 60.0
SUPERUSER = "postgres"


@dataclass(frozen=True)
class PostgresServer:
    """A running server that trusts local TCP connections of ``user``."""

    host: str
    port: int
    user: str
    data_dir: Path

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{database}"

    def admin_connection(self) -> psycopg2.extensions.connection:
        """Autocommit connection to the ``postgres`` database, for CREATE / DROP DATABASE."""
        connection = psycopg2.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", connect_timeout=5
        )
        connection.autocommit = True
        return connection


def _find_bin_dir() -> Path:
    """Folder holding initdb and pg_ctl; fails the test with what to install when absent."""
    candidates: list[Path] = []
    if env := os.environ.get("AIOPS_PG_BIN"):
        candidates.append(Path(env))
    installed = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(installed, key=lambda p: int(p.parent.name), reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    pytest.fail(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in $AIOPS_PG_BIN, "
        "/usr/lib/postgresql/*/bin or PATH; install them (Debian: apt-get install postgresql-15) "
        "or set AIOPS_PG_BIN",
        pytrace=False,
    )


def _as_server_user(args: list[str]) -> list[str]:
    """Prefix a command so that it runs as ``postgres`` when the tests run as root."""
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", SUPERUSER, "--", *args]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _as_server_user(args), capture_output=True, text=True, timeout=START_TIMEOUT_S
    )


def _fail(what: str, result: subprocess.CompletedProcess[str], log: Path | None = None) -> NoReturn:
    log_tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(
        f"{what} failed ({result.returncode}): {result.stdout}{result.stderr}{log_tail}",
        pytrace=False,
    )


def _wait_until_accepting(server: PostgresServer, log: Path) -> None:
    """Poll with a deadline: the server is ready when a real connection succeeds."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            server.admin_connection().close()
            return
        except psycopg2.OperationalError as exc:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"PostgreSQL on port {server.port} did not accept connections within "
                    f"{START_TIMEOUT_S:.0f} s: {exc}\n{log.read_text()[-3000:]}",
                    pytrace=False,
                )
            time.sleep(0.05)


def _server_options(port: int, socket_dir: Path) -> str:
    # Durability is irrelevant for a throw-away test server; skipping fsync makes it fast.
    return (
        f"-h 127.0.0.1 -p {port} -k {socket_dir} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )


def stop_server(server: PostgresServer) -> None:
    """Stop the server (a database outage, for the tests of one); :func:`start_server` again
    before the test ends: the session's other tests use it."""
    pg_ctl = [str(_find_bin_dir() / "pg_ctl"), "-D", str(server.data_dir), "-m", "fast", "stop"]
    result = _run(pg_ctl)
    if result.returncode != 0:
        _fail("pg_ctl stop", result)


def start_server(server: PostgresServer) -> None:
    """Start a server stopped by :func:`stop_server` on the same port."""
    log = server.data_dir.parent / "server.log"
    pg_ctl = [str(_find_bin_dir() / "pg_ctl"), "-D", str(server.data_dir), "-l", str(log)]
    options = _server_options(server.port, server.data_dir.parent)
    result = _run([*pg_ctl, "-o", options, "-w", "start"])
    if result.returncode != 0:
        _fail("pg_ctl start", result, log)
    _wait_until_accepting(server, log)


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgresServer]:
    """Start one PostgreSQL server for the whole session; stop it and delete its files after."""
    bin_dir = _find_bin_dir()
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            pytest.fail(f"running as root needs a {SUPERUSER!r} user for PostgreSQL", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="aiops-pg-"))
    data_dir, log = root / "data", root / "server.log"
    if os.geteuid() == 0:
        shutil.chown(root, user=SUPERUSER, group=SUPERUSER)
    try:
        initdb = [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER]
        result = _run([*initdb, "--auth=trust", "--encoding=UTF8", "--no-locale"])
        if result.returncode != 0:
            _fail("initdb", result)
        # Another process may take the free port before the server binds it: try a few ports.
        for _attempt in range(3):
            port = _free_port()
            options = _server_options(port, root)
            pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log)]
            result = _run([*pg_ctl, "-o", options, "-w", "start"])
            if result.returncode == 0:
                break
        else:
            _fail("pg_ctl start", result, log)
        server = PostgresServer(host="127.0.0.1", port=port, user=SUPERUSER, data_dir=data_dir)
        try:
            _wait_until_accepting(server, log)
            yield server
        finally:
            subprocess.run(
                _as_server_user(
                    [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "stop"]
                ),
                capture_output=True,
                timeout=START_TIMEOUT_S,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgresql_url(postgresql_server: PostgresServer) -> Iterator[str]:
    """A new, empty database for one test, so tests cannot see each other's rows."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    connection = postgresql_server.admin_connection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()
    yield postgresql_server.url(name)
    connection = postgresql_server.admin_connection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        connection.close()
