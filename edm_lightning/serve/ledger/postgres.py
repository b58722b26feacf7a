"""Queries counted per client in PostgreSQL (psycopg 3): any number of server processes, on any hosts, share budgets
and rate limits with the same promise as the SQLite ledger.

A charge is one statement (``INSERT ... ON CONFLICT DO UPDATE ... WHERE queries + n <= budget``), committed
before it returns: concurrent charges on one client serialise on its row, and a batch that does not fit is
refused whole. Rate-limit buckets are admitted in one transaction holding their rows' locks (taken in the
buckets' sorted order: no deadlock between replicas), timed by the database's clock so that replicas on several
hosts agree; their state is committed without waiting for the disk (a crashed database only refills them).

The tables are made once by ``python -m edm_lightning.serve init-ledger --ledger URL``; a server refuses a
database without them (or with another program's tables of the same names) at start, with one line. While
serving, a database that cannot be reached, shut down or too slow makes every call raise
:class:`~edm_lightning.serve.ledger.base.LedgerUnavailable` within seconds (short connect, pool and statement
timeouts); the connection pool reconnects when the database is back. A password in the URL is masked in every
message (better: libpq's ``PGPASSWORD`` or ``~/.pgpass``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import quote, unquote

from edm_lightning.errors import ConfigError
from edm_lightning.serve.ledger.base import Bucket, BudgetExhausted, LedgerUnavailable, check_buckets, gcra

__all__ = ["PostgresLedger", "create_schema", "is_postgres_url", "mask_password"]

SCHEMES = ("postgresql://", "postgres://")
INIT_COMMAND = "python -m edm_lightning.serve init-ledger --ledger URL"
SPENT, RATE_LIMITS = "edm_spent", "edm_rate_limits"
# table -> (its columns as (name, type, not null), the CREATE TABLE body)
TABLES = {
    SPENT: ([("client", "text", True), ("queries", "bigint", True)],
            "client text PRIMARY KEY, queries bigint NOT NULL CHECK (queries >= 0)"),
    RATE_LIMITS: ([("bucket", "text", True), ("tat", "double precision", True)],
                  "bucket text PRIMARY KEY, tat double precision NOT NULL"),
}
_SCHEMA_LOCK = 0x6564_6D6C  # pg_advisory_xact_lock key: concurrent init-ledger runs create the tables once

_CHARGE = (f"INSERT INTO {SPENT} AS s (client, queries) VALUES (%(client)s, %(count)s) ON CONFLICT (client) "
           "DO UPDATE SET queries = s.queries + excluded.queries WHERE s.queries + excluded.queries <= %(budget)s "
           "RETURNING queries")
_SPENT = f"SELECT queries FROM {SPENT} WHERE client = %s"
_REFUND = f"UPDATE {SPENT} SET queries = GREATEST(queries - %s, 0) WHERE client = %s"
# Creates missing buckets and locks them all, in sorted order; the database's clock is read once every lock is held.
_LOCK_BUCKETS = (f"INSERT INTO {RATE_LIMITS} AS r (bucket, tat) SELECT name, 0 FROM unnest(%s::text[]) AS name "
                 "ORDER BY name ON CONFLICT (bucket) DO UPDATE SET tat = r.tat "
                 "RETURNING bucket, tat, extract(epoch FROM clock_timestamp())::float8")
_STORE_BUCKETS = (f"UPDATE {RATE_LIMITS} AS r SET tat = v.tat FROM unnest(%s::text[], %s::float8[]) AS v(bucket, tat) "
                  "WHERE r.bucket = v.bucket")


def is_postgres_url(spec: str) -> bool:
    """Whether ``spec`` names a PostgreSQL database (``postgresql://`` or ``postgres://``) rather than a file."""
    return spec.lower().startswith(SCHEMES)


def mask_password(url: str) -> str:
    """``url`` with the password (``user:PASSWORD@`` or ``?password=``) replaced by ``***``.

    The credentials are found as libpq finds them: everything between ``://`` and the first ``@`` before any ``/``
    (so a password holding ``#`` or ``?`` is masked whole, as libpq would use it), the password after its first ``:``.

    Returns:
        The URL, fit to print.

    >>> mask_password("postgresql://edm:s3cret@db.example:5432/ledger?password=x&sslmode=require")
    'postgresql://edm:***@db.example:5432/ledger?password=***&sslmode=require'
    >>> mask_password("postgresql://edm:pa#ss?w@db/ledger")
    'postgresql://edm:***@db/ledger'
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return "***"  # not a URL: nothing of it is safe to assume
    userinfo, host = _credentials(rest)
    if userinfo is not None and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{host}"
    elif userinfo is None and "@" in rest:  # a "/" before the "@" (libpq fails to parse it): hide all before the "@"
        rest = f"***@{rest.rpartition('@')[2]}"
    rest = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", rest)
    return f"{scheme}://{rest}"


def _credentials(rest: str) -> tuple[str | None, str]:
    """``(user[:password] or None, the rest after its @)`` of a URL's part after ``://``, split as libpq splits it."""
    end = next((i for i, c in enumerate(rest) if c in "@/"), len(rest))
    if end < len(rest) and rest[end] == "@":
        return rest[:end], rest[end + 1:]
    return None, rest


def _password(url: str) -> str | None:
    """The password ``url`` gives (percent-decoded), in its credentials or its ``password=`` parameter, or ``None``."""
    userinfo, _ = _credentials(url.partition("://")[2])
    found = re.search(r"(?i)[?&]password=([^&]*)", url)
    if found:
        return unquote(found.group(1))
    if userinfo is not None and ":" in userinfo:
        return unquote(userinfo.split(":", 1)[1])
    return None


def _one_line(err: BaseException, url: str) -> str:
    """The message of libpq (or the pool) in one line, without the password even if some server echoed it."""
    text = " ".join(str(err).split())
    text = re.sub(r"^connection (failed|is bad): ", "", text)
    text = text.replace(url, mask_password(url))  # libpq quotes a URI it cannot parse
    password = _password(url)
    if password and len(password) >= 4:  # a shorter one is no secret, and would garble the message
        for form in {password, quote(password, safe=""), quote(password)}:  # as given, and percent-encoded
            text = text.replace(form, "***")
    return text or type(err).__name__


def _imports():
    """The modules psycopg and psycopg_pool (the ``[serve]`` extra), or a ConfigError naming it."""
    try:
        import psycopg  # optional: the [serve] extra
        import psycopg_pool  # optional: the [serve] extra
    except ImportError as err:
        raise ConfigError(f"a PostgreSQL ledger needs the {err.name!r} package: pip install 'edm-lightning[serve]'") from None
    return psycopg, psycopg_pool


def _connection_options(url: str, timeout_s: float) -> dict:
    """What every connection adds to ``url``: autocommit, fast failure on a dead host, a name in pg_stat_activity."""
    psycopg, _ = _imports()
    given = psycopg.conninfo.conninfo_to_dict(url)
    options = {"autocommit": True, "connect_timeout": max(1, round(timeout_s)), "application_name": "edm-lightning",
               "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2,
               "tcp_user_timeout": int(timeout_s * 1000)}  # keepalives, tcp_user_timeout: TCP only, ignored on sockets
    return {name: value for name, value in options.items() if name not in given}


def _connect(url: str, timeout_s: float):
    """One checked connection, or a ConfigError saying what is wrong (reachability, credentials, database)."""
    psycopg, _ = _imports()
    shown = mask_password(url)
    try:
        return psycopg.connect(url, **_connection_options(url, timeout_s))
    except psycopg.Error as err:
        reason = _one_line(err, url)
        if isinstance(err, psycopg.ProgrammingError) or re.search(r"^invalid |^missing |Invalid IPv6", reason):
            raise ConfigError(f"the ledger URL {shown} is not a valid PostgreSQL URL ({reason}): write it as "
                              "postgresql://USER@HOST:PORT/DATABASE (libpq's connection URI)") from None
        if re.search(r"password authentication failed|no password supplied|role \S+ does not exist|"
                     r"authentication failed|no pg_hba.conf entry", reason):
            raise ConfigError(f"the ledger database {shown} refused the credentials ({reason}): give the right user in "
                              "--ledger, and its password in PGPASSWORD or ~/.pgpass rather than in the URL") from None
        if re.search(r"database \S+ does not exist", reason):
            raise ConfigError(f"the ledger database {shown} does not exist ({reason}): create it (createdb), then run "
                              f"`{INIT_COMMAND}`") from None
        raise ConfigError(f"cannot reach the ledger database {shown} ({reason}): start PostgreSQL there, or correct the "
                          "host, port or socket in --ledger") from None


def _schema_problem(conn) -> str | None:
    """What makes the connected database hold something other than our tables, or ``None``."""
    missing = []
    for table, (columns, body) in TABLES.items():
        found = conn.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a "
                             "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped "
                             "ORDER BY a.attnum", (table,)).fetchall()
        if not found:
            missing.append(table)
        elif [tuple(row) for row in found] != columns:
            return (f"its table {table!r} has the columns {[f'{name} {kind}' for name, kind, _ in found]}, not ({body}): "
                    "another program's table? name another database (or schema) in --ledger")
    if missing:
        return f"it has no query ledger (no table {' or '.join(missing)}): create it with `{INIT_COMMAND}`"
    return None


def _check_schema(conn, url: str) -> None:
    """Refuse tables that are missing, foreign, or that our statements cannot use (constraints, privileges):
    each statement is tried once, rolled back.

    Raises:
        ConfigError: what is wrong and what to do.
    """
    psycopg, _ = _imports()
    shown = mask_password(url)
    problem = _schema_problem(conn)
    if problem is not None:
        raise ConfigError(f"the ledger database {shown} cannot be used: {problem}")
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(_CHARGE, {"client": "", "count": 0, "budget": 0})
            conn.execute(_REFUND, (0, ""))
            conn.execute(_LOCK_BUCKETS, ([""],))
            conn.execute(_STORE_BUCKETS, ([""], [0.0]))
    except psycopg.errors.InsufficientPrivilege as err:
        raise ConfigError(f"the ledger database {shown} cannot be used ({_one_line(err, url)}): grant this role "
                          f"SELECT, INSERT, UPDATE on {SPENT} and {RATE_LIMITS}") from None
    except psycopg.Error as err:
        raise ConfigError(f"the ledger database {shown} cannot be used ({_one_line(err, url)}): its tables "
                          f"{SPENT}, {RATE_LIMITS} are not the query ledger's; name another database in --ledger") from None


def create_schema(url: str, timeout_s: float = 5.0) -> None:
    """Create the ledger's tables in ``url``'s database if they are missing (``init-ledger``; idempotent).

    Raises:
        ConfigError: the database cannot be reached or written, or holds foreign tables of the same names.
    """
    psycopg, _ = _imports()
    with _connect(url, timeout_s) as conn:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for table, (_, body) in TABLES.items():
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({body})")
        except psycopg.errors.InsufficientPrivilege as err:
            raise ConfigError(f"cannot create the ledger's tables in {mask_password(url)} ({_one_line(err, url)}): "
                              "run init-ledger as the database's owner") from None
        except psycopg.Error as err:
            raise ConfigError(f"cannot create the ledger's tables in {mask_password(url)} ({_one_line(err, url)})") from None
        _check_schema(conn, url)


class PostgresLedger:
    """Per-client query counts and rate-limit buckets in a PostgreSQL database, shared by every replica.

    Args:
        url: ``postgresql://USER@HOST:PORT/DATABASE`` (libpq's URL; a password from ``PGPASSWORD`` or ``~/.pgpass``).
        pool_size: most connections this process holds.
        timeout_s: longest wait, in seconds, to connect or for a free connection; statements are cancelled after
            twice that. Past it a call raises :class:`LedgerUnavailable`.

    Raises:
        ConfigError: the database cannot be reached, refuses the credentials, does not exist, or lacks the
            ledger's tables (or holds foreign ones); one line, the password masked.
    """

    def __init__(self, url: str, pool_size: int = 10, timeout_s: float = 3.0):
        psycopg, psycopg_pool = _imports()
        self.url, self.timeout_s = url, timeout_s
        with _connect(url, timeout_s) as conn:
            _check_schema(conn, url)
        statement_timeout_ms = int(2000 * timeout_s)

        def configure(conn) -> None:
            conn.execute(f"SET statement_timeout = {statement_timeout_ms}")

        self._errors = (psycopg.Error,)  # every psycopg failure while serving, the pool's timeout included
        self._pool = psycopg_pool.ConnectionPool(
            url, kwargs=_connection_options(url, timeout_s), min_size=1, max_size=pool_size, timeout=timeout_s,
            configure=configure, check=psycopg_pool.ConnectionPool.check_connection, reconnect_timeout=2 * timeout_s,
            name="edm-ledger", open=True)

    def describe(self) -> str:
        """``PostgreSQL <url>``, the password masked."""
        return f"PostgreSQL {mask_password(self.url)}"

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close(timeout=self.timeout_s)

    def _unavailable(self, err: BaseException) -> LedgerUnavailable:
        return LedgerUnavailable(f"the ledger database {mask_password(self.url)} cannot be used ({_one_line(err, self.url)})")

    def spent(self, client: str) -> int:
        """Queries charged to ``client`` so far.

        Returns:
            A whole number >= 0.

        Raises:
            LedgerUnavailable: the database cannot be used.
        """
        try:
            with self._pool.connection() as conn:
                row = conn.execute(_SPENT, (client,)).fetchone()
        except self._errors as err:
            raise self._unavailable(err) from err
        return 0 if row is None else int(row[0])

    def spent_by_client(self) -> dict[str, int]:
        """Queries charged so far, by client name.

        Returns:
            Each charged client's count (clients never charged are absent).

        Raises:
            LedgerUnavailable: the database cannot be used.
        """
        try:
            with self._pool.connection() as conn:
                rows = conn.execute(f"SELECT client, queries FROM {SPENT}").fetchall()
        except self._errors as err:
            raise self._unavailable(err) from err
        return {client: int(queries) for client, queries in rows}

    def charge(self, client: str, count: int, budget: int) -> int:
        """Count ``count`` queries for ``client`` if they fit ``budget``, in one statement committed before it returns.

        Returns:
            The client's queries spent, this batch included.

        Raises:
            BudgetExhausted: the batch does not fit; nothing was counted.
            LedgerUnavailable: the database cannot be used; nothing was counted (or, if it failed during the
                commit, possibly counted: never answered uncounted).
            ValueError: ``count`` is negative.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        try:
            with self._pool.connection() as conn:
                row = None
                if count <= budget:  # a new client's row is inserted whole, without the WHERE
                    row = conn.execute(_CHARGE, {"client": client, "count": count, "budget": budget}).fetchone()
                if row is None:
                    spent = conn.execute(_SPENT, (client,)).fetchone()
                    raise BudgetExhausted(client, 0 if spent is None else int(spent[0]), budget, count)
        except self._errors as err:
            raise self._unavailable(err) from err
        return int(row[0])

    def refund(self, client: str, count: int) -> None:
        """Give back ``count`` queries charged for a batch the server then failed to answer.

        Raises:
            LedgerUnavailable: the database cannot be used.
        """
        try:
            with self._pool.connection() as conn:
                conn.execute(_REFUND, (count, client))
        except self._errors as err:
            raise self._unavailable(err) from err

    def admit(self, buckets: Sequence[Bucket]) -> float:
        """Take every bucket's cost at once, or none (:func:`~edm_lightning.serve.ledger.base.gcra`), in one
        transaction holding the buckets' rows, at the database's time.

        Returns:
            0.0 when admitted; else the seconds until the request would fit (nothing consumed).

        Raises:
            LedgerUnavailable: the database cannot be used; nothing was consumed.
            ValueError: a cost above its bucket's burst.
        """
        check_buckets(buckets)
        if not buckets:
            return 0.0
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SET LOCAL synchronous_commit TO off")  # rate-limit state: no need to wait for the disk
                rows = conn.execute(_LOCK_BUCKETS, (sorted(bucket.name for bucket in buckets),)).fetchall()
                now = max(row[2] for row in rows)  # read after the last lock was taken
                wait, tats = gcra(buckets, {bucket: tat for bucket, tat, _ in rows}, now)
                if tats:
                    conn.execute(_STORE_BUCKETS, (list(tats), list(tats.values())))
        except self._errors as err:
            raise self._unavailable(err) from err
        return wait
