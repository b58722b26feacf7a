"""The prediction API, driven as clients drive it: a real server in a subprocess on a free localhost port."""

from __future__ import annotations

import functools
import io
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from edm_lightning.attacks import RemoteVictimConfig, run_knockoff
from edm_lightning.attacks.transfer_set import TransferSet
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.models import EnsembleModule
from edm_lightning.protocol import NPY, encode_npy
from edm_lightning.serve import BudgetExhausted, SqliteLedger, add_client, load_clients
from edm_lightning.serve.__main__ import main as serve_main
from tests.helpers.server import ROUTER_KEY, Server


@pytest.fixture
def server(tmp_path, checkpoint_factory):
    torch.manual_seed(0)
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    keys = {name: add_client(tmp_path / "clients.yaml", name, budget) for name, budget in (("alice", 1000), ("bob", 100))}
    running = Server(checkpoint, tmp_path, keys)
    running.start()
    yield running
    if running.process.poll() is None:
        running.process.terminate()
        running.process.wait(timeout=30)


def png(pixels: torch.Tensor) -> bytes:
    """An 8-bit grey PNG of ``pixels`` (1, H, W) uint8."""
    buffer = io.BytesIO()
    Image.fromarray(pixels[0].numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_answers_equal_the_in_process_victims_for_every_content_type(server):
    victim = VictimConfig(server.checkpoint, router="keyed", key=ROUTER_KEY).build()
    x = images(40)
    raw = server.post("alice", encode_npy(x)).json()["probabilities"]
    # every number is a float32 exactly (JSON loses nothing of it) ...
    assert torch.equal(torch.tensor(raw, dtype=torch.float64), torch.tensor(raw, dtype=torch.float32).double())
    # ... and the in-process victim's answer: the server's process runs the members with its own threads, so on some
    # CPUs the last bit differs; another member's answer would differ by orders of magnitude more
    same = functools.partial(torch.testing.assert_close, rtol=0, atol=1e-6)
    same(torch.tensor(raw), victim(x))
    assert len(victim.router(x).unique()) == 3  # all three members answered some of them
    as_json = server.post("alice", content_type="application/json", json={"inputs": x[:3].tolist()})
    same(torch.tensor(as_json.json()["probabilities"]), victim(x[:3]))
    pixels = (x[0] * 255).round().to(torch.uint8)
    as_png = server.post("alice", png(pixels), content_type="image/png")
    same(torch.tensor(as_png.json()["probabilities"]), victim(pixels[None].float() / 255))
    assert server.spent("alice") == 40 + 3 + 1


def test_budgets_are_per_key_and_an_over_budget_batch_is_refused_whole(server):
    assert server.post("bob", encode_npy(images(60))).json()["queries_spent"] == 60
    refused = server.post("bob", encode_npy(images(41)))
    assert refused.status_code == 429 and "60 of 100 queries spent" in refused.json()["detail"]
    assert server.spent("bob") == 60  # nothing of the refused batch was counted
    assert server.post("bob", encode_npy(images(40))).status_code == 200 and server.spent("bob") == 100
    assert server.post("alice", encode_npy(images(5))).status_code == 200 and server.spent("alice") == 5


def bad_requests():
    pickled = np.empty(2, dtype=object)
    buffer = io.BytesIO()
    np.save(buffer, pickled, allow_pickle=True)
    nan = images(2)
    nan[1, 0, 0, 0] = float("nan")
    return [
        ("wrong shape", encode_npy(torch.rand(2, 3, 28, 28)), NPY, 422, "channel"),
        ("NaN", encode_npy(nan), NPY, 422, "NaN"),
        ("out of range", encode_npy(images(2) * 3), NPY, 422, "must lie in [0.0, 1.0]"),
        ("integers", encode_npy(torch.zeros(2, 1, 28, 28, dtype=torch.int64)), NPY, 422, "floating point"),
        ("empty body", b"", NPY, 400, "empty request body"),
        ("not npy", b"\x93NUMPY garbage", NPY, 400, "not a readable .npy"),
        ("pickled objects", buffer.getvalue(), NPY, 400, "not a readable .npy"),
        ("bad json", b'{"inputs": [[1, 2], [3]]', "application/json", 400, "malformed application/json"),
        ("json without inputs", b'{"x": 1}', "application/json", 400, '{"inputs"'),
        ("unsupported type", b"hello", "text/plain", 415, "unsupported content type"),
        ("png of another size", png(torch.zeros(1, 4000, 4000, dtype=torch.uint8)), "image/png", 400,
         "the image is 4000x4000 pixels; the model takes 28x28"),
        ("not a png", b"GIF89a....", "image/png", 400, "not a PNG file"),
        ("too many rows", encode_npy(images(65)), NPY, 413, "over the limit of 64"),
        ("oversize body", b"\x00" * (2 << 20), NPY, 413, "over the limit of 1048576 bytes"),
        ("50 MB body", b"\x00" * (50 << 20), NPY, 413, "over the limit of 1048576 bytes"),
        ("empty batch", encode_npy(torch.zeros(0, 1, 28, 28)), NPY, 422, "empty batch"),
    ]


def test_bad_requests_get_a_4xx_with_a_message_count_nothing_and_the_server_keeps_serving(server):
    for name, body, content_type, status, message in bad_requests():
        response = server.post("alice", body, content_type)
        assert response.status_code == status and message in response.json()["detail"], (name, response.text)
    assert server.post(None, encode_npy(images(1))).status_code == 401
    server.keys["mallory"] = "not-a-key"
    assert server.post("mallory", encode_npy(images(1))).json()["detail"] == "unknown API key"
    assert server.spent("alice") == 0
    assert server.post("alice", encode_npy(images(3))).status_code == 200


def test_concurrent_clients_never_spend_past_a_budget(server):
    answered, statuses = [], []

    def client():
        for _ in range(4):
            response = server.post("bob", encode_npy(images(7)))
            statuses.append(response.status_code)
            if response.status_code == 200:
                answered.append(7)

    threads = [threading.Thread(target=client) for _ in range(8)]  # 8 x 4 x 7 = 224 asked, budget 100
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) == {200, 429}
    assert sum(answered) == server.spent("bob") == 98  # 14 batches of 7 fit in 100


def test_counts_survive_sigkill_under_load_and_a_restart(server):
    answered, stop, clients = [], threading.Event(), 4

    def client():
        while not stop.is_set():
            try:
                if server.post("alice", encode_npy(images(8))).status_code == 200:
                    answered.append(8)
            except httpx.HTTPError:
                return  # the server died mid-request: that client's batch was in flight

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    while len(answered) < 10:
        time.sleep(0.05)
    server.kill()
    stop.set()
    for thread in threads:
        thread.join()
    server.start()
    spent = server.spent("alice")
    # Nothing answered is lost; counted but unanswered: at most the batches in flight, one per client.
    assert sum(answered) <= spent <= sum(answered) + clients * 8


def test_ledger_charges_atomically_and_persists(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.sqlite")
    assert ledger.charge("a", 60, budget=100) == 60
    with pytest.raises(BudgetExhausted, match="60 of 100 queries spent, this batch of 41"):
        ledger.charge("a", 41, budget=100)
    ledger.refund("a", 10)
    assert SqliteLedger(tmp_path / "ledger.sqlite").spent("a") == 50 and ledger.spent("b") == 0


def test_clients_file_holds_digests_only_and_refuses_bad_entries(tmp_path):
    path = tmp_path / "clients.yaml"
    key = add_client(path, "alice", 10)
    assert key not in path.read_text() and list(load_clients(path).values())[0].budget == 10
    with pytest.raises(ConfigError, match="already in"):
        add_client(path, "alice", 5)
    path.write_text("clients:\n  - {name: eve, key_sha256: plaintext-key, budget: 5}\n")
    with pytest.raises(ConfigError, match="64 hex digits"):
        load_clients(path)
    with pytest.raises(ConfigError, match="add-client"):
        load_clients(tmp_path / "missing.yaml")
    fresh = tmp_path / "fresh.yaml"
    for name, budget in (("a b", 5), ("", 5), ("bob", -1), ("bob", True)):
        with pytest.raises(ConfigError):
            add_client(fresh, name, budget)
    assert not fresh.exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="is a folder, not a clients file"):
        add_client(tmp_path, "bob", 5)


def test_the_server_refuses_bad_settings_before_listening(tmp_path, checkpoint_factory, capsys, monkeypatch):
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--victim.checkpoint", checkpoint, "--clients_file", str(tmp_path / "none.yaml")])
    assert exit_info.value.code == 2 and "add-client" in capsys.readouterr().err
    monkeypatch.delenv("EDM_ROUTER_KEY", raising=False)
    monkeypatch.delenv("EDM_ROUTER_KEY_FILE", raising=False)
    add_client(tmp_path / "clients.yaml", "alice", 10)
    for router in ("keyed", "coarse"):
        with pytest.raises(SystemExit) as exit_info:
            serve_main(["--victim.checkpoint", checkpoint, "--victim.router", router,
                        "--clients_file", str(tmp_path / "clients.yaml")])
        assert exit_info.value.code == 2 and "public default key" in capsys.readouterr().err


@pytest.mark.integration
def test_knockoff_through_the_api_buys_the_same_transfer_set_as_in_process(server, real_data_root, tmp_path):
    common = dict(budget=256, max_epochs=1, batch_size=64, root=str(real_data_root), test_size=200, seed=3)
    remote = run_knockoff(RemoteVictimConfig(server.url, api_key=server.keys["alice"]), cache_dir=str(tmp_path / "remote"),
                          **common)
    local = run_knockoff(VictimConfig(server.checkpoint, router="keyed", key=ROUTER_KEY), cache_dir=str(tmp_path / "local"),
                         **common)
    assert remote["queries"] == local["queries"] == 256
    sets = [TransferSet.load(next((tmp_path / where).rglob("*.pt"))) for where in ("remote", "local")]
    assert torch.equal(sets[0].indices, sets[1].indices)  # the same images bought, in the same order
    torch.testing.assert_close(sets[0].answers, sets[1].answers, rtol=0, atol=1e-6)  # float rounding of another process
    assert server.spent("alice") == 256 + 200  # the queries, and the experimenter's labels of 200 test images
