"""D-DAE: the meta-classifier names a defense from answers alone, the restorer undoes a known perturbation, bad settings
are refused with the allowed values, and the attack spends exactly the queries it reports (probes + transfer set)."""

from __future__ import annotations

import pytest
import torch

from edm_lightning.attacks import ATTACKS
from edm_lightning.attacks.ddae import DDAEDataModule, check_ddae
from edm_lightning.attacks.shadows import (
    NONE,
    detection_accuracy,
    parse_defenses,
    restoration_error,
    train_meta_classifier,
    train_restorer,
)
from edm_lightning.defense import ReverseSigmoid, Rounding
from edm_lightning.errors import ConfigError
from tests.helpers.attacks import tiny_settings
from tests.helpers.victims import AnsweredThenKilled, CountingVictim, linear_victim


def softmax_rows(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> torch.Tensor:
    """Random answer rows, as confident as a trained classifier's on the pool."""
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).softmax(dim=-1)


def test_the_meta_classifier_tells_two_synthetic_defenses_apart_on_held_out_models():
    rounding = Rounding(decimals=1)
    clean = softmax_rows((12, 64, 10), seed=0)  # 12 models' answers on 64 probes
    answers = {NONE: clean, "Rounding(decimals=1)": rounding(None, softmax_rows((12, 64, 10), seed=1).flatten(0, 1))
               .view(12, 64, 10)}
    train = {label: a[:8] for label, a in answers.items()}
    reference = clean[:8].mean(dim=0)
    meta = train_meta_classifier(train, reference, steps=200, seed=0)
    accuracy = detection_accuracy(meta, {label: a[8:] for label, a in answers.items()}, reference)
    assert accuracy == {NONE: 1.0, "Rounding(decimals=1)": 1.0}


def test_the_restorer_undoes_a_known_perturbation_on_held_out_answers():
    defense = ReverseSigmoid(beta=0.7)
    clean = softmax_rows((3000, 10), seed=2)
    defended = defense(None, clean)
    restorer = train_restorer(defended[:2500], clean[:2500], steps=300, batch_size=128, seed=0)
    error = restoration_error(restorer, defended[2500:], clean[2500:])
    assert error["restored"] < 0.5 * error["left"], error
    restored = restorer(defended[2500:]).detach()
    assert torch.allclose(restored.sum(dim=-1), torch.ones(500), atol=1e-5) and (restored >= 0).all()


@pytest.mark.parametrize(("options", "message"), [
    ({"share": 0.0}, r"share .* must be in \(0, 1\]"),
    ({"share": 1.5}, r"share .* must be in \(0, 1\]"),
    ({"share": float("nan")}, r"share .* must be in \(0, 1\]"),
    ({"probes": 0}, "probes must be an integer >= 1"),
    ({"shadows": 3, "held_out": 3}, "held_out=3 must be smaller than shadows=3"),
    ({"probes": 900, "batch_size": 128}, "budget=1000 cannot pay the 900 probes and one transfer-set batch of 128"),
    ({"defenses": ["EDM", "Blur"]}, r"unknown candidate defense 'Blur': expected EDM, a post-processor \(.*Rounding"),
    ({"defenses": [{"class_path": "Rounding", "init_args": {"decimals": "two"}}]}, "Rounding.*decimals"),
    ({"defenses": [{"class_path": "AdaptiveMisinformation", "init_args": {"tau": 0.5, "nu": 10.0,
                                                                          "misinformation_model": "m.ckpt"}}]},
     "the shadow kit supplies its own"),
    ({"defenses": ["EDM", "EDM"]}, "listed twice"),
    ({"defenses": []}, "non-empty list"),
    ({"shadow_epochs": 0}, "shadow_epochs must be an integer >= 1"),  # the kit's settings too, before any stage
    ({"edm_members": 1}, "edm_members must be an integer >= 2"),
    ({"kit_steps": 2.5}, "kit_steps must be an integer >= 1"),
])
def test_bad_settings_are_refused_before_anything_is_built_with_the_allowed_values(options, message):
    with pytest.raises(ConfigError, match=message):
        ATTACKS.get("ddae").check(1000, options)


def test_the_default_candidates_are_edm_and_every_published_defense():
    names = [candidate.name for candidate in check_ddae(50_000, {})]
    assert names[0] == "EDM" and {"ReverseSigmoid", "Rounding", "PredictionPoisoning", "AdaptiveMisinformation",
                                  "TopLabel"} == {name.split("(")[0] for name in names[1:]}
    assert [c.name for c in parse_defenses(["TopLabel"])] == ["TopLabel"]


def common(tmp_path) -> dict:
    return dict(dataset="fashionmnist", root=str(tmp_path), cache_dir=str(tmp_path / "cache"), seed=0,
                **tiny_settings("ddae"))


def test_it_spends_exactly_the_queries_it_reports_probes_plus_transfer_set(fake_data, tmp_path):
    settings = common(tmp_path)
    victim = CountingVictim(linear_victim())
    figures = ATTACKS.get("ddae").run(victim, trainer={"accelerator": "cpu"}, **settings)
    answered = victim.rows - 300  # the evaluation labels (300 test images) are computed directly, not as queries
    assert figures["queries"] == answered == figures["probe_queries"] + figures["transfer_queries"] == settings["budget"]
    assert figures["probe_queries"] == settings["probes"]
    assert figures["transfer_set"] == settings["budget"] - settings["probes"]
    assert figures["detected_defense"] in figures["detection_scores"]
    assert set(figures["detection_accuracy"]) == {NONE, *figures["restoration_error"]}
    assert "EDM" in figures["restoration_error"]


def test_knockoff_at_the_same_budget_shares_the_purchase_and_ddae_buys_only_its_probes(fake_data, tmp_path):
    settings = common(tmp_path)
    knockoff = {k: v for k, v in settings.items() if k in ("dataset", "root", "cache_dir", "seed", "budget",
                                                             "batch_size", "query_batch_size")}
    victim = CountingVictim(linear_victim())
    ATTACKS.get("knockoff").run(victim, trainer={"accelerator": "cpu"}, max_epochs=1, **knockoff)
    before = victim.rows
    figures = ATTACKS.get("ddae").run(victim, trainer={"accelerator": "cpu"}, **settings)
    assert victim.rows - before - 300 == settings["probes"] == figures["queries_this_run"]
    assert figures["queries"] == settings["budget"]


def test_a_kill_while_buying_the_probes_shrinks_the_transfer_set_never_the_budget(fake_data, tmp_path):
    settings = common(tmp_path)
    killed = AnsweredThenKilled(killed_in=3)  # call 1: evaluation labels; the probes take calls 2 and 3
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        ATTACKS.get("ddae").run(killed, trainer={"accelerator": "cpu"}, **settings)
    resumed = AnsweredThenKilled()
    figures = ATTACKS.get("ddae").run(resumed, trainer={"accelerator": "cpu"}, **settings)
    lost = killed.rows - 300 - settings["batch_size"]  # the answered batch whose reply was lost
    assert lost > 0 and figures["probe_queries"] == settings["probes"] + lost
    assert killed.rows + resumed.rows - 600 == figures["queries"] == settings["budget"]
    assert figures["transfer_set"] == settings["budget"] - settings["probes"] - lost


def test_a_shadow_kit_read_back_is_the_one_trained_and_a_damaged_one_is_refused(fake_data, tmp_path):
    settings = common(tmp_path)
    first = ATTACKS.get("ddae").build(CountingVictim(linear_victim()), **settings)
    datamodule, _ = first.build()
    datamodule.setup("fit")
    (path,) = (tmp_path / "cache").glob("ddae-kit-*.pt")
    again, _ = ATTACKS.get("ddae").build(CountingVictim(linear_victim(seed=1)), **settings).build()  # another victim
    again._attacker_share = None  # a cached kit reads no training images: calling this would fail
    again.setup("fit")
    assert again.kit.figures == datamodule.kit.figures and len(list((tmp_path / "cache").glob("ddae-kit-*.pt"))) == 1
    torch.save({"labels": ["none"]}, path)
    damaged, _ = ATTACKS.get("ddae").build(CountingVictim(linear_victim()), **settings).build()
    with pytest.raises(ConfigError, match=r"ddae-kit-.*delete it and the kit is trained again"):
        damaged.setup("fit")


def test_the_datamodule_refuses_ddp_before_it_trains_or_buys(fake_data, tmp_path):
    from types import SimpleNamespace

    datamodule, _ = ATTACKS.get("ddae").build(CountingVictim(linear_victim()), **common(tmp_path)).build()
    datamodule.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ConfigError, match="under DDP each of the 2 processes"):
        datamodule.setup("fit")
    assert datamodule.queries_spent == 0 and not list((tmp_path / "cache").glob("ddae-kit-*.pt"))
    assert isinstance(datamodule, DDAEDataModule)


def test_assume_defense_restores_with_the_named_restorer_whatever_the_detection(fake_data, tmp_path):
    with pytest.raises(ConfigError, match=r"assume_defense='Blur' is not a candidate of the kit: expected one of none, EDM"):
        ATTACKS.get("ddae").build(CountingVictim(linear_victim()), assume_defense="Blur", **common(tmp_path)).build()
    datamodule, _ = ATTACKS.get("ddae").build(CountingVictim(linear_victim()), assume_defense="EDM",
                                              **common(tmp_path)).build()
    datamodule.setup("fit")
    bought = len(datamodule.transfer)
    restored = datamodule.kit.restore("EDM", datamodule.transfer.answers)
    torch.testing.assert_close(datamodule.train_set.tensors[1][:bought], restored.to(datamodule.train_set.tensors[1].dtype))
    assert not torch.allclose(restored, datamodule.transfer.answers.to(restored.dtype))  # it did restore something
    assert datamodule.figures()["restored_as"] == "EDM" and datamodule.figures()["detected_defense"] is not None
