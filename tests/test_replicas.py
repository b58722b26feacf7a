"""Server replicas on one PostgreSQL ledger, driven as a load balancer's clients drive them: real server processes on
localhost ports, a throw-away PostgreSQL server, every loop bounded in count and time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from edm_lightning.models import EnsembleModule
from edm_lightning.protocol import encode_npy
from edm_lightning.serve import add_client, open_ledger
from edm_lightning.serve.ledger import init_ledger
from tests.helpers.files import save_checkpoint
from tests.helpers.postgres import Postgres, postgres_fixture  # noqa: F401
from tests.helpers.server import Server

BUDGETS = {"race": 200, "load": 1_000_000, "outage": 1000, "limited": 1000}


@dataclass
class Replicas:
    servers: list[Server]
    url: str
    database: str

    def spent(self, client: str) -> int:
        ledger = open_ledger(self.url)
        try:
            return ledger.spent(client)
        finally:
            ledger.close()


def start_replicas(postgres: Postgres, folder: Path, count: int, extra_args: list[str] | None = None) -> Replicas:
    torch.manual_seed(0)
    checkpoint = str(save_checkpoint(EnsembleModule(num_members=3), folder / "edm.ckpt"))
    keys = {name: add_client(folder / "clients.yaml", name, budget) for name, budget in BUDGETS.items()}
    database, url = postgres.new_database()
    init_ledger(url).close()
    servers = [Server(checkpoint, folder, keys, ledger=url, extra_args=extra_args or []) for _ in range(count)]
    starting = [threading.Thread(target=server.start) for server in servers]  # side by side: each loads torch
    for thread in starting:
        thread.start()
    for thread in starting:
        thread.join(timeout=180)
    for server in servers:
        assert server.process is not None and server.process.poll() is None, (folder / "server.log").read_text()[-2000:]
    return Replicas(servers, url, database)


def stop_replicas(replicas: Replicas) -> None:
    for server in replicas.servers:
        if server.process is not None and server.process.poll() is None:
            server.process.terminate()
            server.process.wait(timeout=30)


@pytest.fixture(scope="module")
def replicas(postgres, tmp_path_factory) -> Iterator[Replicas]:
    """2 server processes on one PostgreSQL database, no rate limits."""
    started = start_replicas(postgres, tmp_path_factory.mktemp("replicas"), 2)
    yield started
    stop_replicas(started)


def batch(count: int) -> bytes:
    return encode_npy(torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(count)))


def run_clients(count: int, work) -> None:
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive()


def test_2_replicas_x_8_clients_on_one_key_answer_exactly_the_budget(replicas):
    answered, statuses, refusals = [], [], []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(12):  # 8 x 12 x 7 = 672 asked for, 200 in the budget
            response = replicas.servers[(i + j) % 2].post("race", batch(7))
            with lock:
                statuses.append(response.status_code)
                if response.status_code == 200:
                    answered.append(7)
                else:
                    refusals.append(response.json()["detail"])

    run_clients(8, client)
    assert set(statuses) == {200, 429}
    assert sum(answered) == replicas.spent("race") == 196  # 28 batches of 7 fit in 200, on whichever replica
    assert all("query budget exhausted" in detail for detail in refusals)


def test_a_replica_killed_under_load_and_restarted_loses_nothing_answered(replicas):
    killed, other = replicas.servers
    answered, in_flight, other_statuses, stop = [], [], [], threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        deadline = time.monotonic() + 120
        for j in range(400):
            if stop.is_set() or time.monotonic() > deadline:
                return
            server = replicas.servers[(i + j) % 2]
            try:
                status = server.post("load", batch(8)).status_code
            except httpx.ConnectError:  # the killed replica: nothing was sent
                continue
            except httpx.HTTPError:  # sent, then the replica died: maybe counted, never answered
                with lock:
                    in_flight.append(8)
                continue
            with lock:
                (answered if status == 200 else other_statuses).append(8 if status == 200 else status)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(answered) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.kill()
    at_kill = len(answered)
    while len(answered) < at_kill + 10 and time.monotonic() < deadline:  # the other replica goes on alone
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    assert len(answered) >= at_kill + 10 and other_statuses == []
    spent = replicas.spent("load")
    assert sum(answered) <= spent <= sum(answered) + sum(in_flight)  # nothing answered is lost
    killed.start()
    assert killed.post("load", batch(8)).status_code == 200 and other.post("load", batch(8)).status_code == 200
    assert replicas.spent("load") == spent + 16


def test_the_database_stopped_while_serving_gives_503_then_serves_again_with_exact_counts(postgres, replicas):
    answered = 0
    for server in replicas.servers:
        assert server.post("outage", batch(5)).status_code == 200
        answered += 5
    with postgres.outage(replicas.database):
        for server in replicas.servers:
            for _ in range(2):
                response = server.post("outage", batch(5))
                assert response.status_code == 503 and response.headers.get("retry-after"), response.text
                assert "postgresql://" not in response.text  # the database's address stays in the server's log
    for server in replicas.servers:  # back: each replica reconnects by itself
        deadline, response = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            response = server.post("outage", batch(5))
            if response.status_code != 503:
                break
            time.sleep(0.3)
        assert response.status_code == 200, response.text
        answered += 5
    assert replicas.spent("outage") == answered  # nothing answered uncounted, nothing counted while it was away


def test_a_rate_limit_is_shared_by_the_replicas(postgres, tmp_path):
    """4 requests/s with a burst of 4 for the key over both replicas together; apart, each would admit as many."""
    limited = start_replicas(postgres, tmp_path, 2, ["--client_rate_limit.requests_per_s", "4",
                                                     "--client_rate_limit.request_burst", "4"])
    admitted, refused = [], []
    lock = threading.Lock()
    try:
        started = time.monotonic()

        def client(i: int) -> None:
            for j in range(60):
                if time.monotonic() - started > 3:
                    return
                response = limited.servers[(i + j) % 2].post("limited", batch(1))
                with lock:
                    (admitted if response.status_code == 200 else refused).append(response)
                time.sleep(0.02)

        run_clients(4, client)
        elapsed = time.monotonic() - started
    finally:
        stop_replicas(limited)
    assert all(r.status_code == 429 and int(r.headers["retry-after"]) >= 1 for r in refused) and refused
    assert 4 <= len(admitted) <= 4 + 4 * elapsed + 1  # apart, two replicas would admit about twice that
    assert limited.spent("limited") == len(admitted)
