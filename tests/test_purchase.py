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
from edm_lightning.errors import ConfigError
from tests.helpers.attacks import tiny_settings
from tests.helpers.victims import CountingVictim, linear_victim

#: Oracle calls each attack is killed in, after the victim answered it: early, and in its last stretch, where a
#: charged batch leaves less budget than the purchase was planned for (its tiny settings make several calls).
KILLED_IN = {"activethief": (3, 7), "knockoff": (3, 5), "jbda": (4, 6), "jbda_tr": (4, 6), "dfme": (3, 10),
             "maze": (3, 10)}


class AnsweredThenKilled(CountingVictim):
    """Answers every query (counting it), and dies right after answering its ``killed_in``-th call."""

    def __init__(self, killed_in: int | None = None):
        super().__init__(linear_victim())
        self.killed_in = killed_in

    def forward(self, x: Tensor) -> Tensor:
        answers = super().forward(x)
        if self.calls == self.killed_in:
            raise KeyboardInterrupt("killed after the victim answered")
        return answers


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


def test_a_prediction_api_failure_keeps_the_record_the_server_may_have_charged(tmp_path):
    from edm_lightning.attacks.remote import RemoteError

    class FailingAPI(AnsweredThenKilled):
        def forward(self, x: Tensor) -> Tensor:
            super().forward(x)  # the server answered (and charged) ...
            raise RemoteError(504, "gateway timeout")  # ... and the reply was lost on the way

    oracle = BlackBoxOracle(FailingAPI(), budget=10)
    with Purchase(tmp_path / "set.pt") as purchase:
        with pytest.raises(RemoteError):
            purchase.ask(oracle, torch.zeros(4, 1, 28, 28), items=0)
        assert purchase.take_pending() == {"items": 0, "queries": 4}  # charged to the next run, not forgotten


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
            purchase.ask(oracle, torch.zeros(4, 1, 28, 28), items=0)
        assert purchase.take_pending() == {"items": 0, "queries": 4}  # the victim may have answered: charged later
        with pytest.raises(Exception, match="query budget exceeded"):
            purchase.ask(oracle, torch.zeros(11, 1, 28, 28), items=0)
        assert purchase.take_pending() is None  # refused before the victim saw it: nothing to charge


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


@pytest.mark.parametrize("content", ['{"spent": -5}', "[]", "\x00\x01binary"])
def test_a_damaged_ledger_is_refused_with_its_name(tmp_path, content):
    path = tmp_path / "attack.ledger.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="attack.ledger.json"):
        _ = QueryLedger(path).spent


def test_a_pending_record_with_a_negative_count_is_refused(tmp_path):
    torch.save({"items": 0, "queries": -64}, tmp_path / "set.pt.pending")
    with Purchase(tmp_path / "set.pt") as purchase, pytest.raises(ConfigError, match="negative counts"):
        purchase.take_pending()
    assert (tmp_path / "set.pt.pending").is_file()  # left as it was, for the user to inspect
