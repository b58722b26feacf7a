"""Answers a victim sends back are checked before anything keeps them, and what it answered is never forgotten.

A victim in this process and a prediction API (a stand-in server behind httpx's mock transport: each request is
answered as this package's server answers it, with faults where a test asks for them) go through the same oracle:
answers that are not one probability vector per query are refused with the victim's name and charged (the victim
answered), nothing of them is cached; answers that arrived before a request failed are kept, and only they are charged.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from torch import Tensor

from edm_lightning.attacks import BlackBoxOracle, Purchase, QueryLedger, RemoteVictim
from edm_lightning.attacks.datamodule import victim_labels
from edm_lightning.attacks.oracle import BadAnswers
from edm_lightning.attacks.remote import RemoteError
from edm_lightning.attacks.transfer_set import TransferSet, build_transfer_set
from edm_lightning.errors import ConfigError
from edm_lightning.protocol import decode_npy
from tests.helpers.victims import CountingVictim, linear_victim

URL = "http://api.test"


class Faulty(CountingVictim):
    """A victim whose answer to call ``bad_in`` is changed by ``spoil`` (every row of it counted as answered)."""

    def __init__(self, spoil=None, bad_in: int | None = 1):
        super().__init__(linear_victim())
        self.spoil, self.bad_in = spoil, bad_in

    def forward(self, x: Tensor) -> Tensor:
        answers = super().forward(x)
        return self.spoil(answers.clone()) if self.calls == self.bad_in and self.spoil else answers


def nan_row(answers: Tensor) -> Tensor:
    answers[len(answers) // 2] = float("nan")
    return answers


def extra_row(answers: Tensor) -> Tensor:
    return torch.cat([answers, answers[-1:]])


SPOILED = {
    "a NaN row": (nan_row, "NaN"),
    "an infinite value": (lambda a: a.index_fill_(1, torch.tensor([0]), float("inf")), "NaN or infinite"),
    "one row more": (extra_row, "11 answers for 10 queries"),
    "one row less": (lambda a: a[:-1], "9 answers for 10 queries"),
    "another class count": (lambda a: a[:, :9], r"shape \(10, 9\)"),
    "logits": (lambda a: a.log().clamp_min(-30), "not probability vectors"),
    "negative values": (lambda a: a * 2 - a.roll(1, dims=1), "not probability vectors"),
    "unnormalised": (lambda a: a * 1.1, "not probability vectors"),
    "integers": (lambda a: a.argmax(dim=1, keepdim=True).expand(-1, 10).long(), "dtype torch.int64"),
    "a list": (lambda a: a.tolist(), "got list"),
}


@pytest.mark.parametrize("label_only", [False, True], ids=["probabilities", "label-only"])
@pytest.mark.parametrize("spoiled", SPOILED)
def test_unusable_answers_are_refused_with_the_victims_name_and_charged(spoiled, label_only, tmp_path):
    spoil, message = SPOILED[spoiled]
    victim = Faulty(spoil)
    ledger = QueryLedger(tmp_path / "ledger.json")
    oracle = BlackBoxOracle(victim, budget=100, label_only=label_only, ledger=ledger)
    with pytest.raises(BadAnswers, match=rf"the victim \(Faulty\) answered .*{message}") as refused:
        oracle(torch.rand(10, 1, 28, 28))
    assert "counted" in str(refused.value) and refused.value.charged == 10
    assert oracle.queries_spent == ledger.spent == victim.rows == 10  # the victim answered: charged, never refunded
    assert len(oracle(torch.rand(5, 1, 28, 28))) == 5  # a good answer afterwards is returned as ever


@pytest.mark.parametrize("spoiled", ["a NaN row", "one row more"])
def test_a_refused_answer_is_never_cached_and_its_charge_survives_the_run(spoiled, tmp_path):
    """The issue's examples: NaN rows were cached and trained on; an extra row shifted every later answer by one image.
    Now nothing of the batch is kept, the run fails naming the victim, and the next run is charged the batch."""
    images, labels = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8), torch.arange(300) % 10
    path = tmp_path / "transfer.pt"
    first = Faulty(SPOILED[spoiled][0], bad_in=2)
    with pytest.raises(BadAnswers, match=r"the victim \(Faulty\)"):
        build_transfer_set(lambda spent: BlackBoxOracle(first, 200, spent=spent), images, labels, 200, path, batch_size=50)
    kept = TransferSet.load(path)
    assert len(kept) == 50 and kept.answers.isfinite().all()  # the first batch only
    assert Purchase(path).take_pending() == {"items": 50, "queries": 50}  # the refused batch, charged to the next run
    second = Faulty()
    result = build_transfer_set(lambda spent: BlackBoxOracle(second, 200, spent=spent), images, labels, 200, path,
                                batch_size=50)
    assert first.rows + second.rows == result.queries == 200 and len(result) == 150
    clean = linear_victim()(images[result.indices].float() / 255)
    torch.testing.assert_close(result.answers, clean)  # every answer belongs to its own image: nothing shifted


def test_the_evaluation_labels_are_checked_too():
    with pytest.raises(BadAnswers, match=r"the victim \(Faulty\) answered the evaluation images .*NaN"):
        victim_labels(Faulty(nan_row), torch.rand(8, 1, 28, 28))


class FakeAPI:
    """This package's prediction API as a client sees it (``/v1/info``, ``/v1/predict``), answering with a linear victim.

    Args:
        budget: the key's budget; a request that does not fit is refused whole (429) and not charged.
        max_batch: most images per request (larger calls are split by the client).
        answer: ``probabilities`` or ``labels``.
        body: ``request number -> JSON body`` replacing the answer to that request (charged all the same).
    """

    def __init__(self, budget: int = 10_000, max_batch: int = 10, answer: str = "probabilities",
                 body: dict[int, object] | None = None):
        self.budget, self.max_batch, self.answer, self.body = budget, max_batch, answer, body or {}
        self.spent, self.requests = 0, 0
        self.victim = linear_victim()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/info":
            return httpx.Response(200, json={"input_shape": [1, 28, 28], "num_classes": 10, "answer": self.answer,
                                             "max_batch": self.max_batch, "max_body_bytes": 8 << 20, "model_id": "fake"})
        x = decode_npy(request.content)
        if self.spent + len(x) > self.budget:
            return httpx.Response(429, json={"detail": f"budget of {self.budget} queries exhausted"})
        self.spent += len(x)
        self.requests += 1
        if self.requests in self.body:
            content = self.body[self.requests]
            return httpx.Response(200, content=content if isinstance(content, bytes) else json.dumps(content).encode())
        probs = self.victim(x)
        if self.answer == "labels":
            return httpx.Response(200, json={"labels": probs.argmax(dim=1).tolist()})
        return httpx.Response(200, json={"probabilities": probs.tolist()})


@pytest.fixture
def api(monkeypatch):
    """Connect RemoteVictims to a :class:`FakeAPI` (``api(**settings)`` makes one and returns ``(server, victim)``)."""
    real = httpx.Client

    def connect(**settings) -> tuple[FakeAPI, RemoteVictim]:
        server = FakeAPI(**settings)
        monkeypatch.setattr(httpx, "Client", lambda **kwargs: real(transport=httpx.MockTransport(server), **kwargs))
        return server, RemoteVictim(URL, "a-key")

    return connect


NAN = b'{"probabilities": [' + b", ".join([b"[NaN, 0, 0, 0, 0, 0, 0, 0, 0, 1]"] * 10) + b"]}"
ROWS = [[0.1] * 10] * 10
BAD_BODIES = {
    "NaN probabilities": ("probabilities", NAN, "NaN"),
    "one row more": ("probabilities", {"probabilities": ROWS + ROWS[:1]}, "11 answers for 10 queries"),
    "not JSON": ("probabilities", b"<html>proxy error</html>", "not this API's"),
    "no answer field": ("probabilities", {"queries_spent": 10}, "KeyError"),
    "ragged rows": ("probabilities", {"probabilities": [[0.5, 0.5]] + ROWS[1:]}, "not this API's"),
    "a class the attack cannot use": ("labels", {"labels": [10] + [0] * 9}, r"labels \[10\] are not class ids"),
    "a negative label": ("labels", {"labels": [-1] + [0] * 9}, r"labels \[-1\]"),
    "a fractional label": ("labels", {"labels": [1.5] + [0] * 9}, r"labels \[1.5\]"),
    "a label too few": ("labels", {"labels": [0] * 9}, "9 labels for 10 queries"),
}


@pytest.mark.parametrize("bad", BAD_BODIES)
def test_a_server_answering_what_is_no_answer_is_refused_by_name_charged_and_kept_pending(api, bad, tmp_path):
    """The issue's example: a label-only server answering a class the attack cannot use made the attack delete its
    pending record after the server had answered, and the re-run bought the same queries again."""
    answer, body, message = BAD_BODIES[bad]
    server, victim = api(answer=answer, body={3: body})
    oracle = BlackBoxOracle(victim, budget=100)
    kept: list[Tensor] = []
    with Purchase(tmp_path / "set.pt") as purchase:
        with pytest.raises(BadAnswers, match=rf"the prediction API at {URL} answered .*{message}"):
            purchase.buy(oracle, torch.rand(30, 1, 28, 28), items=0, keep=kept.append)
        assert kept == [] and purchase.take_pending() == {"items": 0, "queries": 30}  # all 3 requests were answered
    assert oracle.queries_spent == server.spent == 30


def test_a_server_refusing_part_way_through_a_call_keeps_what_it_answered(api, tmp_path):
    """The issue's example, scaled down: a call split in 10 requests, a 429 after 42 rows of the second call. The 40
    rows answered in the failing call are kept; the re-run (another key) buys only the rest."""
    images, labels = torch.randint(0, 256, (500, 1, 28, 28), dtype=torch.uint8), torch.arange(500) % 10
    path = tmp_path / "transfer.pt"
    server, victim = api(budget=142)

    def buy(victim: RemoteVictim) -> TransferSet:
        return build_transfer_set(lambda spent: BlackBoxOracle(victim, 300, spent=spent), images, labels, 300, path,
                                  batch_size=100)

    with pytest.raises(RemoteError, match="429"):
        buy(victim)
    assert len(TransferSet.load(path)) == 140 and not Purchase(path).pending_path.exists()
    again, victim = api(budget=1000)
    result = buy(victim)
    assert server.spent + again.spent == result.queries == 300 and len(result) == 300  # 3,400 for 3,000 before
    clean = linear_victim()(images[result.indices].float() / 255)
    torch.testing.assert_close(result.answers, clean)


def test_a_label_only_server_answering_an_unusable_class_mid_purchase_never_takes_the_attack_past_its_budget(api,
                                                                                                          tmp_path):
    images, labels = torch.randint(0, 256, (500, 1, 28, 28), dtype=torch.uint8), torch.arange(500) % 10
    path = tmp_path / "transfer.pt"
    server, victim = api(answer="labels", body={12: {"labels": [10] * 10}})  # the second call's second request

    def buy(victim: RemoteVictim) -> TransferSet:
        return build_transfer_set(lambda spent: BlackBoxOracle(victim, 300, spent=spent), images, labels, 300, path,
                                  batch_size=100)

    with pytest.raises(BadAnswers, match="not class ids"):
        buy(victim)
    again, victim = api(answer="labels")
    result = buy(victim)
    assert server.spent + again.spent == result.queries == 300  # 4,024 for 3,000 before
    assert len(result) == 280 and result.lost == [[100, 20]]  # the failing call's 2 requests answered, none kept


def test_a_connection_that_never_reached_the_server_charges_nothing_and_a_lost_reply_is_charged(api, monkeypatch):
    server, victim = api()

    def fail(error: type[httpx.HTTPError]):
        def post(*args, **kwargs):
            raise error("down", request=httpx.Request("POST", URL))
        return post

    oracle = BlackBoxOracle(victim, budget=100)
    monkeypatch.setattr(victim._client, "post", fail(httpx.ConnectError))
    with pytest.raises(RemoteError) as failed:
        oracle(torch.rand(10, 1, 28, 28))
    assert failed.value.charged == 0 and oracle.queries_spent == 0
    monkeypatch.setattr(victim._client, "post", fail(httpx.ReadTimeout))
    with pytest.raises(RemoteError) as failed:
        oracle(torch.rand(10, 1, 28, 28))
    assert failed.value.charged == 10 and oracle.queries_spent == 10  # the server may have answered: errs towards it


def test_a_malformed_batch_refused_before_any_answer_is_not_charged(api):
    server, victim = api()
    victim._client.post = lambda *args, **kwargs: httpx.Response(422, json={"detail": "pixels outside [0, 1]"})
    oracle = BlackBoxOracle(victim, budget=100)
    with pytest.raises(ValueError, match="refused the batch \\(422\\): pixels outside"):
        oracle(torch.rand(10, 1, 28, 28))
    assert oracle.queries_spent == 0


@pytest.mark.parametrize("lost", [[[0, -2048]], [[-1, 64]], [[0, 2.5]], [[0]], [[0, 64, 1]], [[999, 64]], -64, "64"],
                         ids=["negative count", "negative offset", "fraction", "short", "long", "past the set",
                              "negative plain count", "text"])
def test_a_transfer_set_whose_lost_record_was_edited_is_refused_and_buys_nothing(lost, tmp_path: Path):
    """The issue's example: a ``lost`` record edited to a negative count bought 4,096 rows for a 2,048 budget."""
    images, labels = torch.randint(0, 256, (500, 1, 28, 28), dtype=torch.uint8), torch.arange(500) % 10
    path = tmp_path / "transfer.pt"
    build_transfer_set(lambda spent: BlackBoxOracle(linear_victim(), 100, spent=spent), images, labels, 100, path,
                       batch_size=50)
    blob = torch.load(path, weights_only=True)
    torch.save({**blob, "lost": lost}, path)
    with pytest.raises(ConfigError, match="transfer.pt.*lost queries is damaged.*delete it only to start the attack over"):
        build_transfer_set(lambda spent: pytest.fail("no query may be spent"), images, labels, 200, path, batch_size=50)


@pytest.mark.parametrize("change", [
    lambda blob: {**blob, "answers": blob["answers"][:-1]},
    lambda blob: {**blob, "answers": torch.cat([blob["answers"], blob["answers"][:1]])},
    lambda blob: {**blob, "answers": blob["answers"].index_fill(0, torch.tensor([3]), float("nan"))},
    lambda blob: {**blob, "indices": blob["indices"].float()},
    lambda blob: {**blob, "indices": -blob["indices"] - 1},
    lambda blob: {**blob, "indices": blob["indices"] + 10_000},
    lambda blob: {**blob, "answers": blob["answers"][:, :9] / blob["answers"][:, :9].sum(1, keepdim=True)},
    lambda blob: {**blob, "query_copies": 0},
    lambda blob: {key: value for key, value in blob.items() if key != "answers"},
    lambda blob: [blob],
], ids=["a row short", "a row more", "NaN", "float indices", "negative indices", "past the surrogate",
        "another class count", "zero copies", "no answers", "not a mapping"])
def test_a_damaged_transfer_set_is_refused_with_its_name_before_any_query(change, tmp_path: Path):
    images, labels = torch.randint(0, 256, (500, 1, 28, 28), dtype=torch.uint8), torch.arange(500) % 10
    path = tmp_path / "transfer.pt"
    build_transfer_set(lambda spent: BlackBoxOracle(linear_victim(), 100, spent=spent), images, labels, 100, path,
                       batch_size=50)
    torch.save(change(torch.load(path, weights_only=True)), path)
    with pytest.raises(ConfigError, match="transfer.pt"):
        build_transfer_set(lambda spent: BlackBoxOracle(linear_victim(), 200, spent=spent), images, labels, 200, path,
                           batch_size=50)


def test_a_victim_failing_part_way_ends_a_cli_in_one_line_not_a_traceback(capsys):
    """A key out of budget (429) or unusable answers are conditions the user acts on: exit status 2 with the message,
    also when the trainer re-raises them wrapped."""
    from edm_lightning.errors import exit_if_user_error

    for error in (BadAnswers("the prediction API at http://127.0.0.1:1 answered NaN", 64),
                  RemoteError(429, "query budget exhausted", rows=64)):
        try:
            raise RuntimeError("the fit failed") from error
        except RuntimeError as wrapped:
            with pytest.raises(SystemExit) as exit_info:
                exit_if_user_error(wrapped)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == f"error: {error}"
