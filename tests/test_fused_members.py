"""Members served stacked on the CPU: each row answered as its own member answers it alone, whatever the batch."""

import copy
import hashlib

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from edm_lightning.defense import Victim
from edm_lightning.defense.fused import FusedMembers
from edm_lightning.nets import build_net
from edm_lightning.routing import KeyedHashRouter, answer_routed, keyed_members, quantise
from edm_lightning.routing.base import member_counts


def small_resnet() -> nn.Module:
    """A ResNet-like net with batch norm (random running statistics, so eval mode matters) and a strided shortcut."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        BasicBlock(8, 8),
        BasicBlock(8, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    with torch.no_grad():
        for norm in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    return net.eval()


MEMBERS = {
    "lenet5": ((1, 28, 28), lambda: build_net("lenet5", (1, 28, 28), 10).eval()),
    "small resnet with batch norm": ((3, 16, 16), small_resnet),
}


def alone(members, route, x):
    """Each row's answer from its own member, one row at a time: the reference every path must give."""
    with torch.no_grad():
        return torch.stack([members[int(m)](x[i : i + 1])[0].softmax(-1) for i, m in enumerate(route)])


def stacked_lenets(num_members: int) -> tuple[list[nn.Module], Victim]:
    """Seeded LeNet-5 members and the stacked victim serving them behind the keyed router."""
    torch.manual_seed(0)
    members = [build_net("lenet5", (1, 28, 28), 10).eval() for _ in range(num_members)]
    return members, Victim(members, KeyedHashRouter(num_members, "secret"), (1, 28, 28), 10).eval().stack_members()


@pytest.mark.parametrize("arch", MEMBERS)
def test_stacked_members_answer_each_row_as_its_member_alone(arch):
    shape, build = MEMBERS[arch]
    torch.manual_seed(0)
    members = nn.ModuleList([build() for _ in range(5)])
    fused = FusedMembers(members)
    g = torch.Generator().manual_seed(1)
    routes = [
        torch.randint(0, 5, (64,), generator=g),  # every member
        torch.randint(0, 3, (40,), generator=g),  # members 3 and 4 get nothing
        torch.tensor([0, 4, 4, 1, 4, 0, 2, 3]),  # a small batch, uneven
        torch.tensor([2]),  # a single row
        torch.full((16,), 3),  # one member answers the whole batch
    ]
    with torch.no_grad():
        answer_routed(members, routes[0], torch.rand(64, *shape, generator=g), 10, fused)  # builds and checks it
    assert fused.stacked
    run_stacked, batches = fused._run_stacked, []
    fused._run_stacked = lambda *args: batches.append(len(args[0])) or run_stacked(*args)
    for route in routes:
        x = torch.rand(len(route), *shape, generator=g)
        with torch.no_grad():
            got = answer_routed(members, route, x, 10, fused)
            plain = answer_routed(members, route, x, 10)
        torch.testing.assert_close(got, alone(members, route, x))
        torch.testing.assert_close(got, plain)
    assert batches == [64, 40, 8]  # every batch of several members went through the stacked network


def test_an_answer_and_its_member_do_not_depend_on_the_rest_of_the_batch():
    members, victim = stacked_lenets(5)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    whole, route = victim(x), victim.router(x)
    assert victim._fused.stacked and len(route.unique()) == 5
    for i in range(len(x)):
        assert victim.router(x[i : i + 1])[0] == route[i]
        torch.testing.assert_close(victim(x[i : i + 1])[0], whole[i])


@pytest.mark.parametrize("num_members", [3, 5])
def test_a_batch_answered_in_parts_gives_the_same_answers_as_whole(num_members):
    """As a server answering a large batch request by request: the same answers, up to float rounding (bit for bit on
    the machines measured, which the CPU's math library does not promise on every other).
    """
    members, victim = stacked_lenets(num_members)
    x = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    whole = victim(x)
    assert victim._fused.stacked
    for size in (64, 32, 16):
        parts = torch.cat([victim(part) for part in x.split(size)])
        torch.testing.assert_close(parts, whole, rtol=0, atol=1e-6, msg=f"parts of {size} rows")


def test_a_member_changed_after_serving_is_served_as_changed():
    members, victim = stacked_lenets(3)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    before = victim(x)
    with torch.no_grad():
        members[1][1].classifier[-1].bias.add_(3.0)  # in place, as an optimiser step or load_state_dict changes it
    members[2].load_state_dict(build_net("lenet5", (1, 28, 28), 10).state_dict())
    after = victim(x)
    route = victim.router(x)
    assert not torch.allclose(before[route != 0], after[route != 0])
    torch.testing.assert_close(after, alone(members, route, x))


def test_a_broken_member_is_still_refused_by_name_after_the_members_were_stacked():
    members, victim = stacked_lenets(3)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    victim(x)
    assert victim._fused.stacked
    with torch.no_grad():
        members[1][1].classifier[-1].bias.fill_(float("nan"))
    queries = int((victim.router(x) == 1).sum())
    with pytest.raises(RuntimeError, match=f"member 1 produced non-finite answers for {queries} of its {queries} queries"):
        victim(x)


def test_the_queries_are_never_changed_by_the_members_prepared_copies():
    """A layer working in place in the prepared copies may only overwrite what they made, never the caller's rows."""
    torch.manual_seed(0)
    members = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(64, 10)).eval() for _ in range(3)])
    fused = FusedMembers(members)
    for route in (torch.tensor([0, 1, 2, 2, 1, 0]), torch.full((6,), 1)):
        x = torch.rand(6, 1, 8, 8) * 2 - 1
        sent = x.clone()
        with torch.no_grad():
            got = answer_routed(members, route, x, 10, fused)
        assert torch.equal(x, sent)
        torch.testing.assert_close(got, alone(members, route, x))
    assert fused.stacked


class ViewMLP(nn.Module):
    """A member whose forward flattens with ``view``: it cannot take channels-last rows."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(x.view(x.shape[0], -1))


@pytest.mark.parametrize("members, shape", [
    (lambda: [build_net("lenet5", (1, 28, 28), 10), build_net("small_cnn", (1, 28, 28), 10)], (1, 28, 28)),
    (lambda: [ViewMLP(), ViewMLP()], (3, 8, 8)),
], ids=["two architectures", "a forward the channels-last order breaks"])
def test_members_that_cannot_be_stacked_answer_through_the_plain_loop(members, shape):
    torch.manual_seed(0)
    members = nn.ModuleList([m.eval() for m in members()])
    fused = FusedMembers(members)
    route = torch.tensor([0, 1, 1, 0, 1])
    x = torch.rand(5, *shape)
    with torch.no_grad():
        got = answer_routed(members, route, x, 10, fused)
    torch.testing.assert_close(got, alone(members, route, x))
    assert not fused.stacked


def test_a_hook_added_to_a_member_after_serving_sees_every_row_of_that_member():
    members, victim = stacked_lenets(3)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    expected = victim(x)
    seen = []
    members[2].register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    torch.testing.assert_close(victim(x), expected)
    assert seen == [int((victim.router(x) == 2).sum())]


def test_members_in_training_mode_are_left_to_the_plain_loop():
    torch.manual_seed(0)
    members = nn.ModuleList([build_net("lenet5", (1, 28, 28), 10) for _ in range(2)])  # training mode
    x, route = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 0, 1])
    assert FusedMembers(members)(x, route, member_counts(route, 2)) is None


def test_a_copy_of_a_victim_prepares_its_own_stacked_members():
    members, victim = stacked_lenets(3)
    x = torch.rand(16, 1, 28, 28)
    expected = victim(x)
    twin = copy.deepcopy(victim)
    with torch.no_grad():
        victim.members[0][1].classifier[-1].bias.add_(1.0)  # the original changes; the copy must not follow it
    torch.testing.assert_close(twin(x), expected)
    assert twin._fused.members is twin.members


@pytest.mark.parametrize("route", [torch.tensor([0, 3, 1]), torch.tensor([0, -1, 1])], ids=["too high", "negative"])
def test_a_route_outside_the_members_is_refused(route):
    members = [build_net("small_cnn", (1, 28, 28), 10).eval() for _ in range(3)]
    with pytest.raises(RuntimeError, match=r"outside \[0, 3\)"):
        answer_routed(members, route, torch.rand(3, 1, 28, 28), 10)


@pytest.mark.parametrize("num_members", [2, 5, 7])
def test_the_keyed_route_is_the_keyed_blake2b_of_the_pixels(num_members):
    """The routes are a contract (a server and its records must agree): the fast hash loop computes exactly them."""
    key = b"a key of the right length 123456"
    x = torch.rand(50, 1, 28, 28, generator=torch.Generator().manual_seed(num_members))
    rows = quantise(x).reshape(50, -1)
    expected = [int.from_bytes(hashlib.blake2b(bytes(row.tolist()), digest_size=8, key=key).digest(), "little") % num_members
                for row in rows]
    assert keyed_members(rows, key, num_members).tolist() == expected
    assert KeyedHashRouter(num_members, key)(x).tolist() == expected


def _replace_last_linear(member: nn.Module, **kwargs) -> None:
    name = [n for n, module in member.named_modules() if isinstance(module, nn.Linear)][-1]
    *path, last = name.split(".")
    parent = member
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, last, nn.Linear(getattr(parent, last).in_features, 10, **kwargs))


def test_a_layer_replaced_after_serving_answers_as_replaced():
    members, victim = stacked_lenets(5)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    before = victim(x)
    assert victim._fused.stacked
    _replace_last_linear(members[2])
    after = victim(x)
    torch.testing.assert_close(after, answer_routed(members, victim.router(x), x, 10))
    assert not torch.allclose(before, after)


def test_members_whose_layers_differ_in_a_bias_answer_through_the_plain_loop():
    torch.manual_seed(0)
    members = [build_net("lenet5", (1, 28, 28), 10).eval() for _ in range(3)]
    _replace_last_linear(members[1], bias=False)
    victim = Victim(members, KeyedHashRouter(3, "secret"), (1, 28, 28), 10).eval().stack_members()
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(victim(x), answer_routed(members, victim.router(x), x, 10))
    assert not victim._fused.stacked
