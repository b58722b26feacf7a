"""The query ledger's contract, on both backends (SQLite, PostgreSQL on a throw-away server), and its bad input."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from edm_lightning.errors import ConfigError
from edm_lightning.models import EnsembleModule
from edm_lightning.serve import Bucket, BudgetExhausted, LedgerUnavailable, SqliteLedger, add_client, open_ledger
from edm_lightning.serve.__main__ import main as serve_main
from edm_lightning.serve.ledger import init_ledger, init_ledger_main, mask_password
from edm_lightning.serve.ledger.base import gcra
from tests.helpers.files import REPO_ROOT
from tests.helpers.postgres import database_of, postgres_fixture, postgres_url_fixture, with_database  # noqa: F401
from tests.helpers.server import free_port


@pytest.fixture(params=["sqlite", "postgres"])
def spec(request, tmp_path) -> str:
    """Where a new ledger lives: a SQLite path, or a PostgreSQL database with the ledger's tables."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    url = request.getfixturevalue("postgres_url")
    init_ledger(url).close()
    return url


@pytest.fixture
def ledger(spec):
    opened = open_ledger(spec)
    yield opened
    opened.close()


def in_threads(count: int, work) -> None:
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive()


# ---------------------------------------------------------------------------------------------------------- budgets
def test_a_batch_is_charged_within_the_budget_refused_whole_over_it_and_refunded(ledger):
    assert ledger.charge("alice", 60, budget=100) == 60
    with pytest.raises(BudgetExhausted, match="60 of 100 queries spent, this batch of 41"):
        ledger.charge("alice", 41, budget=100)
    with pytest.raises(BudgetExhausted, match="0 of 10 queries spent, this batch of 11"):
        ledger.charge("bob", 11, budget=10)  # a first batch over the budget counts nothing either
    assert ledger.charge("alice", 40, budget=100) == 100
    ledger.refund("alice", 10)
    assert ledger.spent("alice") == 90 and ledger.spent("bob") == 0 and ledger.spent("carol") == 0
    ledger.refund("carol", 5)  # never charged: stays absent, never negative
    assert ledger.charge("bob", 10, budget=10) == 10
    assert ledger.spent_by_client() == {"alice": 90, "bob": 10}
    with pytest.raises(ValueError, match="count must be >= 0"):
        ledger.charge("alice", -1, budget=100)


def test_a_lowered_budget_refuses_even_an_empty_batch(ledger):
    ledger.charge("alice", 50, budget=100)
    for count in (1, 0):
        with pytest.raises(BudgetExhausted, match=f"50 of 40 queries spent, this batch of {count} "):
            ledger.charge("alice", count, budget=40)
    assert ledger.spent("alice") == 50


def test_8_threads_charging_one_client_never_pass_its_budget(ledger):
    charged, refused = [], []

    def client():
        for _ in range(30):  # 8 x 30 x 3 = 720 asked for, 100 in the budget
            try:
                ledger.charge("alice", 3, budget=100)
                charged.append(3)
            except BudgetExhausted:
                refused.append(3)

    in_threads(8, client)
    assert sum(charged) == ledger.spent("alice") == 99 and len(refused) == 8 * 30 - 33


def test_counts_and_buckets_persist_after_reopening(spec):
    first = open_ledger(spec)
    first.charge("alice", 7, budget=10)
    assert first.admit([Bucket("alice:requests", cost=2, rate=0.001, burst=2)]) == 0.0
    first.close()
    again = open_ledger(spec)
    assert again.spent("alice") == 7 and again.spent_by_client() == {"alice": 7}
    assert again.admit([Bucket("alice:requests", cost=1, rate=0.001, burst=2)]) > 900  # still empty: ~1000 s to refill
    again.close()


# ---------------------------------------------------------------------------------------------------------- rate limits
def test_a_bucket_admits_its_burst_then_says_how_long_to_wait_and_refills(ledger):
    bucket = Bucket("alice:images", cost=1, rate=4, burst=3)  # 4 per second, 3 at once
    assert [ledger.admit([bucket]) for _ in range(3)] == [0.0, 0.0, 0.0]
    waits = [ledger.admit([bucket]) for _ in range(3)]
    assert all(0 < wait <= 0.25 for wait in waits)  # one unit back after 1/4 s; a refusal consumes nothing
    assert waits[2] <= waits[0] + 0.01
    time.sleep(waits[-1] + 0.05)
    assert ledger.admit([bucket]) == 0.0
    assert 0 < ledger.admit([bucket]) <= 0.25


def test_buckets_are_admitted_all_or_none(ledger):
    wide, narrow = Bucket("global", cost=1, rate=0.001, burst=5), Bucket("alice", cost=1, rate=0.001, burst=1)
    assert ledger.admit([wide, narrow]) == 0.0
    assert ledger.admit([wide, narrow]) > 900  # refused by the narrow one: the wide one keeps its 4 units
    assert [ledger.admit([wide]) for _ in range(5)] == [0.0, 0.0, 0.0, 0.0, pytest.approx(1000, rel=0.01)]
    assert ledger.admit([]) == 0.0


def test_a_cost_above_the_burst_can_never_fit_and_consumes_nothing(ledger):
    with pytest.raises(ValueError, match="a cost of 65 can never fit its burst of 64"):
        ledger.admit([Bucket("global", cost=1, rate=1, burst=1), Bucket("alice", cost=65, rate=100, burst=64)])
    assert ledger.admit([Bucket("global", cost=1, rate=0.001, burst=1)]) == 0.0  # "global" was not consumed


def test_8_threads_admitting_at_once_take_exactly_the_burst(ledger):
    admitted = []

    def client():
        for _ in range(10):  # 80 asked for, a burst of 20 and almost no refill
            if ledger.admit([Bucket("alice:requests", cost=1, rate=0.001, burst=20)]) == 0.0:
                admitted.append(1)

    in_threads(8, client)
    assert len(admitted) == 20


def test_gcra_refills_at_its_rate():
    bucket = Bucket("b", cost=2, rate=1, burst=4)
    wait, tats = gcra([bucket], {}, now=100.0)
    assert (wait, tats) == (0.0, {"b": 102.0})
    wait, tats = gcra([bucket], tats, now=100.0)
    assert (wait, tats) == (0.0, {"b": 104.0})
    assert gcra([bucket], tats, now=100.5) == (1.5, {})  # needs 2 units, has 0.5
    assert gcra([bucket], tats, now=102.0) == (0.0, {"b": 106.0})


@pytest.mark.parametrize("rate, burst, cost", [(0, 1, 1), (-1, 1, 1), (1, 0, 0), (float("nan"), 1, 1), (1, 1, -1),
                                               (float("inf"), 1, 1)])
def test_a_bucket_without_a_positive_finite_rate_and_burst_is_refused(rate, burst, cost):
    with pytest.raises(ValueError, match="must be a finite number|must be finite numbers"):
        Bucket("b", cost=cost, rate=rate, burst=burst)


# ---------------------------------------------------------------------------------------------------------- SQLite specifics
def test_a_sqlite_ledger_from_before_rate_limits_opens_and_gains_its_table(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE spent (client TEXT PRIMARY KEY, queries INTEGER NOT NULL)")
    db.execute("INSERT INTO spent VALUES ('alice', 12)")
    db.commit()
    db.close()
    ledger = SqliteLedger(path)
    assert ledger.spent("alice") == 12 and ledger.admit([Bucket("alice", cost=1, rate=1, burst=1)]) == 0.0
    ledger.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE rate_limits")
    db.execute("CREATE TABLE rate_limits (bucket TEXT PRIMARY KEY, tokens INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="its table 'rate_limits' has the columns \\['bucket TEXT', 'tokens INTEGER'\\]"):
        SqliteLedger(path)


def test_a_sqlite_ledger_locked_past_its_timeout_is_unavailable_and_counts_nothing(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.sqlite", timeout_s=0.2)
    holder = sqlite3.connect(tmp_path / "ledger.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction, stuck
    for call in (lambda: ledger.charge("alice", 1, 10), lambda: ledger.admit([Bucket("a", cost=1, rate=1, burst=1)])):
        with pytest.raises(LedgerUnavailable, match="cannot be used .*database is locked"):
            call()
    holder.execute("ROLLBACK")
    holder.close()
    assert ledger.spent("alice") == 0 and ledger.charge("alice", 1, 10) == 1
    ledger.close()


# ---------------------------------------------------------------------------------------------------------- PostgreSQL specifics
def test_the_database_going_away_makes_calls_unavailable_and_they_recover_when_it_is_back(postgres, postgres_url):
    init_ledger(postgres_url).close()
    ledger = open_ledger(postgres_url)
    assert ledger.charge("alice", 5, 100) == 5
    database = database_of(postgres_url)
    with postgres.outage(database):
        for call in (lambda: ledger.charge("alice", 5, 100), lambda: ledger.admit([Bucket("a", cost=1, rate=1, burst=1)]),
                     lambda: ledger.spent("alice"), lambda: ledger.refund("alice", 1)):
            started = time.monotonic()
            with pytest.raises(LedgerUnavailable) as raised:
                call()
            assert time.monotonic() - started < 15  # fails within its timeouts, never hangs
            assert "the ledger database postgresql://" in str(raised.value)
    deadline, spent = time.monotonic() + 30, None
    while spent is None and time.monotonic() < deadline:
        try:
            spent = ledger.charge("alice", 5, 100)
        except LedgerUnavailable:
            time.sleep(0.2)
    assert spent == 10 and ledger.spent("alice") == 10  # nothing was counted while it was away
    ledger.close()


def test_init_ledger_is_idempotent_and_opening_a_database_without_it_says_to_run_it(postgres_url, capsys):
    with pytest.raises(ConfigError, match="has no query ledger .*create it with "
                                          "`python -m edm_lightning.serve init-ledger --ledger URL`"):
        open_ledger(postgres_url)
    for run in (init_ledger_main, lambda argv: serve_main(["init-ledger", *argv])):  # the server's own subcommand
        run(["--ledger", postgres_url])
        assert "is ready" in capsys.readouterr().err
    ledger = open_ledger(postgres_url)
    assert ledger.charge("alice", 1, 1) == 1
    ledger.close()
    init_ledger_main(["--ledger", postgres_url])  # the counts stay
    ledger = open_ledger(postgres_url)
    assert ledger.spent("alice") == 1
    ledger.close()


@pytest.mark.parametrize("table, message", [
    ("CREATE TABLE edm_spent (id serial PRIMARY KEY, payload jsonb)",
     "its table 'edm_spent' has the columns \\['id integer', 'payload jsonb'\\].*another program's table"),
    ("CREATE TABLE edm_spent (client text NOT NULL, queries bigint NOT NULL); "
     "CREATE TABLE edm_rate_limits (bucket text PRIMARY KEY, tat double precision NOT NULL)",
     "ON CONFLICT.*are not the query ledger's"),  # the right columns, but no key to count under
])
def test_a_foreign_table_of_the_same_name_is_refused(postgres_url, table, message):
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(table)
    for attempt in (open_ledger, init_ledger):
        with pytest.raises(ConfigError, match=message):
            attempt(postgres_url)


def test_unreachable_servers_wrong_passwords_and_missing_databases_are_refused_in_one_line(postgres, postgres_url):
    role = postgres.role_with_password("the-right-password")
    port = free_port()
    wrong = with_database(postgres_url, database_of(postgres_url), user=role, password="a-wrong-password")
    for url, message in [
        (f"postgresql://edm:a-wrong-password@127.0.0.1:{port}/ledger", f"cannot reach the ledger database postgresql://"
         f"edm:\\*\\*\\*@127.0.0.1:{port}/ledger \\(.*Connection refused.*start PostgreSQL there"),
        (wrong, "refused the credentials .*password authentication failed.*PGPASSWORD or ~/.pgpass"),
        (with_database(postgres_url, "no_such_database"), "does not exist .*create it \\(createdb\\), then run .*init-ledger"),
        ("postgresql://edm:a-wrong-password@[::1/ledger",
         "the ledger URL postgresql://edm:\\*\\*\\*@\\[::1/ledger is not a valid PostgreSQL URL"),
        ("postgresql://edm@127.0.0.1:99999/ledger", "is not a valid PostgreSQL URL \\(invalid port number"),
    ]:
        with pytest.raises(ConfigError, match=message) as raised:
            open_ledger(url)
        assert "a-wrong-password" not in str(raised.value) and "\n" not in str(raised.value)


def test_a_role_without_rights_on_the_tables_is_refused_and_a_password_in_the_url_is_never_shown(postgres, postgres_url):
    init_ledger(postgres_url).close()
    role = postgres.role_with_password("the-right-password")
    url = with_database(postgres_url, database_of(postgres_url), user=role, password="the-right-password")
    with pytest.raises(ConfigError, match="permission denied .*grant this role SELECT, INSERT, UPDATE on edm_spent and "
                                          "edm_rate_limits") as raised:
        open_ledger(url)
    assert "the-right-password" not in str(raised.value)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"GRANT SELECT, INSERT, UPDATE ON edm_spent, edm_rate_limits TO {role}")
    ledger = open_ledger(url)
    assert ledger.charge("alice", 2, 10) == 2 and ledger.admit([Bucket("alice", cost=1, rate=1, burst=1)]) == 0.0
    assert ledger.describe() == f"PostgreSQL {url.replace('the-right-password', '***')}"
    ledger.close()


def test_the_server_refuses_a_bad_ledger_url_with_exit_2_and_one_line_without_the_password(postgres, postgres_url,
                                                                                           tmp_path, checkpoint_factory):
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    add_client(tmp_path / "clients.yaml", "alice", 10)
    role = postgres.role_with_password("the-right-password")
    url = with_database(postgres_url, database_of(postgres_url), user=role, password="a-wrong-password")
    result = subprocess.run(
        [sys.executable, "-m", "edm_lightning.serve", "--victim.checkpoint", checkpoint, "--victim.router", "keyed",
         "--clients_file", str(tmp_path / "clients.yaml"), "--ledger", url, "--port", str(free_port())],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "EDM_ROUTER_KEY": "serving-test-router-key", "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "refused the credentials" in result.stderr and "a-wrong-password" not in result.stderr + result.stdout


@pytest.mark.parametrize("hidden", ["psycopg", "psycopg_pool"])
def test_a_postgresql_ledger_without_its_packages_names_the_extra(hidden, tmp_path):
    code = (f"import sys; sys.modules[{hidden!r}] = None; from edm_lightning.serve.ledger import init_ledger_main; "
            f"init_ledger_main(['--ledger', 'postgresql://edm@127.0.0.1:{free_port()}/ledger'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"needs the {hidden!r} package: pip install 'edm-lightning[serve]'" in result.stderr


@pytest.mark.parametrize("url, password", [
    ("postgresql://edm:pa#ss@db.example/ledger", "pa#ss"),  # libpq reads user:password up to the first "@"
    ("postgresql://edm:Xy?9k@db.example:5432/ledger", "Xy?9k"),
    ("postgresql://edm:p%40q@db.example/ledger", "p%40q"),
    ("postgresql://edm:a/b@db.example/ledger", "a/b"),  # libpq cannot parse it: still never shown
    ("postgresql:///ledger?host=/tmp&password=zz%23", "zz%23"),
])
def test_a_password_is_masked_whatever_characters_it_holds(url, password):
    shown = mask_password(url)
    assert password not in shown and "***" in shown and shown.startswith("postgresql://")
