"""The prediction API as operators run it: rate limits with Retry-After, Prometheus metrics, the audit log, the
clients file managed while the server runs, and the client that waits out a rate limit."""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edm_lightning.attacks.remote import RemoteError, RemoteVictim
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.files import write_atomic
from edm_lightning.models import EnsembleModule
from edm_lightning.protocol import NPY, decode_npy, encode_npy
from edm_lightning.serve import LedgerUnavailable, SqliteLedger, add_client, key_digest
from edm_lightning.serve.__main__ import ServeConfig, build_app
from edm_lightning.serve.__main__ import main as serve_main
from edm_lightning.serve.app import create_app
from edm_lightning.serve.clients import LiveClients
from edm_lightning.serve.operations import AuditLog
from edm_lightning.serve.rates import RateLimit, RateLimits
from tests.helpers.server import Server

with warnings.catch_warnings():  # Starlette's test client asks for httpx2 by a warning; httpx serves it as well
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

ROUTER_KEY = "3f0c9a51d27e48b6a1c5e09f7d3b2a86"
METRICS_TOKEN = "9b1f0e7c2d4a6b8e0f1a3c5e7d9b2f4a"
AUDIT_FIELDS = {"time", "client", "rows", "status", "latency_ms", "replica", "pid"}


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def never_listen(monkeypatch):
    """An in-process server that got past its checks returns at once instead of listening (its log says so)."""
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: print("LISTENING", file=sys.stderr))


@pytest.fixture
def checkpoint(checkpoint_factory):
    torch.manual_seed(0)
    return checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")


@pytest.fixture
def keys(tmp_path):
    return {name: add_client(tmp_path / "clients.yaml", name, budget) for name, budget in (("alice", 1000), ("bob", 100))}


def app_of(checkpoint: str, folder: Path, **settings):
    """The API in this process, as ``python -m edm_lightning.serve`` would build it (router key in the config)."""
    return build_app(ServeConfig(VictimConfig(checkpoint, router="keyed", key=ROUTER_KEY),
                                 clients_file=str(folder / "clients.yaml"), ledger=str(folder / "ledger.sqlite"),
                                 max_batch=64, **settings))


def post(http, key: str | None, x: torch.Tensor):
    return http.post("/v1/predict", content=encode_npy(x),
                     headers={"content-type": NPY} | ({"X-API-Key": key} if key else {}))


def scrape(http, **headers) -> dict[tuple[str, tuple], float]:
    """``/metrics`` as ``{(sample name, sorted labels): value}``."""
    response = http.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


# ---------------------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("options, message", [
    (["--client_rate_limit.requests_per_s", "0"], "client_rate_limit.requests_per_s must be a number > 0"),
    (["--client_rate_limit.images_per_s", "-5"], "client_rate_limit.images_per_s must be a number > 0"),
    (["--global_rate_limit.requests_per_s", "10", "--global_rate_limit.request_burst", "0"],
     "global_rate_limit.request_burst must be a number > 0"),
    (["--global_rate_limit.images_per_s", ".inf"], "global_rate_limit.images_per_s must be a number > 0 \\(null: no limit"),
    (["--client_rate_limit.requests_per_s", "2", "--client_rate_limit.request_burst", "0.5"],
     "request_burst must be >= 1 \\(a request takes 1\\)"),
    (["--client_rate_limit.image_burst", "100"], "client_rate_limit.image_burst is set but client_rate_limit.images_per_s"),
    (["--global_rate_limit.images_per_s", "100", "--global_rate_limit.image_burst", "0.5"],
     "global_rate_limit.image_burst must be >= 1 \\(a batch holds at least 1 image\\)"),
    (["--audit_log", "/proc/no-such-folder/audit.jsonl"], "the audit log '/proc/no-such-folder/audit.jsonl' cannot be "
                                                         "opened for appending"),
])
def test_bad_operations_settings_end_the_start_up_with_one_line_and_exit_2(options, message, tmp_path, checkpoint, keys,
                                                                         capsys, never_listen, monkeypatch):
    import re

    monkeypatch.setenv("EDM_ROUTER_KEY", ROUTER_KEY)
    monkeypatch.delenv("EDM_METRICS_TOKEN", raising=False)
    monkeypatch.delenv("EDM_METRICS_TOKEN_FILE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--victim.checkpoint", checkpoint, "--victim.router", "keyed", "--clients_file",
                    str(tmp_path / "clients.yaml"), "--ledger", str(tmp_path / "ledger.sqlite"), *options])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


ELSEWHERE, HERE = ("192.0.2.7", 40000), ("127.0.0.1", 40000)  # a scraper's address: another machine, this one


def test_metrics_are_this_machines_and_elsewhere_need_their_token(tmp_path, checkpoint, keys, monkeypatch):
    monkeypatch.delenv("EDM_METRICS_TOKEN_FILE", raising=False)
    monkeypatch.setenv("EDM_METRICS_TOKEN", "too-short")
    with pytest.raises(ConfigError, match="the metrics token in \\$EDM_METRICS_TOKEN is 9 characters, under 16"):
        app_of(checkpoint, tmp_path)
    monkeypatch.delenv("EDM_METRICS_TOKEN")
    app = app_of(checkpoint, tmp_path, host="0.0.0.0")
    with TestClient(app, client=ELSEWHERE) as elsewhere, TestClient(app, client=HERE) as here:
        refused = elsewhere.get("/metrics", headers={"X-API-Key": keys["alice"]})
        assert refused.status_code == 403 and "EDM_METRICS_TOKEN" in refused.json()["detail"]
        assert "edm_api_budget_left_queries" in here.get("/metrics").text
    monkeypatch.setenv("EDM_METRICS_TOKEN", METRICS_TOKEN)
    with TestClient(app_of(checkpoint, tmp_path, host="0.0.0.0"), client=ELSEWHERE) as http:
        assert post(http, keys["alice"], images(2)).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"},
                        {"Authorization": f"Bearer {keys['alice']}"}, {"X-API-Key": keys["alice"]}):
            refused = http.get("/metrics", headers=headers)  # a client's key is not the metrics token
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", headers
        assert scrape(http, Authorization=f"Bearer {METRICS_TOKEN}")[("edm_api_images_charged_total", ())] == 2
    with TestClient(app_of(checkpoint, tmp_path, metrics=False), client=HERE) as http:
        assert http.get("/metrics").status_code == 404 and post(http, keys["alice"], images(1)).status_code == 200


# ---------------------------------------------------------------------------------------------------------- metrics
def test_metrics_count_statuses_images_latency_and_each_configured_clients_budget_left(tmp_path, checkpoint, keys):
    with TestClient(app_of(checkpoint, tmp_path), client=HERE) as http:
        assert post(http, keys["alice"], images(5)).status_code == 200
        assert post(http, keys["alice"], images(3)).status_code == 200
        assert post(http, keys["bob"], images(101)).status_code == 413  # over max_batch
        assert post(http, keys["bob"], images(60)).status_code == 200
        assert post(http, keys["bob"], images(41)).status_code == 429  # over the budget
        unknown = "an-attacker-key-that-must-not-become-a-label"
        for _ in range(20):
            assert post(http, unknown, images(1)).status_code == 401
        assert http.get("/no-such-path").status_code == 404
        text = http.get("/metrics").text
        metrics = scrape(http)
    requests = {dict(labels)["status"]: value for (name, labels), value in metrics.items()
                if name == "edm_api_requests_total" and dict(labels)["path"] == "/v1/predict"}
    assert requests == {"200": 3, "413": 1, "429": 1, "401": 20}
    assert metrics[("edm_api_requests_total", (("path", "other"), ("status", "404")))] == 1  # unknown paths pooled
    assert metrics[("edm_api_images_charged_total", ())] == 5 + 3 + 60
    assert metrics[("edm_api_request_seconds_count", (("path", "/v1/predict"),))] == 25
    assert metrics[("edm_api_refusals_total", (("reason", "budget"),))] == 1
    assert metrics[("edm_api_refusals_total", (("reason", "rate"),))] == 0
    left = {dict(labels)["client"]: value for (name, labels), value in metrics.items()
            if name == "edm_api_budget_left_queries"}
    assert left == {"alice": 1000 - 8, "bob": 100 - 60} and metrics[("edm_api_ledger_up", ())] == 1
    clients = {value for (_, labels) in metrics for key, value in labels if key == "client"}
    assert clients == {"alice", "bob"}  # the clients file's names only: an unknown key makes no label
    for secret in (unknown, keys["alice"], keys["bob"], key_digest(keys["alice"])):
        assert secret not in text


def test_a_client_removed_from_the_file_leaves_the_metrics_and_a_new_one_joins(tmp_path, checkpoint, keys):
    app = app_of(checkpoint, tmp_path)
    with TestClient(app, client=HERE) as http:
        entries = yaml.safe_load((tmp_path / "clients.yaml").read_text())["clients"]
        write_atomic(tmp_path / "clients.yaml", yaml.safe_dump({"clients": entries[:1]}))  # bob revoked
        add_client(tmp_path / "clients.yaml", "carol", 7)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            clients = {dict(labels)["client"] for (name, labels) in scrape(http) if name == "edm_api_budget_queries"}
            if clients == {"alice", "carol"}:
                break
            time.sleep(0.1)
        assert clients == {"alice", "carol"}


# ---------------------------------------------------------------------------------------------------------- audit log
def test_the_audit_log_has_a_line_per_prediction_and_never_a_key_an_image_or_an_answer(tmp_path, checkpoint, keys):
    log = tmp_path / "audit" / "audit.jsonl"
    pixels = torch.full((3, 1, 28, 28), 0.123456789)
    with TestClient(app_of(checkpoint, tmp_path, audit_log=str(log)), client=HERE) as http:
        answered = post(http, keys["alice"], pixels)
        assert answered.status_code == 200
        assert post(http, "a-stolen-or-guessed-key", images(2)).status_code == 401
        assert post(http, keys["bob"], torch.full((2, 1, 28, 28), 7.0)).status_code == 422  # out of range
        assert http.get("/v1/usage", headers={"X-API-Key": keys["alice"]}).status_code == 200  # not a prediction
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(line["client"], line["rows"], line["status"]) for line in lines] == \
        [("alice", 3, 200), (None, None, 401), ("bob", 2, 422)]
    for line in lines:
        assert set(line) == AUDIT_FIELDS and line["latency_ms"] > 0 and line["pid"] == os.getpid()
        assert line["replica"].endswith(":8000") and line["time"].endswith("+00:00")
    for secret in ("a-stolen-or-guessed-key", keys["alice"], keys["bob"], key_digest(keys["alice"]), "0.12345",
                   "probabilities", str(answered.json()["probabilities"][0][0])[:8]):
        assert secret not in text, secret
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_replicas_sharing_an_audit_log_never_interleave_their_lines(tmp_path):
    path, per_writer = tmp_path / "audit.jsonl", 400
    writers = [AuditLog(path, f"host:{8000 + i}") for i in range(4)]

    def write(log: AuditLog) -> None:
        for row in range(per_writer):
            log.write("alice", row, 200, 0.001)

    threads = [threading.Thread(target=write, args=(log,)) for log in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole
    assert len(lines) == 4 * per_writer
    assert all(sorted(line["rows"] for line in lines if line["replica"] == f"host:{8000 + i}") == list(range(per_writer))
               for i in range(4))
    for log in writers:
        log.close()


# ---------------------------------------------------------------------------------------------------------- rates
def test_a_global_rate_limit_is_shared_by_every_client_and_a_batch_over_a_burst_is_refused_by_name(
        tmp_path, checkpoint, keys):
    app = app_of(checkpoint, tmp_path, global_rate_limit=RateLimit(requests_per_s=0.2, request_burst=2),
                 client_rate_limit=RateLimit(images_per_s=100, image_burst=32))
    with TestClient(app, client=HERE) as http:
        info = http.get("/v1/info", headers={"X-API-Key": keys["alice"]}).json()
        assert info["max_batch"] == 32  # clients split their batches to what can pass
        too_big = post(http, keys["alice"], images(40))
        assert too_big.status_code == 413 and "image burst of 32 (client_rate_limit.image_burst)" in too_big.json()["detail"]
        assert post(http, keys["alice"], images(4)).status_code == 200
        assert post(http, keys["bob"], images(4)).status_code == 200
        refused = post(http, keys["bob"], images(4))  # the third request of all clients together
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) == 5
        assert "the rate, not the query budget: nothing was counted" in refused.json()["detail"]
        usage = http.get("/v1/usage", headers={"X-API-Key": keys["bob"]}).json()
        assert usage["queries_spent"] == 4  # the refused batch counted nothing
        assert scrape(http)[("edm_api_refusals_total", (("reason", "rate"),))] == 1


class Unavailable:
    """A ledger whose database is gone for ``broken`` calls of ``what``, then back."""

    def __init__(self, ledger, what: set[str]):
        self.ledger, self.what, self.broken = ledger, what, False

    def __getattr__(self, name):
        method = getattr(self.ledger, name)
        if name not in self.what:
            return method

        def call(*args, **kwargs):
            if self.broken:
                raise LedgerUnavailable("the database went away")
            return method(*args, **kwargs)

        return call


@pytest.mark.parametrize("what", ["admit", "charge", "spent_by_client"])
def test_a_ledger_gone_away_gets_503_with_retry_after_answers_nothing_and_recovers(what, tmp_path, checkpoint, keys):
    victim = VictimConfig(checkpoint, router="keyed", key=ROUTER_KEY).build()
    calls = []
    victim.forward = lambda x, real=victim.forward: calls.append(len(x)) or real(x)
    ledger = Unavailable(SqliteLedger(tmp_path / "ledger.sqlite"), {what})
    limits = RateLimits.from_config(RateLimit(requests_per_s=100), RateLimit(), max_batch=64)
    app = create_app(victim, LiveClients(tmp_path / "clients.yaml"), ledger, model_id="test", rate_limits=limits)
    with TestClient(app, client=HERE) as http:
        ledger.broken = True
        if what == "spent_by_client":  # a scrape reports the ledger down instead of failing
            assert scrape(http)[("edm_api_ledger_up", ())] == 0
            return
        refused = post(http, keys["alice"], images(3))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "nothing was answered or counted" in refused.json()["detail"] and "probabilities" not in refused.json()
        assert calls == []  # the model never saw the batch
        ledger.broken = False
        assert post(http, keys["alice"], images(3)).status_code == 200 and calls == [3]
        assert http.get("/v1/usage", headers={"X-API-Key": keys["alice"]}).json()["queries_spent"] == 3
        assert scrape(http)[("edm_api_refusals_total", (("reason", "ledger_unavailable"),))] == 1


def test_a_client_over_its_rate_is_slowed_to_it_and_another_client_keeps_its_latency(tmp_path, checkpoint):
    """A (3 threads) asks as fast as it may, honouring Retry-After; B asks under the rate meanwhile, as it did alone."""
    rate, burst, window = 4.0, 4, 6.0
    keys = {name: add_client(tmp_path / "clients.yaml", name, 10_000) for name in ("alice", "bob")}
    server = Server(checkpoint, tmp_path, keys, extra_args=["--client_rate_limit.requests_per_s", str(rate),
                                                            "--client_rate_limit.request_burst", str(burst)])
    server.start()
    body = encode_npy(images(8))
    accepted, stop = [], threading.Event()

    def honouring() -> None:  # A: at most 200 tries, each waiting what Retry-After says
        for _ in range(200):
            if stop.is_set():
                return
            response = server.post("alice", body)
            if response.status_code == 200:
                accepted.append(time.monotonic())
            else:
                assert response.status_code == 429, response.text
                stop.wait(int(response.headers["retry-after"]))

    threads = [threading.Thread(target=honouring) for _ in range(3)]

    def paced_latencies(count: int) -> list[float]:  # B: one request every 0.3 s, under its rate of 4/s
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            response = server.post("bob", body)
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text  # another key's rate never refuses B
            time.sleep(max(0.3 - latencies[-1], 0))
        return latencies

    try:
        solo = statistics.median(paced_latencies(12))
        start = time.monotonic()
        rushed = [server.post("alice", body) for _ in range(12)]  # A ignoring the limit: refused, nothing counted
        answered = sum(response.status_code == 200 for response in rushed)
        assert answered <= burst + rate * (time.monotonic() - start)
        refused = [response for response in rushed if response.status_code == 429]
        assert refused and all(int(response.headers["retry-after"]) >= 1 for response in refused)
        assert all("the rate, not the query budget" in response.json()["detail"] for response in refused)
        assert server.spent("alice") == 8 * answered
        begin = time.monotonic()
        for thread in threads:
            thread.start()
        loaded = paced_latencies(int(window / 0.3))
        elapsed = time.monotonic() - begin
    finally:
        stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=60)
        server.process.terminate()
        server.process.wait(timeout=30)
    assert rate * elapsed / 4 <= len(accepted) <= rate * elapsed + burst  # slowed to its rate, not shut out
    assert statistics.median(loaded) <= 5 * solo + 0.25, (solo, statistics.median(loaded))


# ---------------------------------------------------------------------------------------------------------- live clients
def first_time(condition, within_s: float = 10.0) -> float:
    """Seconds until ``condition()`` first holds (polled every 20 ms, at most ``within_s``), or ``inf``."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if condition():
            return time.monotonic() - start
        time.sleep(0.02)
    return float("inf")


def usage(server: Server, name: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/usage", headers={"X-API-Key": server.keys[name]}, timeout=30)


@pytest.fixture
def server(tmp_path, checkpoint, keys):
    running = Server(checkpoint, tmp_path, keys)
    running.start()
    yield running
    running.process.terminate()
    running.process.wait(timeout=30)


def test_clients_added_revoked_and_rebudgeted_while_serving_count_within_a_second(server, tmp_path):
    path = tmp_path / "clients.yaml"
    server.keys["carol"] = add_client(path, "carol", 7)  # as the operator adds one: `add-client` on the live file
    assert first_time(lambda: usage(server, "carol").status_code == 200) <= 1.0
    assert server.post("carol", encode_npy(images(7))).status_code == 200
    entries = yaml.safe_load(path.read_text())["clients"]
    write_atomic(path, yaml.safe_dump({"clients": [e for e in entries if e["name"] != "bob"]}))  # bob's key revoked
    assert first_time(lambda: usage(server, "bob").status_code == 401) <= 1.0
    assert server.post("bob", encode_npy(images(1))).json()["detail"] == "unknown API key"
    assert server.post("alice", encode_npy(images(5))).status_code == 200
    entries = [dict(e, budget=8) if e["name"] == "alice" else e for e in entries if e["name"] != "bob"]
    write_atomic(path, yaml.safe_dump({"clients": entries}))  # alice's budget cut to 8 (5 spent)
    assert first_time(lambda: usage(server, "alice").json()["budget"] == 8) <= 1.0
    over = server.post("alice", encode_npy(images(4)))
    assert over.status_code == 429 and "5 of 8 queries spent" in over.json()["detail"] and "retry-after" not in over.headers
    scraped = httpx.get(f"{server.url}/metrics", timeout=30).text  # from this machine: no token needed
    assert 'edm_api_budget_left_queries{client="carol"} 0.0' in scraped and 'client="bob"' not in scraped


def test_sighup_rereads_the_clients_file_and_a_change_that_does_not_parse_is_refused_with_one_line(server, tmp_path):
    path = tmp_path / "clients.yaml"
    before = path.stat()
    text = path.read_text()
    assert "budget: 1000" in text
    with open(path, "r+") as file:  # an edit the watcher cannot see: same file, size and modification time
        file.write(text.replace("budget: 1000", "budget: 2000"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(1.0)
    assert usage(server, "alice").json()["budget"] == 1000
    server.process.send_signal(signal.SIGHUP)
    assert first_time(lambda: usage(server, "alice").json()["budget"] == 2000) <= 1.0

    path.write_text(text.replace("budget: 100\n", "budget: a hundred\n"))  # a typo in place
    time.sleep(1.5)  # three checks of the file
    assert usage(server, "bob").json()["budget"] == 100 and usage(server, "alice").json()["budget"] == 2000
    assert server.post("bob", encode_npy(images(2))).status_code == 200  # still serving the last good clients
    log = (tmp_path / "server.log").read_text()
    refused = [line for line in log.splitlines() if "clients file change refused" in line]
    assert len(refused) == 1 and "budget must be a whole number" in refused[0] and refused[0].startswith("ERROR"), log
    for key in server.keys.values():
        assert key not in log and key_digest(key) not in log
    write_atomic(path, text.replace("budget: 100\n", "budget: 50\n"))  # fixed: taken at once
    assert first_time(lambda: usage(server, "bob").json()["budget"] == 50) <= 1.0


# ---------------------------------------------------------------------------------------------------------- the client
class Refusing:
    """A prediction API answering ``/v1/predict`` with ``refusals`` (status, headers) first, then answers."""

    def __init__(self, *refusals: tuple[int, dict[str, str]]):
        self.refusals, self.asked = list(refusals), 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/info":
            return httpx.Response(200, json={"input_shape": [1, 28, 28], "num_classes": 10, "answer": "probabilities",
                                             "max_batch": 10, "max_body_bytes": 8 << 20, "model_id": "fake"})
        self.asked += 1
        if self.refusals:
            status, headers = self.refusals.pop(0)
            return httpx.Response(status, headers=headers, json={"detail": f"refused with {status}"})
        rows = len(decode_npy(request.content))
        return httpx.Response(200, json={"probabilities": [[0.1] * 10] * rows})


@pytest.fixture
def refusing(monkeypatch):
    """``refusing(*refusals, max_wait_s=...)``: a RemoteVictim of a :class:`Refusing` API, and the waits it slept."""
    import edm_lightning.attacks.remote as remote

    real, slept = httpx.Client, []
    monkeypatch.setattr(remote.time, "sleep", slept.append)

    def connect(*refusals, max_wait_s: float = 60.0) -> tuple[Refusing, RemoteVictim, list[float]]:
        api = Refusing(*refusals)
        slept.clear()
        monkeypatch.setattr(httpx, "Client", lambda **kwargs: real(transport=httpx.MockTransport(api), **kwargs))
        return api, RemoteVictim("http://api.test", "a-key", max_wait_s=max_wait_s), slept

    return connect


def test_the_client_waits_out_a_rate_limit_and_an_unavailable_ledger_and_never_a_spent_budget(refusing):
    api, victim, slept = refusing((429, {"Retry-After": "3"}), (503, {}), (503, {"Retry-After": "2"}),
                                  (429, {"Retry-After": "0"}))
    assert victim(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    assert slept == [3.0, 1.0, 2.0, 1.0] and api.asked == 5  # a 503 without Retry-After, and a 0, wait 1 s

    api, victim, slept = refusing((429, {}))  # the budget: no Retry-After, raised at once
    with pytest.raises(RemoteError, match="429: refused with 429") as raised:
        victim(torch.rand(4, 1, 28, 28))
    assert slept == [] and api.asked == 1 and raised.value.unsure == 0

    api, victim, slept = refusing(*[(429, {"Retry-After": "5"})] * 10, max_wait_s=12)
    with pytest.raises(RemoteError, match="still refused after waiting 10 s in all; max_wait_s is 12"):
        victim(torch.rand(4, 1, 28, 28))
    assert slept == [5.0, 5.0] and api.asked == 3
