"""The budget holds over a kill for every registered attack: the victim answers at most the budget over both runs.

The worst kill for a budget: the victim has answered a batch and the run dies before the attack saved it (a
reply lost on the way back). Each attack is killed so, at one of its oracle calls, and run again with the same
cache; a victim that counts what it answered is the ground truth. Attacks are taken from the registry, so a new
one is tested the day it is registered (with its tiny settings, ``tests/helpers/attacks.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from edm_lightning.attacks import ATTACKS, BlackBoxOracle, Purchase, QueryBudgetExceeded, QueryLedger
from edm_lightning.attacks.oracle import BadAnswers, PartlyAnswered
from edm_lightning.attacks.remote import RemoteError
from edm_lightning.errors import ConfigError
from tests.helpers.attacks import tiny_settings
from tests.helpers.victims import AnsweredThenKilled, CountingVictim, linear_victim

#: Oracle calls each attack is killed in, after the victim answered it: early, and in its last stretch, where a
#: charged batch leaves less budget than the purchase was planned for (its tiny settings make several calls).
KILLED_IN = {"activethief": (3, 7), "knockoff": (3, 5), "jbda": (4, 6), "jbda_tr": (4, 6), "dfme": (3, 10),
             "maze": (3, 10)}


class RefusedPartWay(CountingVictim):
    """A prediction API that splits each call in two requests; in call ``fails_in`` it answers the first and refuses the
    second (429, nothing charged), as :class:`~edm_lightning.attacks.remote.RemoteVictim` reports it."""

    def __init__(self, fails_in: int | None = None):
        super().__init__(linear_victim())
        self.fails_in = fails_in

    def forward(self, x: Tensor) -> Tensor:
        if self.calls + 1 != self.fails_in:
            return super().forward(x)
        answered = super().forward(x[: len(x) // 2])
        raise RemoteError(429, "query budget exhausted for this key", rows=len(x) - len(answered), answers=answered)


class UnusableAnswers(RefusedPartWay):
    """Answers call ``fails_in`` with a NaN row (every row counted): the answers cannot be kept, the call is charged."""

    def forward(self, x: Tensor) -> Tensor:
        answers = CountingVictim.forward(self, x)
        if self.calls == self.fails_in:
            answers = answers.clone()
            answers[0] = float("nan")
        return answers


#: Faults after which the victim answered: what the re-run is charged is exactly what it answered.
FAULTS = {"refused part-way": RefusedPartWay, "unusable answers": UnusableAnswers}


@pytest.fixture
def uncounted_evaluation(monkeypatch):
    """The victim's labels of its own test set are the experimenter's, not queries: keep them out of the count."""
    from edm_lightning.attacks import datamodule

    real = datamodule.victim_labels
    monkeypatch.setattr(datamodule, "victim_labels",
                        lambda victim, images, batch_size=1024: real(getattr(victim, "victim", victim), images, batch_size))


@pytest.mark.parametrize("when", [0, 1], ids=["early", "late"])
@pytest.mark.parametrize("name", ATTACKS.names())
def test_a_kill_after_the_victim_answered_never_takes_an_attack_past_its_budget(name, when, fake_data,
                                                                                uncounted_evaluation, tmp_path):
    settings, killed_in = tiny_settings(name), KILLED_IN.get(name, (3, 4))[when]
    entry = ATTACKS.get(name)
    common = dict(dataset="fashionmnist", root=str(tmp_path), cache_dir=str(tmp_path / "cache"), seed=0, **settings)
    budget = settings["budget"]

    killed = AnsweredThenKilled(killed_in)
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # Lightning turns an interrupt in fit into exit status 1
        entry.build(killed, **common).run({"accelerator": "cpu"})
    assert killed.calls == killed_in and killed.rows > 0
    resumed = AnsweredThenKilled()
    figures = entry.build(resumed, **common).run({"accelerator": "cpu"})

    answered = killed.rows + resumed.rows
    assert answered <= budget, f"{name}: the victim answered {answered} queries for a budget of {budget}"
    assert answered <= figures["queries"] <= budget  # the count errs towards the budget, never below what was answered
    assert figures["queries_this_run"] == resumed.rows  # the re-run reports what it bought itself


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", ATTACKS.names())
def test_a_victim_failing_after_it_answered_is_charged_exactly_what_it_answered(name, fault, fake_data,
                                                                                uncounted_evaluation, tmp_path):
    """A server that refuses part-way through a call keeps the answers that arrived; answers refused as unusable are
    charged (the victim answered); either way the re-run buys nothing twice and reports what the victim answered."""
    settings, fails_in = tiny_settings(name), KILLED_IN.get(name, (3, 4))[1]
    entry = ATTACKS.get(name)
    common = dict(dataset="fashionmnist", root=str(tmp_path), cache_dir=str(tmp_path / "cache"), seed=0, **settings)

    failing = FAULTS[fault](fails_in)
    with pytest.raises(PartlyAnswered):
        entry.build(failing, **common).run({"accelerator": "cpu"})
    assert failing.calls == fails_in and failing.rows > 0
    resumed = FAULTS[fault]()  # the same victim (its type is part of the cache's key), healthy now
    figures = entry.build(resumed, **common).run({"accelerator": "cpu"})

    answered = failing.rows + resumed.rows
    assert figures["queries"] == answered <= settings["budget"], f"{name}: {answered} answered, {figures['queries']} counted"
    assert figures["queries_this_run"] == resumed.rows


def test_a_prediction_api_failure_keeps_the_record_the_server_may_have_charged(tmp_path):
    class FailingAPI(AnsweredThenKilled):
        def forward(self, x: Tensor) -> Tensor:
            super().forward(x)  # the server answered (and charged) ...
            raise RemoteError(504, "gateway timeout", rows=len(x))  # ... and the reply was lost on the way

    oracle = BlackBoxOracle(FailingAPI(), budget=10)
    with Purchase(tmp_path / "set.pt") as purchase:
        with pytest.raises(RemoteError):
            purchase.buy(oracle, torch.zeros(4, 1, 28, 28), items=0, keep=pytest.fail)
        assert purchase.take_pending() == {"items": 0, "queries": 4}  # charged to the next run, not forgotten
    assert oracle.queries_spent == 4


def test_what_a_victim_answered_before_failing_part_way_is_kept_and_only_that_is_charged(tmp_path):
    """The issue's example: a server that splits a call into requests answers the first, then refuses one (429)."""
    victim = RefusedPartWay(fails_in=1)
    ledger = QueryLedger(tmp_path / "attack.ledger.json")
    oracle = BlackBoxOracle(victim, budget=10, ledger=ledger)
    kept: list[Tensor] = []
    with Purchase(tmp_path / "set.pt") as purchase:
        with pytest.raises(RemoteError, match="429"):
            purchase.buy(oracle, torch.rand(6, 1, 28, 28), items=2, keep=kept.append)
        assert [len(k) for k in kept] == [3] and purchase.take_pending() is None  # nothing else was answered
    assert oracle.queries_spent == ledger.spent == victim.rows == 3


def test_whole_items_answered_before_a_failure_are_kept_and_a_lost_reply_stays_pending(tmp_path):
    class LostLastReply(AnsweredThenKilled):  # answered 5 rows, the reply of the last 2 of them was lost
        def forward(self, x: Tensor) -> Tensor:
            answers = super().forward(x)
            raise RemoteError(0, "read timeout", rows=2, answers=answers[:3])

    oracle = BlackBoxOracle(LostLastReply(), budget=10)
    kept: list[Tensor] = []
    with Purchase(tmp_path / "set.pt") as purchase:
        with pytest.raises(RemoteError):  # 5 rows: items of 2 copies each, the first one whole
            purchase.buy(oracle, torch.rand(5, 1, 28, 28), items=4, keep=kept.append, rows_per_item=2)
        assert [len(k) for k in kept] == [2]
        assert purchase.take_pending() == {"items": 5, "queries": 3}  # a copy of the second item and the lost reply
    assert oracle.queries_spent == 5


def test_two_runs_of_one_data_free_attack_at_once_share_one_budget(tmp_path):
    ledger = tmp_path / "attack.ledger.json"
    first, second = (BlackBoxOracle(AnsweredThenKilled(), budget=10, ledger=QueryLedger(ledger)) for _ in range(2))
    first(torch.zeros(6, 1, 28, 28))  # both opened with nothing spent; each alone could spend 10
    with pytest.raises(QueryBudgetExceeded):
        second(torch.zeros(6, 1, 28, 28))
    second(torch.zeros(4, 1, 28, 28))
    assert QueryLedger(ledger).spent == 10


def test_an_interrupted_call_keeps_its_pending_record_and_a_refusal_clears_it(tmp_path):
    victim = AnsweredThenKilled(killed_in=1)
    oracle = BlackBoxOracle(victim, budget=10)
    with Purchase(tmp_path / "set.pt") as purchase:
        with pytest.raises(KeyboardInterrupt):
            purchase.buy(oracle, torch.zeros(4, 1, 28, 28), items=0, keep=pytest.fail)
        assert purchase.take_pending() == {"items": 0, "queries": 4}  # the victim may have answered: charged later
        with pytest.raises(Exception, match="query budget exceeded"):
            purchase.buy(oracle, torch.zeros(11, 1, 28, 28), items=0, keep=pytest.fail)
        assert purchase.take_pending() is None  # refused before the victim saw it: nothing to charge


def test_answers_refused_after_the_victim_answered_keep_their_charge(tmp_path):
    """Anything raised after the victim answered (answers that cannot be used) keeps the record and the ledger's charge."""
    victim = UnusableAnswers(fails_in=1)
    ledger = QueryLedger(tmp_path / "attack.ledger.json")
    oracle = BlackBoxOracle(victim, budget=10, ledger=ledger)
    with Purchase(tmp_path / "set.pt") as purchase:
        with pytest.raises(BadAnswers, match="NaN"):
            purchase.buy(oracle, torch.rand(4, 1, 28, 28), items=0, keep=pytest.fail)
        assert purchase.take_pending() == {"items": 0, "queries": 4}
    assert oracle.queries_spent == ledger.spent == victim.rows == 4


def test_the_ledger_reserves_a_batch_before_the_victim_sees_it_and_releases_a_refused_one(tmp_path):
    ledger = QueryLedger(tmp_path / "attack.ledger.json")
    victim = AnsweredThenKilled(killed_in=2)
    oracle = BlackBoxOracle(victim, budget=20, ledger=ledger)
    oracle(torch.zeros(3, 1, 28, 28))
    assert ledger.spent == 3
    with pytest.raises(KeyboardInterrupt):
        oracle(torch.zeros(5, 1, 28, 28))
    assert ledger.spent == 8 == victim.rows  # the killed call is charged
    again = BlackBoxOracle(AnsweredThenKilled(), budget=20, spent=ledger.spent, ledger=ledger)
    with pytest.raises(ValueError):
        again(torch.full((2, 1, 28, 28), 2.0))  # the victim refuses pixels outside [0, 1]: nothing answered
    assert ledger.spent == 8


@pytest.mark.parametrize("content", ['{"spent": -5}', "[]", "\x00\x01binary", '{"spent": 2.5}', '{"spent": true}',
                                     '{"spent": "100"}', "{}"])
def test_a_damaged_ledger_is_refused_with_its_name(tmp_path, content):
    path = tmp_path / "attack.ledger.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="attack.ledger.json"):
        _ = QueryLedger(path).spent


@pytest.mark.parametrize("record", [{"items": 0, "queries": -64}, {"items": 0, "queries": 2.5}, {"items": 0},
                                    {"items": True, "queries": 4}, [0, 64]], ids=["negative", "fraction", "missing",
                                                                                  "bool", "list"])
def test_a_damaged_pending_record_is_refused_and_left_as_it_was(tmp_path, record):
    torch.save(record, tmp_path / "set.pt.pending")
    with Purchase(tmp_path / "set.pt") as purchase, pytest.raises(ConfigError, match="set.pt.pending.*not a pending"):
        purchase.take_pending()
    assert (tmp_path / "set.pt.pending").is_file()  # left as it was, for the user to inspect


#: Settings whose oracle calls a server taking 64 images per request splits, and the budget of the key the first run
#: uses: it runs out in the middle of a call, after the call's first request was answered.
API_ATTACKS = {
    "knockoff": (dict(budget=320, batch_size=64, query_batch_size=128, max_epochs=1), 192),
    "jbda": (dict(seed_size=40, rounds=2, epochs_per_round=1, batch_size=128, budget=160), 144),
    "dfme": (dict(budget=600, batch_size=48, steps_per_epoch=3, max_epochs=10, clone_steps=2, latent_dim=16), 256),
    "maze": (dict(budget=600, batch_size=32, steps_per_epoch=3, max_epochs=10, clone_steps=2, directions=2,
                  replay_steps=3, latent_dim=16), 224),
}


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    """A real prediction API (64 images per request) with two keys per attack: one that runs out, one to re-run with."""
    from edm_lightning.models import EnsembleModule
    from edm_lightning.serve import add_client
    from tests.helpers.files import save_checkpoint
    from tests.helpers.server import Server

    folder = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(EnsembleModule(num_members=3), folder / "edm.ckpt")
    keys = {f"{name}-{run}": add_client(folder / "clients.yaml", f"{name}-{run}", budget)
            for name, (_, first) in API_ATTACKS.items() for run, budget in (("first", first), ("again", 10_000))}
    server = Server(str(checkpoint), folder, keys)
    server.start()
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


@pytest.mark.parametrize("name", API_ATTACKS)
def test_through_the_api_a_call_refused_part_way_keeps_what_the_server_answered(name, api_server, fake_data, monkeypatch,
                                                                                tmp_path):
    """The issue's example: a 429 after 1,424 rows dropped the 400 rows the failing call had already been answered, and
    the re-run bought them again (3,400 rows for a budget of 3,000). The server's own count is the ground truth."""
    from edm_lightning.attacks import RemoteVictimConfig, datamodule

    monkeypatch.setattr(datamodule, "victim_labels",  # the experimenter's evaluation labels are not the attack's queries
                        lambda victim, images, batch_size=1024: torch.zeros(len(images), dtype=torch.long))
    settings, first = API_ATTACKS[name]
    entry = ATTACKS.get(name)
    common = dict(dataset="fashionmnist", root=str(tmp_path), cache_dir=str(tmp_path / "cache"), test_size=16, seed=0,
                  **settings)

    def victim(run: str) -> RemoteVictimConfig:
        return RemoteVictimConfig(api_server.url, api_key=api_server.keys[f"{name}-{run}"])

    with pytest.raises(RemoteError, match="429"):
        entry.build(victim("first"), **common).run({"accelerator": "cpu"})
    assert api_server.spent(f"{name}-first") == first  # the key ran out in the middle of a call
    figures = entry.build(victim("again"), **common).run({"accelerator": "cpu"})
    answered = api_server.spent(f"{name}-first") + api_server.spent(f"{name}-again")
    assert figures["queries"] == answered <= settings["budget"], f"{name}: {answered} answered, {figures['queries']} counted"
    assert figures["queries_this_run"] == api_server.spent(f"{name}-again")


@pytest.mark.parametrize("state", [{"queries_spent": -5}, {"queries_spent": 2.5}, {"queries_spent": "300"}, [300]],
                         ids=["negative", "fraction", "text", "not a mapping"])
def test_a_checkpoints_damaged_attack_state_is_refused(state, fake_data, tmp_path):
    """A resumed run is charged what its checkpoint says was spent: a damaged count is refused, never trusted."""
    from edm_lightning.attacks import DataFreeDataModule

    attack = DataFreeDataModule(linear_victim(), root=str(tmp_path), budget=300, batch_size=16,
                                cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="checkpoint's attack state"):
        attack.load_state_dict(state)
    attack.load_state_dict({"queries_spent": 120})
    assert attack.queries_spent == 120
