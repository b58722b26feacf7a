"""Output-perturbation defenses: each against its paper's formula, valid probabilities always, bad strengths refused."""

import math

import pytest
import torch
from torch import nn

from edm_lightning.defense.postprocessors import (
    AdaptiveMisinformation,
    PredictionPoisoning,
    ReverseSigmoid,
    Rounding,
    TopLabel,
    build_postprocessor,
)
from edm_lightning.errors import ConfigError
from edm_lightning.losses import misinformation_loss

SHAPE = (1, 8, 8)
K = 5


def tiny_net(classes: int = K, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, classes))


def random_probs(n: int, k: int = K, seed: int = 0) -> torch.Tensor:
    """Probability vectors from flat to nearly one-hot, with exact zeros and ties among them."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1.5, n).unsqueeze(1)
    probs = (torch.randn(n, k, generator=g) * scale).softmax(dim=-1)
    probs[0] = 1.0 / k
    probs[1] = nn.functional.one_hot(torch.tensor(2), k).float()
    return probs


def x_for(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


ALL = {
    "top1": lambda: TopLabel(),
    "round0": lambda: Rounding(0),
    "round1": lambda: Rounding(1),
    "round3": lambda: Rounding(3),
    "rs-weak": lambda: ReverseSigmoid(0.1, 0.5),
    "rs-strong": lambda: ReverseSigmoid(3.0, 4.0),
    "mad-l1": lambda: PredictionPoisoning(0.8, tiny_net()),
    "mad-l2": lambda: PredictionPoisoning(1.4, tiny_net(), norm="l2"),
    "mad-argmax": lambda: PredictionPoisoning(2.0, tiny_net(), preserve_argmax=True),
    "mad-all": lambda: PredictionPoisoning(0.3, tiny_net(), gradient_params="all"),
    "am-soft": lambda: AdaptiveMisinformation(0.6, 5.0, tiny_net(seed=1)),
    "am-sharp": lambda: AdaptiveMisinformation(0.9, 1000.0, tiny_net(seed=1)),
}


@pytest.mark.parametrize("name", ALL)
def test_answers_are_valid_probability_vectors_over_random_inputs(name):
    post, probs, x = ALL[name](), random_probs(400), x_for(400)
    with torch.no_grad():
        out = post(x, probs)
    assert out.shape == probs.shape and out.dtype == probs.dtype
    assert torch.isfinite(out).all() and (out >= 0).all()
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(400), atol=1e-5, rtol=0)
    assert post(x[:0], probs[:0]).shape == (0, K)


def test_top_label_is_the_one_hot_argmax():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert torch.equal(TopLabel()(None, probs), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_rounding_rounds_then_renormalises():
    probs = torch.tensor([[0.123, 0.456, 0.421], [0.333, 0.333, 0.334], [0.4, 0.35, 0.25]])
    torch.testing.assert_close(Rounding(1)(None, probs)[0], torch.tensor([0.1, 0.5, 0.4]))
    torch.testing.assert_close(Rounding(2)(None, probs)[1], torch.tensor([0.33, 0.33, 0.33]) / 0.99)
    assert torch.equal(Rounding(0)(None, probs[:1]), torch.tensor([[0.0, 1.0, 0.0]]))  # all round to 0: top-1 label
    assert torch.equal(Rounding(0)(None, torch.tensor([[0.2, 0.7, 0.1]])), torch.tensor([[0.0, 1.0, 0.0]]))


def test_reverse_sigmoid_follows_lee_et_al_equations_3_and_4():
    y = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    beta, gamma = 0.4, 2.0

    def sig(z):
        return 1 / (1 + math.exp(-z))

    r = [beta * (sig(gamma * math.log(v / (1 - v))) - 0.5) for v in y[0].tolist()]
    unnormalised = [v - ri for v, ri in zip(y[0].tolist(), r)]
    expected = torch.tensor([[u / sum(unnormalised) for u in unnormalised]], dtype=torch.float64)
    torch.testing.assert_close(ReverseSigmoid(beta, gamma)(None, y), expected)
    assert ReverseSigmoid(beta, gamma)(None, y)[0, 0] < 0.7  # the top class loses mass
    torch.testing.assert_close(ReverseSigmoid(0.0, gamma)(None, y), y)  # beta = 0: unchanged


def test_reverse_sigmoid_clamps_negative_entries_before_normalising():
    y = torch.tensor([[0.9, 0.05, 0.05]], dtype=torch.float64)
    out = ReverseSigmoid(3.0, 1.0)(None, y)  # 0.9 - 3 * (0.9 - 0.5) = -0.3 -> clamped to 0
    assert out[0, 0] == 0
    torch.testing.assert_close(out[0, 1:], torch.tensor([0.5, 0.5], dtype=torch.float64))


def explicit_jacobian(net: nn.Module, x: torch.Tensor, last_only: bool = True) -> torch.Tensor:
    """G (K, D) for one input by plain autograd, one backward per class: the reference for MAD's Gram trick."""
    params = [p for p in net.parameters() if p.ndim >= 2][-1:] if last_only else list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    log_probs = net(x.unsqueeze(0)).log_softmax(dim=-1)[0]
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(log_probs[k], params, retain_graph=True)])
            for k in range(len(log_probs))]
    return torch.stack(rows).double()


def angular_deviation(G: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    u, v = G.T @ a, G.T @ b
    return float((u / u.norm() - v / v.norm()).norm() ** 2)


@pytest.mark.parametrize("last_only", [True, False])
def test_mad_picks_the_vertex_of_largest_angular_deviation_and_spends_exactly_epsilon(last_only):
    net, x, y = tiny_net(), x_for(6), random_probs(6, seed=3).double()[2:]
    mad = PredictionPoisoning(0.3, tiny_net(), gradient_params="last" if last_only else "all")
    with torch.no_grad():
        out = mad(x[2:], y)
    for i in range(len(y)):
        G = explicit_jacobian(net, x[2 + i], last_only)
        scores = [angular_deviation(G, torch.eye(K, dtype=torch.float64)[k], y[i]) for k in range(K)]
        target = torch.eye(K, dtype=torch.float64)[max(range(K), key=scores.__getitem__)]
        step = min(1.0, 0.3 / float((target - y[i]).abs().sum()))
        torch.testing.assert_close(out[i], y[i] + step * (target - y[i]))
        assert float((out[i] - y[i]).abs().sum()) == pytest.approx(0.3)


@pytest.mark.parametrize("norm, epsilon", [("l1", 0.05), ("l1", 0.5), ("l1", 2.0), ("l2", 0.1), ("l2", 1.0)])
@pytest.mark.parametrize("preserve_argmax", [False, True])
def test_mad_respects_its_utility_constraint(norm, epsilon, preserve_argmax):
    probs, x = random_probs(300, seed=4), x_for(300)
    out = PredictionPoisoning(epsilon, tiny_net(), norm=norm, preserve_argmax=preserve_argmax)(x, probs)
    distance = torch.linalg.vector_norm(out.double() - probs.double(), ord=1 if norm == "l1" else 2, dim=-1)
    assert (distance <= epsilon + 1e-6).all()
    assert (distance > 0).float().mean() > 0.9  # it does perturb
    if preserve_argmax:
        assert torch.equal(out.argmax(dim=-1)[2:], probs.argmax(dim=-1)[2:])  # rows 0 (a tie) and 1 aside
    else:
        assert (out.argmax(dim=-1) != probs.argmax(dim=-1)).any()  # the unconstrained variant flips labels at this budget...
        assert epsilon < 1 or (out.argmax(dim=-1) != probs.argmax(dim=-1)).float().mean() > 0.3


def test_mad_argmax_preserving_searches_every_class_set_containing_the_top_class():
    net, x, y = tiny_net(), x_for(3, seed=5), random_probs(3, seed=6).double()
    out = PredictionPoisoning(2.0, tiny_net(), preserve_argmax=True)(x, y)  # budget 2: the vertex itself
    for i in range(len(y)):
        G, top = explicit_jacobian(net, x[i]), int(y[i].argmax())
        best = -1.0
        for mask in range(2**K):
            members = [k for k in range(K) if mask >> k & 1]
            if top not in members:
                continue
            v = torch.zeros(K, dtype=torch.float64)
            v[members] = 1
            v[top] += 1e-5
            best = max(best, angular_deviation(G, v / v.sum(), y[i]))
        assert angular_deviation(G, out[i], y[i]) == pytest.approx(best, rel=1e-6)


def test_mad_argmax_greedy_search_for_many_classes_keeps_the_label():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    probs, x = random_probs(40, k=16, seed=7), x_for(40)
    out = PredictionPoisoning(1.0, net, preserve_argmax=True)(x, probs)
    assert torch.equal(out.argmax(dim=-1)[2:], probs.argmax(dim=-1)[2:])
    assert ((out - probs).abs().sum(dim=-1) <= 1.0 + 1e-6).all()
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(40), atol=1e-5, rtol=0)


def test_mad_works_inside_inference_mode_as_lightning_evaluates():
    with torch.inference_mode():
        out = PredictionPoisoning(0.5, tiny_net())(x_for(4), random_probs(4))
    assert (out - random_probs(4)).abs().sum(dim=-1).max() == pytest.approx(0.5, abs=1e-5)


def test_mad_fresh_proxy_is_seeded():
    a = PredictionPoisoning(0.5, None, num_classes=10, input_shape=(1, 28, 28), seed=3)
    b = PredictionPoisoning(0.5, None, num_classes=10, input_shape=(1, 28, 28), seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_adaptive_misinformation_follows_kariyappa_and_qureshi():
    mis = tiny_net(seed=1)
    x = x_for(3)
    y = torch.tensor([[0.96, 0.01, 0.01, 0.01, 0.01], [0.4, 0.3, 0.1, 0.1, 0.1], [0.2] * 5])
    tau, nu = 0.7, 20.0
    out = AdaptiveMisinformation(tau, nu, mis)(x, y)
    with torch.no_grad():
        y_mis = mis(x).softmax(dim=-1)
    a = torch.sigmoid(nu * (tau - y.max(dim=-1, keepdim=True).values))
    torch.testing.assert_close(out, (1 - a) * y + a * y_mis)
    assert a[0] < 0.01 and a[2] > 0.99  # confident (in-distribution) answers kept, unsure ones replaced


def test_misinformation_loss_is_minus_log_of_the_wrong_classes_mass():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    p = logits.softmax(dim=-1)
    expected = -(torch.log(1 - p[0, 0]) + torch.log(1 - p[1, 2])) / 2
    torch.testing.assert_close(misinformation_loss(logits, targets), expected)
    assert torch.isfinite(misinformation_loss(torch.tensor([[80.0, 0.0]]), torch.tensor([0])))  # 1 - p underflows


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Rounding(-1), "decimals must be an integer >= 0"),
        (lambda: Rounding(1.5), "decimals must be an integer >= 0"),
        (lambda: ReverseSigmoid(-0.1), r"beta \(strength\) must be a finite number >= 0"),
        (lambda: ReverseSigmoid(math.inf), r"beta \(strength\) must be a finite number >= 0, got inf"),
        (lambda: ReverseSigmoid(0.5, 0.0), "gamma .* must be a finite number > 0"),
        (lambda: ReverseSigmoid(0.5, math.nan), "gamma .* must be a finite number > 0, got nan"),
        (lambda: PredictionPoisoning(-0.1, tiny_net()), r"epsilon .* must be in \[0, 2\]"),
        (lambda: PredictionPoisoning(1.5, tiny_net(), norm="l2"), r"must be in \[0, 1.414\]"),
        (lambda: PredictionPoisoning(0.1, tiny_net(), norm="linf"), "norm must be 'l1' or 'l2'"),
        (lambda: PredictionPoisoning(0.1, None), "fresh proxy .* needs num_classes"),
        (lambda: PredictionPoisoning(0.1, tiny_net(classes=3), num_classes=K, input_shape=SHAPE), "predicts 3 classes"),
        (lambda: AdaptiveMisinformation(-0.1, 10.0, tiny_net()), r"tau .* must be in \[0, 1\], got -0.1"),
        (lambda: AdaptiveMisinformation(0.5, 0.0, tiny_net()), "nu .* must be a finite number > 0"),
        (lambda: AdaptiveMisinformation(0.5, math.inf, tiny_net()), "nu .* must be a finite number > 0, got inf"),
        (lambda: AdaptiveMisinformation(math.nan, 10.0, tiny_net()), r"tau .* must be in \[0, 1\], got nan"),
        (lambda: AdaptiveMisinformation(0.5, 10.0, tiny_net(classes=7), num_classes=K, input_shape=SHAPE),
         "predicts 7 classes but the victim 5"),
    ],
)
def test_bad_parameters_fail_at_construction_with_the_expected_range(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_missing_misinformation_checkpoint_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. Train it first"):
        AdaptiveMisinformation(0.5, 10.0, str(tmp_path / "missing.ckpt"))


def test_class_count_is_linked_from_the_victim(checkpoint_factory):
    from edm_lightning.models import MisinformationModule

    ckpt = checkpoint_factory(MisinformationModule("lenet5", num_classes=4, input_shape=(1, 28, 28)), "mis.ckpt")
    spec = {"class_path": "AdaptiveMisinformation", "init_args": {"tau": 0.5, "nu": 10.0, "misinformation_model": ckpt}}
    assert build_postprocessor(spec, 4, (1, 28, 28)).tau == 0.5
    with pytest.raises(ConfigError, match="predicts 4 classes but the victim 10"):
        build_postprocessor(spec, 10, (1, 28, 28))
    with pytest.raises(ConfigError, match="unknown post-processor 'Sharpen'"):
        build_postprocessor({"class_path": "Sharpen"}, 10, (1, 28, 28))
    with pytest.raises(ConfigError, match="Its arguments: beta, gamma"):
        build_postprocessor({"class_path": "ReverseSigmoid", "init_args": {"strength": 1}}, 10, (1, 28, 28))


def test_misinformation_config_trains_a_model_that_avoids_the_true_class(fake_root, tmp_path):
    from edm_lightning.cli import main
    from tests.helpers.files import localise_config

    config = localise_config("configs/misinformation.yaml", tmp_path, fake_root)
    cli = main(["fit", "--config", str(config), "--data.init_args.batch_size", "16", "--data.init_args.val_size", "40",
                "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "10", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    assert cli.trainer.callback_metrics["val/acc"] < 0.05  # its argmax is (almost) never the true class
    best = tmp_path / "runs/misinformation/checkpoints/best.ckpt"
    am = build_postprocessor({"class_path": "AdaptiveMisinformation",
                              "init_args": {"tau": 0.5, "nu": 100.0, "misinformation_model": str(best)}}, 10, (1, 28, 28))
    assert isinstance(am.misinformation_model, nn.Sequential)


# Compositions: post-processors named in VictimConfig, applied in the configured order.

SPECS = {
    "rs": {"class_path": "ReverseSigmoid", "init_args": {"beta": 0.8, "gamma": 1.0}},
    "round": {"class_path": "edm_lightning.defense.postprocessors.Rounding", "init_args": {"decimals": 1}},
    "top1": {"class_path": "edm_lightning.defense.postprocessors.TopLabel"},
}


@pytest.fixture
def target_checkpoint(checkpoint_factory):
    from edm_lightning.models import ClassifierModule

    torch.manual_seed(0)
    return checkpoint_factory(ClassifierModule(), "target.ckpt")


def test_compositions_apply_in_the_configured_order(target_checkpoint):
    from edm_lightning.defense import VictimConfig

    x = torch.rand(64, 1, 28, 28)
    plain = VictimConfig(target_checkpoint).build()(x)
    rs_then_top1 = VictimConfig(target_checkpoint, postprocessors=[SPECS["rs"], SPECS["top1"]]).build()
    top1_then_rs = VictimConfig(target_checkpoint, postprocessors=[SPECS["top1"], SPECS["rs"]]).build()
    three = VictimConfig(target_checkpoint, postprocessors=[SPECS["rs"], SPECS["round"], SPECS["top1"]]).build()
    rs, rounding, top1 = ReverseSigmoid(0.8, 1.0), Rounding(1), TopLabel()
    torch.testing.assert_close(rs_then_top1(x), top1(x, rs(x, plain)))
    torch.testing.assert_close(top1_then_rs(x), rs(x, top1(x, plain)))
    torch.testing.assert_close(three(x), top1(x, rounding(x, rs(x, plain))))
    assert not torch.allclose(rs_then_top1(x), top1_then_rs(x))  # the order is not a detail


def test_edm_plus_adaptive_misinformation_is_a_config_change(checkpoint_factory):
    from edm_lightning.defense import VictimConfig
    from edm_lightning.models import EnsembleModule, MisinformationModule

    torch.manual_seed(0)
    edm = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    mis = MisinformationModule()
    mis_ckpt = checkpoint_factory(mis, "mis.ckpt")
    am = {"class_path": "AdaptiveMisinformation", "init_args": {"tau": 0.9, "nu": 50.0, "misinformation_model": mis_ckpt}}
    x = torch.rand(32, 1, 28, 28)
    alone = VictimConfig(edm, router="keyed", key="k").build()
    composed = VictimConfig(edm, router="keyed", key="k", postprocessors=[am]).build()
    torch.testing.assert_close(composed(x), AdaptiveMisinformation(0.9, 50.0, mis.net)(x, alone(x)))
    assert not torch.allclose(composed(x), alone(x))


def test_a_misspelt_postprocessor_fails_when_the_config_is_made(target_checkpoint):
    from edm_lightning.defense import VictimConfig

    with pytest.raises(ConfigError, match=r"postprocessors\[1\]: unknown post-processor 'ReverseSigmiod'"):
        VictimConfig(target_checkpoint, postprocessors=[SPECS["rs"], {"class_path": "ReverseSigmiod"}])
    with pytest.raises(ConfigError, match=r"beta \(strength\) must be a finite number >= 0"):
        VictimConfig(target_checkpoint, postprocessors=[{"class_path": "ReverseSigmoid", "init_args": {"beta": -1}}]).build()
    # a dict made in code (the experiment's) skips the config's parse: the builder checks it alike, not a TypeError
    for init_args, message in (({"beta": 0.3, "gamma": "strong"}, r"\(ReverseSigmoid\): .*gamma.*Expected a <class 'float'>"),
                               ({"beta": 0.3, "gama": 1.0}, r"\(ReverseSigmoid\): Option 'gama' is not accepted"),
                               ({"beta": 0.3, "gamma": None}, r"\(ReverseSigmoid\): .*gamma.*Got value: None")):
        with pytest.raises(ConfigError, match=r"postprocessors\[0\] " + message):
            build_postprocessor({"class_path": "ReverseSigmoid", "init_args": init_args}, 10, (1, 28, 28))


def test_postprocessors_are_part_of_the_attack_cache_key(target_checkpoint, tmp_path):
    """A transfer set bought from the undefended target must never be reused against the defended one."""
    from edm_lightning.attacks import KnockoffDataModule
    from edm_lightning.defense import VictimConfig

    def cache(*specs):
        victim = VictimConfig(target_checkpoint, postprocessors=list(specs))
        return KnockoffDataModule(victim, root=str(tmp_path), cache_dir=str(tmp_path), budget=256).cache_path

    assert len({cache(), cache(SPECS["rs"]), cache(SPECS["round"]), cache(SPECS["rs"], SPECS["round"]),
                cache(SPECS["round"], SPECS["rs"])}) == 5
    assert cache(SPECS["rs"]) == cache(SPECS["rs"])
