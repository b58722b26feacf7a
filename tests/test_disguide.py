"""DisGUIDE on a tiny synthetic victim: the generator learns to make the students disagree without asking the victim
anything; replay is free; the run spends exactly what it reports; bad settings are refused before any query."""

import pytest
import torch

from edm_lightning.attacks import ATTACKS, BlackBoxOracle
from edm_lightning.attacks.dfme import Generator, ReplayBuffer, to_images
from edm_lightning.attacks.disguide import DisGUIDEModule, SoftVote, generator_loss
from edm_lightning.attacks.run import run_attack
from edm_lightning.errors import ConfigError
from edm_lightning.nets import build_net
from tests.helpers.victims import EVAL_SIZE

#: One iteration: 16 x 2 clone steps = 32 queries (the generator's step and 2 replay steps are free); 200 pays for 6.
TINY = dict(budget=200, batch_size=16, steps_per_epoch=3, max_epochs=10, clone_steps=2, replay_steps=2, latent_dim=16)


def test_the_generator_loss_drives_the_students_apart_and_towards_every_class():
    torch.manual_seed(0)
    students = SoftVote([build_net("lenet5", (1, 28, 28), 10) for _ in range(2)]).eval().requires_grad_(False)
    generator = Generator(16, (1, 28, 28))
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    z = torch.randn(64, 16)

    def measured():
        with torch.no_grad():
            _, disagreement, diversity = generator_loss(students.student_logits(to_images(generator.eval()(z))), 0.0)
        return disagreement, diversity

    before = measured()
    for _ in range(30):
        generator.train()
        loss, _, _ = generator_loss(students.student_logits(to_images(generator(torch.randn(64, 16)))), 0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = measured()
    assert after[0] > 1.5 * before[0], (before, after)  # the students disagree more on the generator's samples
    assert after[1] >= before[1] - 0.05, (before, after)  # and the batch's classes stay spread


def test_the_diversity_term_spreads_the_batchs_classes():
    torch.manual_seed(0)
    logits = (torch.randn(8, 2, 10) * 0.1 + 4 * torch.nn.functional.one_hot(torch.zeros(8, 2).long(), 10)).requires_grad_()
    entropy = generator_loss(logits, 1.0)[2]
    optimizer = torch.optim.SGD([logits], lr=10.0)
    for _ in range(20):
        optimizer.zero_grad()
        generator_loss(logits, 1.0)[0].backward()
        optimizer.step()
    assert generator_loss(logits, 1.0)[2] > entropy + 0.5  # every input no longer votes for class 0


def test_generator_loss_is_the_negative_std_plus_the_weighted_negative_entropy():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]])  # (N=2, S=2, K=2)
    loss, disagreement, diversity = generator_loss(logits, 0.5)
    probs = logits.softmax(dim=-1)
    assert disagreement == pytest.approx(probs.std(dim=1).mean().item(), abs=1e-5)
    assert diversity == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)  # the mean vote is uniform
    assert loss.item() == pytest.approx(-disagreement.item() - 0.5 * diversity.item())
    agreeing = logits[:, :1].expand(-1, 2, -1).clone().requires_grad_()
    loss, disagreement, _ = generator_loss(agreeing, 0.0)
    assert disagreement == pytest.approx(0.0, abs=1e-5)  # students that agree have no disagreement to give
    loss.backward()
    assert agreeing.grad.isfinite().all()  # and exact agreement leaves the generator's gradient finite


def test_the_soft_vote_is_the_mean_of_the_students_probabilities():
    torch.manual_seed(0)
    vote = SoftVote([build_net("lenet5", (1, 28, 28), 10) for _ in range(3)])
    x = torch.rand(4, 1, 28, 28)
    expected = torch.stack([student(x).softmax(dim=-1) for student in vote.students]).mean(dim=0)
    torch.testing.assert_close(vote(x).softmax(dim=-1), expected)


def test_runs_until_the_budget_and_reports_exactly_what_it_spent(victim, fake_data, tmp_path):
    results = ATTACKS.get("disguide").run(victim, cache_dir=str(tmp_path), root=str(tmp_path), **TINY)
    assert results["queries"] == 6 * 32 == victim.rows - EVAL_SIZE
    assert results["attack"] == "disguide" and results["students"] == 2
    assert 0 <= results["clone_acc"] <= 1 and 0 <= results["agreement"] <= 1


def test_the_generator_and_replay_steps_ask_the_victim_nothing(victim, fake_data, tmp_path):
    datamodule, module = ATTACKS.get("disguide").build(victim, cache_dir=str(tmp_path), root=str(tmp_path), **TINY).build()
    spent = {"generator": [], "replay": [], "students": []}

    def counted(kind, step):
        def wrapped(*args):
            before, rows = datamodule.oracle.queries_spent, victim.rows
            result = step(*args)
            spent[kind].append((datamodule.oracle.queries_spent - before, victim.rows - rows))
            return result
        return wrapped

    module.generator_step = counted("generator", module.generator_step)
    module.replay_step = counted("replay", module.replay_step)
    module.student_step = counted("students", module.student_step)
    results = run_attack(datamodule, module, TINY["max_epochs"], accelerator="cpu")
    assert len(spent["generator"]) == 6 and len(spent["replay"]) == 6 * 2
    assert set(spent["generator"]) == set(spent["replay"]) == {(0, 0)}  # neither the oracle nor the victim saw a row
    assert len(spent["students"]) == 6 * 2 + 6 * 2  # bought batches and replayed ones
    assert results["queries"] == 6 * 32 == victim.rows - EVAL_SIZE


def test_the_replay_buffer_keeps_the_latest_pairs_and_samples_without_a_query():
    buffer = ReplayBuffer(5)
    with pytest.raises(RuntimeError, match="empty"):
        buffer.sample(2)
    for start in (0, 3, 6):
        buffer.add(torch.full((3, 1, 2, 2), float(start)), torch.full((3, 10), float(start)))
    assert len(buffer) == 5
    x, answers = buffer.sample(8)
    assert sorted(x[:, 0, 0, 0].tolist()) == [3.0, 3.0, 6.0, 6.0, 6.0]  # the oldest replaced first; no pair twice
    torch.testing.assert_close(x[:, 0, 0, 0], answers[:, 0])


def test_the_learning_rates_decay_at_the_budgets_milestones():
    module = DisGUIDEModule(lr_milestones=(0.4, 0.8), lr_decay=0.5)
    optimizer = torch.optim.SGD(module.net.parameters(), lr=0.1)
    oracle = BlackBoxOracle(_Victim(), budget=100)
    for spent, lr in [(0, 0.1), (40, 0.05), (79, 0.05), (80, 0.025), (100, 0.025)]:
        oracle._spent = spent
        module._decay_learning_rates(oracle, [optimizer])
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr), spent


def test_a_resumed_fit_does_not_decay_the_learning_rates_twice():
    module = DisGUIDEModule(lr_milestones=(0.4,), lr_decay=0.5)
    optimizer = torch.optim.SGD(module.net.parameters(), lr=0.1)
    oracle = BlackBoxOracle(_Victim(), budget=100)
    oracle._spent = 50
    module._decay_learning_rates(oracle, [optimizer])
    checkpoint = {"state_dict": {}, "hyper_parameters": dict(module.hparams)}  # what Lightning's checkpoint holds
    module.on_save_checkpoint(checkpoint)
    resumed = DisGUIDEModule(lr_milestones=(0.4,), lr_decay=0.5)
    resumed.on_load_checkpoint(checkpoint)
    restored = torch.optim.SGD(resumed.net.parameters(), lr=0.1)
    restored.load_state_dict(optimizer.state_dict())  # Lightning restores the optimiser with its decayed rate
    resumed._decay_learning_rates(oracle, [restored])
    assert restored.param_groups[0]["lr"] == pytest.approx(0.05)


class _Victim:
    input_shape, num_classes = (1, 28, 28), 10


@pytest.mark.parametrize(("setting", "message"), [
    (dict(students=1), "students must be a whole number >= 2"),
    (dict(generator_steps=0), "generator_steps must be a whole number >= 1"),
    (dict(clone_steps=0), "clone_steps must be a whole number >= 1"),
    (dict(latent_dim=0), "latent_dim must be a whole number >= 1"),
    (dict(replay_steps=-1), "replay_steps must be a whole number >= 0"),
    (dict(replay_size=0), "replay_size must be a whole number >= 1"),
    (dict(diversity_weight=-0.1), "diversity_weight must be a finite number >= 0"),
    (dict(generator_lr=0.0), "generator_lr must be a finite number > 0"),
    (dict(student_loss="kl"), "student_loss must be one of l1, ce"),
    (dict(lr_milestones=(0.8, 0.4)), "lr_milestones must be increasing fractions"),
    (dict(lr_decay=0.0), r"lr_decay must be a number in \(0, 1\]"),
])
def test_bad_settings_are_refused_by_the_module_and_the_registry_check(setting, message):
    with pytest.raises(ConfigError, match=message):
        DisGUIDEModule(**setting)
    with pytest.raises(ConfigError, match=message):
        ATTACKS.get("disguide").check(100_000, setting)


def test_a_budget_below_one_iteration_is_refused_by_the_check_and_before_any_query(victim, fake_data, tmp_path):
    check = ATTACKS.get("disguide").check
    check(256, {})  # the default batch: one iteration
    with pytest.raises(ConfigError, match=r"one DisGUIDE iteration costs 256 queries .* but the budget is 255"):
        check(255, {})
    with pytest.raises(ConfigError, match="one DisGUIDE iteration costs 48 queries"):
        check(40, dict(batch_size=16, clone_steps=3))
    with pytest.raises(ConfigError, match="batch_size must be a whole number >= 1"):
        check(40, dict(batch_size=0))
    with pytest.raises(ConfigError, match="one DisGUIDE iteration costs 48 queries"):
        ATTACKS.get("disguide").run(victim, budget=40, batch_size=16, clone_steps=3, cache_dir=str(tmp_path), root=str(tmp_path))
    assert victim.rows == EVAL_SIZE  # only the evaluation labels, computed at setup


def test_its_cost_grows_with_the_budget_the_free_steps_and_the_students_architecture():
    cost = ATTACKS.get("disguide").cost
    assert cost(100_000, 1, 6e-5, {}) == pytest.approx(2 * cost(50_000, 1, 6e-5, {}))
    assert cost(50_000, 1, 6e-5, {"replay_steps": 6}) > cost(50_000, 1, 6e-5, {})
    assert cost(50_000, 1, 6e-5, {"generator_steps": 2}) > cost(50_000, 1, 6e-5, {})
    assert cost(50_000, 1, 6e-3, {}) > 2 * cost(50_000, 1, 6e-5, {})  # resnet18 students
