"""A throw-away PostgreSQL server for the ledger tests: a fresh, empty database per test.

By default the tests start their own server with ``pgserver`` (PostgreSQL in a pip package, the ``dev`` extra; a
Unix socket in a temporary folder, no TCP port, stopped when the session ends). ``EDM_TEST_POSTGRES_URL`` names an
existing server instead (a superuser's URL, with password authentication for TCP or socket logins); each test
then gets its own database there, dropped afterwards.

A test module imports the fixtures (``postgres``, ``postgres_url``) by their functions' names:
``from tests.helpers.postgres import postgres_fixture, postgres_url_fixture  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

URL_ENV = "EDM_TEST_POSTGRES_URL"


def with_database(url: str, database: str, user: str | None = None, password: str | None = None) -> str:
    """``url`` naming another database (and, if given, another user and password)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if user is not None:
        netloc = f"{user}:{password}@{netloc}" if password is not None else f"{user}@{netloc}"
    elif "@" in parts.netloc:
        netloc = parts.netloc
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))


def database_of(url: str) -> str:
    """The database ``url`` names."""
    return urlsplit(url).path.lstrip("/")


class Postgres:
    """One PostgreSQL server: ``admin_url`` (a superuser), new databases and roles, and outages on demand."""

    def __init__(self, folder: Path):
        external = os.environ.get(URL_ENV)
        self.server = None
        if external:
            self.admin_url = external
        else:
            with warnings.catch_warnings():  # as root without a login session: no XDG_RUNTIME_DIR, /tmp serves
                warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
                import pgserver  # the dev extra

            self.server = pgserver.get_server(folder, cleanup_mode="stop")
            self.admin_url = self.server.get_uri()
        self.created: list[str] = []
        self.roles: list[str] = []

    def execute(self, statement, params=None, database: str | None = None) -> list[tuple]:
        url = self.admin_url if database is None else with_database(self.admin_url, database)
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def new_database(self) -> tuple[str, str]:
        """A new, empty database: ``(its name, its URL)``."""
        name = f"edm_test_{uuid.uuid4().hex[:12]}"
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.created.append(name)
        return name, with_database(self.admin_url, name)

    def drop_database(self, name: str) -> None:
        self.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def role_with_password(self, password: str) -> str:
        """A new login role that must give ``password`` (socket logins included: a server started here trusts
        every local login, so this role is made to authenticate)."""
        name = f"edm_role_{uuid.uuid4().hex[:8]}"
        self.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
        self.roles.append(name)
        if self.server is not None:
            hba = Path(self.server.pgdata) / "pg_hba.conf"
            hba.write_text(f"local all {name} scram-sha-256\nhost all {name} all scram-sha-256\n" + hba.read_text())
            self.execute("SELECT pg_reload_conf()")
        return name

    def backends(self, database: str) -> int:
        """Connections open to ``database`` (other than the one asking)."""
        return self.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                            (database,))[0][0]

    @contextlib.contextmanager
    def outage(self, database: str) -> Iterator[None]:
        """``database`` unusable inside the block: the server stopped (``pg_ctl stop -m fast``) when the tests
        started it, else new connections refused and every open one terminated; back as it was afterwards."""
        if self.server is not None:
            self._pg_ctl("-m", "fast", "stop")
            try:
                yield
            finally:
                self._pg_ctl("-o", '-h ""', "-o", f"-k {self.server.get_postmaster_info().socket_dir}",
                             "-l", str(self.server.log), "start")
            return
        name = sql.Identifier(database)
        self.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(name))
        try:
            self.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))
            yield
        finally:
            self.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(name))

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl  # the dev extra

        pg_ctl(["-w", *args], pgdata=self.server.pgdata, user=self.server.system_user, timeout=60)

    def close(self) -> None:
        for name in self.created:
            with contextlib.suppress(psycopg.Error):
                self.drop_database(name)
        for name in self.roles:  # roles belong to the whole server: gone with their databases' grants
            with contextlib.suppress(psycopg.Error):
                self.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
        if self.server is not None:
            with contextlib.suppress(Exception):
                self._pg_ctl("-m", "fast", "stop")


@pytest.fixture(scope="session", name="postgres")
def postgres_fixture() -> Iterator[Postgres]:
    """The session's PostgreSQL server (started here unless ``EDM_TEST_POSTGRES_URL`` names one).

    Its data lie in a folder of their own, not under pytest's temporary folder: run as root, PostgreSQL runs as
    another user, who must be able to reach it (pytest keeps its folder private to the user running it).
    """
    folder = Path(tempfile.mkdtemp(prefix="edm-postgres-"))
    server = Postgres(folder)
    yield server
    server.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(name="postgres_url")
def postgres_url_fixture(postgres: Postgres) -> Iterator[str]:
    """The URL of a new, empty database (no ledger tables yet), dropped after the test."""
    name, url = postgres.new_database()
    yield url
    postgres.drop_database(name)
