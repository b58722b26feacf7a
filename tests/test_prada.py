"""PRADA (Juuti et al. 2019): its statistic on toy streams, its batches against the paper's one-query-at-a-time
algorithm, its state kept on disk, and the victim it watches (misinformation or refusal once a client is flagged)."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from edm_lightning.defense.detectors import (
    ClientHistory,
    ClientRefused,
    ClientWatch,
    DetectorConfig,
    DetectorStore,
    MonitoredVictim,
    Prada,
    as_bytes,
    benign_clients,
    misinform,
)
from edm_lightning.errors import ConfigError
from edm_lightning.experiment import DetectorSetup, ExperimentConfig, run_experiment
from tests.helpers.experiment import tiny_config
from tests.helpers.victims import linear_victim

SETTINGS = Prada(delta=0.9)


def natural_stream(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """i.i.d. images (8x8, one grey level each pixel uniform) and 4 classes: what an honest client sends."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 64), generator=g, dtype=torch.uint8), torch.randint(0, 4, (n,), generator=g)


def jacobian_stream(n: int, seeds: int = 10, step: int = 26, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """JBDA's shape of stream: a few seed images, then each earlier point moved by one small sign step."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randint(40, 216, (seeds, 64), generator=g)
    while len(points) < n:
        signs = torch.randint(0, 2, points.shape, generator=g) * 2 - 1
        points = torch.cat([points, (points + step * signs).clamp(0, 255)])
    points = points[:n]
    return points.to(torch.uint8), torch.arange(n) % 4


def observe_all(history: ClientHistory, images: torch.Tensor, classes: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([history.observe(images[i:i + batch], classes[i:i + batch])[0] for i in range(0, len(images), batch)])


def paper_algorithm(images: torch.Tensor, classes: torch.Tensor, settings: Prada) -> tuple[int | None, float | None]:
    """Algorithm 1 of the paper, one query at a time, as its authors' code runs it (flag kept once raised)."""
    growing, growing_d, threshold, distances = {}, {}, {}, {}
    w = None
    x = images.double().numpy() / 255
    for q, (image, c) in enumerate(zip(x, classes.tolist())):
        if c not in growing:
            growing[c], growing_d[c], threshold[c] = [image], [0.0], 0.0
        else:
            d = min(float(np.linalg.norm(image - y)) for y in growing[c])
            distances.setdefault(c, []).append(d)
            if d > threshold[c]:
                growing[c].append(image)
                growing_d[c].append(d)
                threshold[c] = max(threshold[c], float(np.mean(growing_d[c]) - np.std(growing_d[c])))
        if q % settings.test_every == 0:
            pooled = np.asarray([d for ds in distances.values() if len(ds) >= settings.min_per_class for d in ds])
            if len(pooled):
                pooled = pooled[np.abs(pooled - pooled.mean()) < settings.outlier_std * pooled.std()]
            if len(pooled) > settings.min_distances:
                w = float(stats.shapiro(pooled).statistic)
                if w < settings.delta:
                    return q + 1, w
    return None, w


def test_a_client_stepping_from_a_few_points_is_flagged_and_an_honest_one_is_not():
    attacker = ClientHistory(SETTINGS)
    flags = observe_all(attacker, *jacobian_stream(2000), batch=64)
    assert attacker.flagged and attacker.flagged_at < 1000 and attacker.last_w < SETTINGS.delta
    assert not flags[:attacker.flagged_at - 1].any() and flags[attacker.flagged_at - 1:].all()
    honest = ClientHistory(SETTINGS)
    assert not observe_all(honest, *natural_stream(2000), batch=64).any()
    assert not honest.flagged and honest.last_w > 0.95


@pytest.mark.parametrize("stream", [jacobian_stream, natural_stream])
def test_batches_decide_exactly_as_the_paper_one_query_at_a_time(stream):
    images, classes = stream(700)
    expected = paper_algorithm(images, classes, SETTINGS)
    for batch in (1, 37, 700):
        history = ClientHistory(SETTINGS)
        observe_all(history, images, classes, batch)
        assert history.flagged_at == expected[0]
        assert history.last_w == pytest.approx(expected[1], abs=1e-9)


def test_images_are_compared_as_bytes():
    x = torch.tensor([0.0, 0.5, 1.0, 0.999]).reshape(1, 1, 2, 2)
    assert as_bytes(x).tolist() == [[0, 128, 255, 255]]


@pytest.mark.parametrize("change, message", [
    ({"delta": 1.0}, r"delta .* must be in \(0, 1\)"), ({"test_every": 0}, "test_every must be a whole number"),
    ({"min_distances": 2}, "needs 3"), ({"outlier_std": math.inf}, "outlier_std must be a finite number"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        Prada(**change)
    with pytest.raises(ConfigError, match=message):
        DetectorConfig(**change)
    with pytest.raises(ConfigError, match="response must be"):
        DetectorConfig(response="block")
    with pytest.raises(ConfigError, match="delta must be a number"):
        DetectorConfig(delta="0.9")


def test_a_restarted_store_resumes_every_client_where_it_stood(tmp_path: Path):
    images, classes = jacobian_stream(1200)
    whole = ClientHistory(SETTINGS)
    observe_all(whole, images, classes, batch=50)
    store = DetectorStore(tmp_path / "prada.sqlite", SETTINGS)
    part = store.load("attacker")
    for i in range(0, 100, 50):  # 100 queries (not yet tested), then the server restarts
        flags, rows = part.observe(images[i:i + 50], classes[i:i + 50])
        store.save("attacker", part, rows, images[i:i + 50])
    assert not part.flagged
    store.close()
    store = DetectorStore(tmp_path / "prada.sqlite", SETTINGS)
    resumed = store.load("attacker")
    assert resumed.queries == 100 and resumed.row_distance == part.row_distance
    assert all(torch.equal(resumed.growing[c], part.growing[c]) for c in part.growing)
    assert resumed.threshold == part.threshold
    for i in range(100, 1200, 50):
        flags, rows = resumed.observe(images[i:i + 50], classes[i:i + 50])
        store.save("attacker", resumed, rows, images[i:i + 50])
    assert resumed.flagged_at == whole.flagged_at
    store.close()
    flagged = DetectorStore(tmp_path / "prada.sqlite", SETTINGS).load("attacker")  # and a flagged client stays flagged
    assert flagged.flagged_at == whole.flagged_at and flagged.queries == 1200
    assert flagged.observe(images[:3], classes[:3])[0].all()
    assert DetectorStore(tmp_path / "prada.sqlite", SETTINGS).clients()["attacker"]["flagged_at"] == whole.flagged_at


def test_a_store_of_other_settings_or_no_store_at_all_is_refused(tmp_path: Path):
    DetectorStore(tmp_path / "prada.sqlite", SETTINGS).close()
    with pytest.raises(ConfigError, match="other PRADA settings"):
        DetectorStore(tmp_path / "prada.sqlite", Prada(delta=0.8))
    (tmp_path / "text.sqlite").write_text("not a database, but 100 bytes of text " * 3)
    with pytest.raises(ConfigError, match="is not a PRADA client store"):
        DetectorStore(tmp_path / "text.sqlite", SETTINGS)


def test_a_failed_write_stores_nothing_of_the_batch(tmp_path: Path):
    store = DetectorStore(tmp_path / "prada.sqlite", SETTINGS)
    history = store.load("c")
    images, classes = natural_stream(20)
    _, rows = history.observe(images, classes)
    with pytest.raises(sqlite3.Error):
        store.save("c", history, [*rows, rows[0]], images)  # a duplicate row: the insert fails half-way
    assert store.clients() == {} and store.load("c").queries == 0


def test_a_write_that_fails_leaves_no_batch_in_memory_either(tmp_path: Path, monkeypatch):
    config = DetectorConfig(delta=0.9, response="refuse", min_distances=20, min_per_class=2)
    watch = ClientWatch(config, DetectorStore(tmp_path / "s.sqlite", config.prada()))
    queries = stepping_queries(400)
    answers = linear_victim()(queries)
    real_save, failing = watch.store.save, {"on": False}

    def save(client, history, rows, images):
        if failing["on"] or history.flagged:  # the disk fails on the batch that flags the client
            failing["on"] = True
            raise sqlite3.OperationalError("database is locked")
        real_save(client, history, rows, images)

    monkeypatch.setattr(watch.store, "save", save)
    with pytest.raises(sqlite3.OperationalError):
        for part, answer in zip(queries.split(10), answers.split(10)):
            watch.respond("m", part, answer)
    stored = watch.store.clients()["m"]
    assert stored["flagged_at"] is None and not watch.refused("m")  # memory follows the store, not the lost batch
    assert watch.history("m").queries == stored["queries"]
    failing["on"] = False
    monkeypatch.setattr(watch.store, "save", real_save)
    with pytest.raises(ClientRefused):  # the client re-sends the batch: flagged again, and this time it is kept
        for part, answer in zip(queries[stored["queries"]:].split(10), answers[stored["queries"]:].split(10)):
            watch.respond("m", part, answer)
    assert DetectorStore(tmp_path / "s.sqlite", config.prada()).load("m").flagged


def test_two_processes_answering_one_client_from_one_store_are_stopped(tmp_path: Path):
    images, classes = natural_stream(40)
    stores = [DetectorStore(tmp_path / "s.sqlite", SETTINGS) for _ in range(2)]
    histories = [store.load("c") for store in stores]
    for store, history in zip(stores, histories):
        _, rows = history.observe(images[:20], classes[:20])
        if store is stores[0]:
            store.save("c", history, rows, images[:20])
    with pytest.raises(RuntimeError, match="another process answers the same client"):
        stores[1].save("c", histories[1], rows, images[:20])
    assert stores[0].load("c").queries == 20


def test_misinformation_keeps_confidence_names_a_wrong_class_per_image_and_needs_the_key():
    probs = torch.softmax(torch.randn(200, 10), dim=1)
    images, _ = natural_stream(200)
    lied = misinform(probs, images, b"k" * 32)
    assert torch.allclose(lied.sum(dim=1), torch.ones(200)) and torch.equal(lied.amax(dim=1), probs.amax(dim=1))
    assert (lied.argmax(dim=1) != probs.argmax(dim=1)).all()
    assert torch.equal(misinform(probs, images, b"k" * 32), lied)  # the same image, the same wrong class
    shifts = (lied.argmax(dim=1) - probs.argmax(dim=1)) % 10
    assert len(set(shifts.tolist())) == 9  # no one shift undoes them all
    other = (misinform(probs, images, b"j" * 32).argmax(dim=1) - probs.argmax(dim=1)) % 10
    assert (other != shifts).float().mean() > 0.7  # another key, other shifts


def test_a_store_keeps_its_key_to_itself(tmp_path: Path):
    store = DetectorStore(tmp_path / "prada.sqlite", SETTINGS)
    assert len(store.key) == 32 and DetectorStore(tmp_path / "prada.sqlite", SETTINGS).key == store.key
    assert DetectorStore(tmp_path / "other.sqlite", SETTINGS).key != store.key
    assert (tmp_path / "prada.sqlite").stat().st_mode & 0o077 == 0


def monitored(tmp_path: Path, response: str) -> MonitoredVictim:
    config = DetectorConfig(delta=0.9, response=response, min_distances=20, min_per_class=2)
    return MonitoredVictim(linear_victim(), config, DetectorStore(tmp_path / "s.sqlite", config.prada()), "client")


def stepping_queries(n: int) -> torch.Tensor:
    """Images a Jacobian-like attacker sends: 4 seeds, each later one a small sign step from an earlier one."""
    images, _ = jacobian_stream(n, seeds=4, step=8)
    return images.float().div(255).repeat_interleave(784 // 64 + 1, dim=1)[:, :784].reshape(n, 1, 28, 28)


def test_the_watched_victim_misinforms_a_flagged_client_and_remembers_it(tmp_path: Path):
    victim = monitored(tmp_path, "misinform")
    queries = stepping_queries(600)
    answers = torch.cat([victim(part) for part in queries.split(50)])
    reference = linear_victim()
    truth = torch.cat([reference(part) for part in queries.split(50)])  # same batches: matmul rounds by batch size
    flagged_at = victim.history.flagged_at
    assert flagged_at is not None and victim.figures() == {"flagged_at": flagged_at, "detector_queries": 600}
    assert torch.equal(answers[:flagged_at - 1], truth[:flagged_at - 1])
    assert (answers[flagged_at - 1:].argmax(dim=1) != truth[flagged_at - 1:].argmax(dim=1)).all()
    again = monitored(tmp_path, "misinform")  # a restarted server: the client is still flagged
    assert again.history.flagged_at == flagged_at
    assert (again(queries[:5]).argmax(dim=1) != truth[:5].argmax(dim=1)).all()


def test_the_watched_victim_refuses_a_flagged_client_with_what_it_answered_before(tmp_path: Path):
    victim = monitored(tmp_path, "refuse")
    queries = stepping_queries(600)
    with pytest.raises(ClientRefused, match="flagged this client after") as refused:
        for part in queries.split(50):
            victim(part)
    first = (victim.history.flagged_at - 1) % 50
    assert len(refused.value.answers) == first


def test_honest_clients_streaming_natural_images_are_counted_not_flagged():
    images = torch.rand(600, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # i.i.d.: distances spread normally
    result = benign_clients(linear_victim(), images, Prada(delta=0.5, min_distances=50), clients=3, queries=400, seed=0)
    assert result["benign_clients"] == 3 and result["benign_flagged"] == 0 and result["benign_fpr"] == 0
    lowest = ClientHistory(Prada(delta=0.5, min_distances=50))  # client 0 by hand, every test's W seen
    stream = images[torch.randperm(600, generator=torch.Generator().manual_seed(0))[:400]]
    ws = []
    for part in stream.split(1):
        lowest.observe(as_bytes(part), linear_victim()(part).argmax(dim=1))
        ws.append(lowest.last_w)
    assert lowest.min_w == min(w for w in ws if w is not None)
    assert result["benign_w_min"] <= lowest.min_w
    strict = benign_clients(linear_victim(), images, Prada(delta=0.9999, min_distances=50), clients=2, queries=400, seed=0)
    assert strict["benign_flagged"] == 2 and all(61 <= q <= 400 for q in strict["benign_flagged_at"])
    with pytest.raises(ValueError, match="at least 1 client"):
        benign_clients(linear_victim(), images, SETTINGS, clients=1, queries=601, seed=0)


def detector_config(root: Path, out: Path, **options) -> ExperimentConfig:
    """The tiny experiment with PRADA beside the target and EDM (tests on every query, so 40 images are enough)."""
    setup = DetectorSetup(name="prada", options={"delta": 0.9, "test_every": 1, "min_distances": 5, "min_per_class": 1,
                                                 **options},
                          defends=["none", "edm-neural"], benign_clients=2, benign_queries=40)
    return tiny_config(root, out, detectors=[setup])


def test_the_runner_measures_benign_clients_and_each_attack_as_one_client(fake_root: Path, tmp_path: Path):
    records = run_experiment(detector_config(fake_root, tmp_path))
    watched = [r for r in records if r["defense"] in ("prada", "edm-neural+prada")]
    assert {(r["defense"], r["budget"]) for r in watched} == {(d, b) for d in ("prada", "edm-neural+prada") for b in (64, 128)}
    assert all("flagged_at" in r for r in watched) and not any("flagged_at" in r for r in records if r not in watched)
    runs = tmp_path / "runs/tiny"
    attacks = [json.loads((f / "config.json").read_text()) | json.loads((f / "result.json").read_text())
               for f in runs.glob("attack-*")]
    behind = [a for a in attacks if "detector" in a]
    assert len(behind) == 4 and all(a["detector"]["response"] == "misinform" for a in behind)
    # the budgets of one purchase are one client: the 128-query run's client saw the 64 bought before it, then 64 more
    assert sorted(a["detector_queries"] for a in behind) == [64, 64, 128, 128]
    assert len(list((runs / "transfers/defender").glob("prada-*.sqlite"))) == 2  # one store per victim
    benign = [json.loads((f / "result.json").read_text()) for f in runs.glob("benign-*")]
    assert len(benign) == 2 and all(b["benign_clients"] == 2 for b in benign)
    text = (tmp_path / "results/tiny/results.md").read_text()
    assert "## Stateful detectors" in text and "### edm-neural+prada" in text
    assert "| knockoff | 128 |" in text.split("### edm-neural+prada")[1]


@pytest.mark.parametrize("change, message", [
    ({"response": "refuse"}, "measures a detector's response 'misinform'"),
    ({"deltaa": 0.9}, r"unknown options \['deltaa'\]"),
    ({"state": "x.sqlite"}, r"unknown options \['state'\]"),
    ({"delta": 1.5}, r"delta .* must be in \(0, 1\)"),
])
def test_bad_detector_settings_fail_before_training(fake_root: Path, tmp_path: Path, change, message):
    with pytest.raises(ConfigError, match=message):
        run_experiment(detector_config(fake_root, tmp_path, **change))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change, message", [
    (lambda s: setattr(s, "benign_queries", 41), "more than the 40 test images"),
    (lambda s: setattr(s, "defends", ["edm-hash"]), "defends must name what it watches"),
    (lambda s: setattr(s, "attacks", ["jbda"]), "must be labels of configured attacks"),
    (lambda s: setattr(s, "benign_clients", 0), "benign_clients must be a whole number >= 1"),
])
def test_bad_detector_setups_fail_before_training(fake_root: Path, tmp_path: Path, change, message):
    config = detector_config(fake_root, tmp_path)
    change(config.detectors[0])
    with pytest.raises(ConfigError, match=message):
        run_experiment(config)


# ------------------------------------------------------------------------------------------------ the prediction API
ROUTER_KEY = "3f0c9a51d27e48b6a1c5e09f7d3b2a86"


@pytest.fixture
def served(tmp_path, checkpoint_factory):
    """Build the API for an EDM checkpoint behind PRADA (``response``), as ``python -m edm_lightning.serve`` would."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from edm_lightning.defense import VictimConfig
    from edm_lightning.models import EnsembleModule
    from edm_lightning.serve import add_client
    from edm_lightning.serve.__main__ import ServeConfig, build_app

    torch.manual_seed(0)
    checkpoint = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    keys = {name: add_client(tmp_path / "clients.yaml", name, 5000) for name in ("mallory", "alice", "bob")}

    def build(response: str, ledger: str | None = None, state: str | None = "prada.sqlite") -> TestClient:
        detector = {"delta": 0.9, "response": response, "min_distances": 20, "min_per_class": 2,
                    "state": state and str(tmp_path / state)}
        config = ServeConfig(VictimConfig(checkpoint, router="keyed", key=ROUTER_KEY, detector=detector),
                             clients_file=str(tmp_path / "clients.yaml"), ledger=ledger or str(tmp_path / "ledger.sqlite"),
                             max_batch=64)
        return TestClient(build_app(config))

    return build, keys


def predict(http, key: str, x: torch.Tensor):
    from edm_lightning.protocol import NPY, encode_npy
    return http.post("/v1/predict", content=encode_npy(x), headers={"content-type": NPY, "X-API-Key": key})


def test_the_api_refuses_a_flagged_key_counting_nothing_more_and_remembers_it_after_a_restart(served):
    build, keys = served
    queries = stepping_queries(600)
    with build("refuse") as http:
        statuses, answered = [], 0
        for part in queries.split(10):
            response = predict(http, keys["mallory"], part)
            statuses.append(response.status_code)
            answered += len(part) if response.status_code == 200 else 0
        assert 200 in statuses, response.json()
        assert statuses[-1] == 403 and statuses.index(403) == statuses.count(200)
        assert "flagged as a model-stealing attacker" in response.json()["detail"]
        assert http.get("/v1/usage", headers={"X-API-Key": keys["mallory"]}).json()["queries_spent"] == answered
        honest = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        assert all(predict(http, keys["alice"], part).status_code == 200 for part in honest.split(50))
    with build("refuse") as http:  # a restarted server: still refused at once, still nothing counted
        assert predict(http, keys["mallory"], queries[:5]).status_code == 403
        assert http.get("/v1/usage", headers={"X-API-Key": keys["mallory"]}).json()["queries_spent"] == answered
        assert predict(http, keys["alice"], queries[:5]).status_code == 200


def test_the_api_misinforms_a_flagged_key_and_charges_what_it_answers(served):
    build, keys = served
    queries = stepping_queries(600)
    with build("misinform") as http:
        answers = torch.cat([torch.tensor(predict(http, keys["mallory"], part).json()["probabilities"])
                             for part in queries.split(50)])
        first = torch.tensor(predict(http, keys["alice"], queries[:10]).json()["probabilities"])
        last = torch.tensor(predict(http, keys["bob"], queries[-10:]).json()["probabilities"])  # too few to test
        assert http.get("/v1/usage", headers={"X-API-Key": keys["mallory"]}).json()["queries_spent"] == 600
    assert torch.allclose(answers[:10], first, atol=1e-6)  # before the flag: the model's own answers
    assert (answers[-10:].argmax(dim=1) != last.argmax(dim=1)).all()  # after it, the same images: a wrong class each
    assert torch.allclose(answers.sum(dim=1), torch.ones(600), atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    ({"state": None}, "victim.detector.state must name the SQLite file"),
    ({"ledger": "postgresql://edm@db.example/ledger"}, "cannot watch replicas that share a PostgreSQL ledger"),
])
def test_a_server_detector_without_a_state_file_or_behind_replicas_is_refused(served, settings, message):
    build, _ = served
    with pytest.raises(ConfigError, match=message):
        build("refuse", **settings)
