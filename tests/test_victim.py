"""Victim: the routed member's softmax out, bad queries refused, checkpoints loaded or refused clearly."""

import re
import subprocess
import sys

import pytest
import torch
import yaml

from edm_lightning.defense import Victim, VictimConfig
from edm_lightning.errors import CheckpointNotFoundError
from edm_lightning.models import ClassifierModule, EnsembleModule, OptimConfig
from edm_lightning.nets import build_net
from edm_lightning.routing import FixedRouter, KeyedHashRouter
from tests.helpers.files import REPO_ROOT


@pytest.fixture
def defended():
    torch.manual_seed(0)
    members = [build_net("lenet5", (1, 28, 28), 10).eval() for _ in range(3)]
    return Victim(members, KeyedHashRouter(3, "secret"), (1, 28, 28), 10)


def test_output_equals_the_chosen_members_softmax(defended):
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    probs = defended(x)
    route = defended.router(x)
    assert len(route.unique()) > 1  # several members answer this batch
    with torch.no_grad():
        expected = torch.stack([defended.members[int(m)](x[i : i + 1])[0].softmax(-1) for i, m in enumerate(route)])
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(32))


def test_empty_batch_gives_an_empty_answer(defended):
    assert defended(torch.rand(0, 1, 28, 28)).shape == (0, 10)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(1, 28, 28), "rank 3"),
        (torch.rand(2, 3, 28, 28), "1 channel"),
        (torch.rand(2, 1, 32, 32), r"shape \(N, 1, 28, 28\)"),
        (torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8), "floating point"),
        (torch.full((2, 1, 28, 28), float("nan")), "NaN or Inf"),
        (torch.full((2, 1, 28, 28), float("inf")), "NaN or Inf"),
        (torch.rand(2, 1, 28, 28) * 255, r"must lie in \[0.0, 1.0\]"),
        (torch.rand(2, 1, 28, 28) - 0.5, r"must lie in \[0.0, 1.0\]"),
    ],
)
def test_bad_queries_are_refused_with_what_was_expected(defended, x, message):
    with pytest.raises(ValueError, match=message):
        defended(x)


@pytest.fixture
def ensemble_checkpoint(checkpoint_factory):
    torch.manual_seed(0)
    return checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")


def test_an_ensemble_of_more_than_ten_members_loads_with_every_member_in_order(checkpoint_factory):
    module = EnsembleModule(arch="small_cnn", num_members=12)
    path = checkpoint_factory(module, "edm12.ckpt")
    model = VictimConfig(path, router="fixed", member=11).build()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), module.members[11](x).softmax(-1))


@pytest.mark.parametrize("router, member", [("fixed", 2), ("keyed", 0)])
def test_ensemble_checkpoint_is_served_behind_the_configured_router(ensemble_checkpoint, router, member):
    model = VictimConfig(ensemble_checkpoint, router=router, member=member, key="k").build()
    module = EnsembleModule.load_from_checkpoint(ensemble_checkpoint)
    x = torch.rand(16, 1, 28, 28)
    route = model.router(x)
    with torch.no_grad():
        expected = module(x).softmax(-1)[route, torch.arange(16)]
    torch.testing.assert_close(model(x), expected)
    assert (model.input_shape, model.num_classes, len(model.members)) == ((1, 28, 28), 10, 3)
    if router == "fixed":
        assert (route == 2).all()


def test_ensemble_with_the_neural_router(ensemble_checkpoint, checkpoint_factory):
    hash_ckpt = checkpoint_factory(ClassifierModule(), "hash.ckpt")
    model = VictimConfig(ensemble_checkpoint, router="neural", hash_checkpoint=hash_ckpt).build()
    assert model(torch.rand(8, 1, 28, 28)).shape == (8, 10)


def test_neural_router_without_hash_checkpoint_fails_clearly(ensemble_checkpoint):
    with pytest.raises(ValueError, match="hash_checkpoint.*configs/hashnet.yaml"):
        VictimConfig(ensemble_checkpoint, router="neural").build()


def test_member_outside_the_ensemble_is_refused(ensemble_checkpoint):
    with pytest.raises(ValueError, match=r"member must be in \[0, 3\).*got 3"):
        VictimConfig(ensemble_checkpoint, member=3).build()


def test_checkpoint_whose_member_count_disagrees_with_its_weights_names_both(checkpoint_factory):
    path = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt", num_members=5)
    with pytest.raises(ValueError, match="num_members=5.*3 members"):
        VictimConfig(path).build()


@pytest.mark.parametrize("field, value", [("num_classes", 26), ("arch", "resnet18")])
def test_checkpoint_whose_architecture_or_classes_disagree_with_its_weights_names_both(checkpoint_factory, field, value):
    path = checkpoint_factory(EnsembleModule(num_members=2), "edm.ckpt", **{field: value})
    with pytest.raises(ValueError, match=f"{field}={value!r}.*but its weights have"):
        VictimConfig(path).build()


def test_configured_ensemble_refuses_a_checkpoint_of_another_shape(ensemble_checkpoint):
    checkpoint = torch.load(ensemble_checkpoint, weights_only=False)
    with pytest.raises(ValueError, match="num_members: checkpoint 3, config 5"):
        EnsembleModule(num_members=5).on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="num_classes: checkpoint 10, config 26"):
        EnsembleModule(num_members=3, num_classes=26).on_load_checkpoint(checkpoint)


def test_configured_ensemble_refuses_a_single_target_checkpoint(checkpoint_factory):
    target = torch.load(checkpoint_factory(ClassifierModule(), "target.ckpt"), weights_only=False)
    with pytest.raises(ValueError, match="not an EDM ensemble.*num_members=5"):
        EnsembleModule().on_load_checkpoint(target)


def test_single_target_checkpoint_still_loads_with_a_fixed_router(checkpoint_factory):
    model = VictimConfig(checkpoint_factory(ClassifierModule(), "target.ckpt")).build()
    assert isinstance(model.router, FixedRouter) and len(model.members) == 1
    with pytest.raises(ValueError, match="single-model checkpoint"):
        VictimConfig(checkpoint_factory(ClassifierModule(), "target.ckpt"), router="keyed").build()


def test_a_float64_batch_is_checked_as_sent_and_answered_like_float32(defended):
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(defended(x.double()), defended(x))
    with pytest.raises(ValueError, match=r", 1\.0000001\]$"):  # checked as sent, before a cast could round it
        defended(torch.cat([x.double(), torch.full((1, 1, 28, 28), 1.0000001, dtype=torch.float64)]))


def test_values_out_of_range_are_shown_at_full_precision(defended):
    x = torch.zeros(2, 1, 28, 28)
    x[0, 0, 0, 0] = 1.0000001  # float32 rounds it to 1.00000012
    with pytest.raises(ValueError, match=r"got \[0\.0, 1\.0000001192092896\]"):
        defended(x)


@pytest.mark.parametrize("query", [torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)).numpy(),
                                   [[0.5] * 28] * 28, None, torch.empty(2, 1, 28, 28, device="meta")],
                         ids=["numpy", "list", "None", "meta"])
def test_what_is_not_a_batch_of_real_images_is_refused_clearly(defended, query):
    with pytest.raises(ValueError, match="torch.Tensor|meta device"):
        defended(query)


def test_a_large_call_is_answered_in_chunks_with_the_same_answers(defended):
    x = torch.rand(50, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    whole = defended(x)
    defended.chunk_size = 7
    seen = []
    hook = defended.router.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    torch.testing.assert_close(defended(x), whole)
    hook.remove()
    assert max(seen) == 7 and sum(seen) == 50


def test_a_member_with_non_finite_answers_is_refused_by_name():
    torch.manual_seed(0)
    members = [build_net("lenet5", (1, 28, 28), 10).eval() for _ in range(2)]
    with torch.no_grad():
        members[1][1].classifier[-1].bias.fill_(float("nan"))
    model = Victim(members, FixedRouter(2, member=1), (1, 28, 28), 10)
    with pytest.raises(RuntimeError, match="member 1 produced non-finite answers for 4 of its 4 queries"):
        model(torch.rand(4, 1, 28, 28))


def test_the_public_api_loads_a_trained_checkpoint_in_a_fresh_interpreter(checkpoint_factory):
    """Hyper-parameters hold an OptimConfig: reading them must not depend on the training code being imported."""
    path = checkpoint_factory(ClassifierModule(optim=OptimConfig(name="sgd", lr=0.05)))
    code = ("import sys, torch, edm_lightning; victim = edm_lightning.VictimConfig(sys.argv[1]).build(); "
            "assert 'edm_lightning.models' not in sys.modules; print(tuple(victim(torch.rand(2, 1, 28, 28)).shape))")
    result = subprocess.run([sys.executable, "-c", code, path], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(2, 10)"


def test_every_missing_checkpoint_of_a_victim_is_named_at_once_with_the_config_that_trains_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the shipped configs' runs/... paths, read from a folder where nothing is trained
    config = VictimConfig("runs/edm/checkpoints/best.ckpt", router="neural",
                          hash_checkpoint="runs/hashnet/checkpoints/best.ckpt",
                          postprocessors=[{"class_path": "AdaptiveMisinformation", "init_args": {
                              "tau": 0.5, "nu": 1000.0, "misinformation_model": "runs/misinformation/checkpoints/best.ckpt"}}])
    with pytest.raises(CheckpointNotFoundError) as error:
        config.build()
    message = str(error.value)
    assert "Victim checkpoint 'runs/edm/checkpoints/best.ckpt' does not exist. Train it first (python main.py fit " \
           "--config configs/edm.yaml)." in message
    assert "Hash network checkpoint 'runs/hashnet/checkpoints/best.ckpt' does not exist. Train it first (python " \
           "main.py fit --config configs/hashnet.yaml)." in message
    assert "(python main.py fit --config configs/misinformation.yaml)" in message and "..." not in message


def test_a_missing_checkpoint_beside_its_jobs_config_names_that_config(tmp_path):
    """An experiment stage's checkpoint is written by the config.yaml beside it."""
    stage = tmp_path / "edm-1234"
    stage.mkdir()
    (stage / "config.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(stage), "filename": "best", "monitor": "val/acc", "save_last": True}}]}}))
    for name in ("best.ckpt", "last.ckpt"):
        with pytest.raises(CheckpointNotFoundError, match=re.escape(f"(python main.py fit --config {stage / 'config.yaml'})")):
            VictimConfig(str(stage / name)).build()


def test_a_missing_checkpoint_no_config_writes_is_shown_beside_those_they_do(tmp_path):
    """A misinformation model at a path of the user's (a typo, say): the message lists the files the configs write."""
    from edm_lightning.defense.postprocessors import AdaptiveMisinformation

    with pytest.raises(CheckpointNotFoundError) as error:
        AdaptiveMisinformation(tau=0.5, nu=1000.0, misinformation_model=str(tmp_path / "misinformation.ckpt"))
    message = str(error.value)
    assert "runs/misinformation/checkpoints/best.ckpt (configs/misinformation.yaml)" in message, message
    assert "runs/baseline/checkpoints/best.ckpt (configs/baseline.yaml)" in message and "..." not in message
