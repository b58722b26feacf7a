"""Routers: deterministic across processes, the neural hash stable under faint noise, balanced spreads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edm_lightning.errors import ConfigError
from edm_lightning.models import ClassifierModule
from edm_lightning.nets import build_net
from edm_lightning.routing import (
    AlignedKeyedHashRouter,
    CoarseKeyedHashRouter,
    FixedRouter,
    KeyedHashRouter,
    NeuralHashRouter,
    balance_logit_bias,
    build_router,
    neural_hash_index,
    quantise,
)

ROOT = Path(__file__).resolve().parents[1]

ROUTE_IN_CHILD = """
import json, sys, torch
from edm_lightning.routing import build_router
x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(7))
routes = {kind: build_router(kind, 5, key="secret", hash_checkpoint=sys.argv[1], input_shape=(1, 28, 28))(x).tolist()
          for kind in ("keyed", "coarse", "aligned", "neural")}
print(json.dumps(routes))
"""


def smooth_images(n, seed=0):
    """Random images with structure at 4-pixel scale (pure pixel noise would be meaningless to a CNN)."""
    coarse = torch.rand(n, 1, 7, 7, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=28, mode="bilinear").clamp(0, 1)


@pytest.fixture
def hash_checkpoint(checkpoint_factory):
    torch.manual_seed(0)
    return checkpoint_factory(ClassifierModule(arch="lenet5"), "hash.ckpt")


def test_same_input_same_member_in_separate_processes(hash_checkpoint):
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    here = {kind: build_router(kind, 5, key="secret", hash_checkpoint=hash_checkpoint, input_shape=(1, 28, 28))(x).tolist()
            for kind in ("keyed", "coarse", "aligned", "neural")}
    answers = []
    for hash_seed in ("1", "2"):  # Python's hash() differs between these processes; the routes must not
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, "-c", ROUTE_IN_CHILD, hash_checkpoint],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True,
        )
        answers.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert answers[0] == answers[1] == here
    assert all(len(set(here[kind])) > 1 for kind in ("keyed", "coarse", "aligned"))  # a constant route would pass trivially


def test_neural_hash_keeps_the_member_under_faint_noise_far_more_often_than_the_byte_hash():
    torch.manual_seed(0)
    net = ClassifierModule(arch="lenet5").net
    x = smooth_images(1000)
    noisy = (x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    with torch.no_grad():
        neural = NeuralHashRouter(net, 5, balance_logit_bias(net(x)))
    keyed = KeyedHashRouter(5, key="secret")
    neural_kept = (neural(x) == neural(noisy)).float().mean().item()
    keyed_kept = (keyed(x) == keyed(noisy)).float().mean().item()
    assert neural_kept > 0.8, neural_kept
    assert keyed_kept < 0.4, keyed_kept  # about 1/N: a new member for nearly every changed byte string
    assert shares(neural(x), 5).max() < 1.5  # the comparison is not won by routing everything to one member


def test_keyed_router_is_balanced_on_random_inputs():
    route = KeyedHashRouter(5, key="secret")(torch.rand(5000, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert shares(route, 5).max() < 1.15 and shares(route, 5).min() > 0.85


def test_neural_hash_arithmetic_spreads_balanced_hash_classes_evenly_over_five_members():
    # 2 * argmax mod 5 hits every member twice over 10 classes; the confidence term shifts by 0 or 1.
    logits = 4 * torch.randn(20000, 10, generator=torch.Generator().manual_seed(0))
    route = neural_hash_index(logits.softmax(-1), 5)
    assert shares(route, 5).max() < 1.1
    assert neural_hash_index(torch.eye(10), 5).tolist() == [(2 * c + 2) % 5 for c in range(10)]  # max p = 1: offset 2


def test_balancing_offsets_repair_a_hash_net_that_favours_some_classes():
    logits = torch.randn(5000, 10, generator=torch.Generator().manual_seed(0)) + torch.linspace(0, 4, 10)
    assert shares(logits.argmax(-1), 10).max() > 3  # the last classes win nearly always
    balanced = (logits + balance_logit_bias(logits)).argmax(-1)
    assert shares(balanced, 10).max() < 1.5 and shares(balanced, 10).min() > 0.5


def test_keyed_router_depends_on_the_key_and_ignores_sub_grey_level_noise():
    x = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    a, b = KeyedHashRouter(5, "key-a"), KeyedHashRouter(5, "key-b")
    assert (a(x) != b(x)).any()
    assert torch.equal(a(x), a((quantise(x).float() / 255 + 1e-4).clamp(0, 1)))
    assert "key-a" not in repr(a)


def test_coarse_router_is_balanced_and_keeps_the_member_under_faint_noise():
    x = smooth_images(5000)
    noisy = (x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    coarse, keyed = CoarseKeyedHashRouter(5, key="secret"), KeyedHashRouter(5, key="secret")
    route = coarse(x)
    assert shares(route, 5).max() < 1.15 and shares(route, 5).min() > 0.85
    kept = (route == coarse(noisy)).float().mean().item()
    assert kept > 0.9 and kept > (keyed(x) == keyed(noisy)).float().mean().item() + 0.5, kept
    assert len(torch.unique(coarse.view(x), dim=0)) > 4000  # the views differ, so the key (not the view) spreads them


def test_coarse_router_depends_on_the_key_and_never_shows_it():
    x = smooth_images(256)
    a, b = CoarseKeyedHashRouter(5, "key-a"), CoarseKeyedHashRouter(5, "key-b")
    assert (a(x) != b(x)).any()
    assert "key-a" not in repr(a) and a.state_dict() == {}
    images = torch.zeros(2, 1, 28, 28)
    images[1, :, 0, :3] = 1.0  # 3 of the top-left cell's 49 pixels: its mean 0.06 stays in the lowest level
    assert torch.equal(a.view(images)[0], a.view(images)[1])
    images[1, :, :7, :7] = 1.0  # the whole cell: its level changes
    assert not torch.equal(a.view(images)[0], a.view(images)[1])


def objects(n, seed=0, frame=28):
    """High-contrast smooth random objects of random size on a black background, each at a random place well
    inside the frame (shifts of up to 2 pixels never crop them): what the aligned router is for."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, frame, frame)
    for i, blob in enumerate(smooth_images(n, seed)):
        height, width = torch.randint(6, frame - 5, (2,), generator=g).tolist()
        top, left = (torch.randint(2, frame - 2 - size + 1, (1,), generator=g).item() for size in (height, width))
        x[i, :, top:top + height, left:left + width] = ((blob[:, :height, :width] - 0.5) * 4 + 0.5).clamp(0, 1)
    return x


def shifted(x, dy, dx):
    """``x`` moved ``dy`` pixels down and ``dx`` right (negative: up, left), zeros shifted in, as an attacker shifts."""
    return torch.roll(x, (dy, dx), dims=(-2, -1))  # exact for objects() with |d| <= 2: only background wraps


def test_aligned_router_keeps_the_member_of_shifted_copies_where_the_coarse_router_loses_it():
    x = objects(2000)
    aligned, coarse = AlignedKeyedHashRouter(5, key="secret"), CoarseKeyedHashRouter(5, key="secret")
    route, coarse_route = aligned(x), coarse(x)
    assert shares(route, 5).max() < 1.35 and shares(route, 5).min() > 0.6  # 694 distinct views over 2,000 objects
    for dy, dx in ((1, 0), (0, -1), (1, 1), (-2, 2)):
        moved = shifted(x, dy, dx)
        assert torch.allclose(moved.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # nothing cropped: the whole object moved
        kept = (aligned(moved) == route).float().mean().item()
        assert kept > 0.98, (dy, dx, kept)  # the same centred image, up to float rounding at a cell boundary
        assert (coarse(moved) == coarse_route).float().mean().item() < 0.6  # the fixed cells move
    noisy = (x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert (aligned(noisy) == route).float().mean().item() > 0.95  # faint noise barely moves the ink's median


def test_aligned_router_centres_the_ink_and_crops_its_margin():
    router = AlignedKeyedHashRouter(5, key="secret", grid=2, levels=4, margin=2)
    image = torch.zeros(1, 1, 28, 28)
    image[..., 0:12, 0:12] = 1.0  # a bright square in the top-left corner
    centred = torch.zeros(1, 1, 28, 28)
    centred[..., 8:20, 8:20] = 1.0  # the same square in the middle
    assert torch.equal(router.view(image), router.view(centred))
    assert router.view(centred).tolist() == [[1, 1, 1, 1]]  # each 12 x 12 cell of the 24 x 24 view: 36 of 144 lit
    assert router.view(torch.zeros(1, 1, 28, 28)).tolist() == [[0, 0, 0, 0]]  # no ink: nothing to centre
    faint = torch.full((1, 1, 28, 28), 0.09)  # grey below the ink threshold everywhere, one bright pixel
    faint[..., 3, 3] = 1.0
    assert torch.equal(router.view(faint), router.view(torch.roll(faint, (5, 5), dims=(-2, -1))))


def test_aligned_router_settings_are_checked():
    with pytest.raises(ConfigError, match="margin must be an integer >= 0"):
        AlignedKeyedHashRouter(5, "k", margin=-1)
    with pytest.raises(ConfigError, match="margin 14 leaves nothing of 28 x 28 images: use a margin below 14"):
        build_router({"class_path": "aligned", "init_args": {"margin": 14}}, 5, key="k", input_shape=(1, 28, 28))
    with pytest.raises(ConfigError, match="margin 4 leaves nothing of 8 x 8 images"):
        AlignedKeyedHashRouter(5, "k")(torch.rand(2, 1, 8, 8))
    shown = repr(AlignedKeyedHashRouter(5, "a-secret-key", margin=3))
    assert "a-secret-key" not in shown and "margin=3" in shown and "key_fingerprint=" in shown


def test_router_arguments_are_checked():
    with pytest.raises(ValueError, match="1 to 64 bytes"):
        KeyedHashRouter(5, "k" * 65)
    with pytest.raises(ValueError, match="Unknown router 'round-robin'"):
        build_router("round-robin", 5)
    with pytest.raises(ValueError, match="hash_checkpoint"):
        build_router("neural", 5)
    with pytest.raises(FileNotFoundError, match="configs/hashnet.yaml"):
        build_router("neural", 5, hash_checkpoint="missing.ckpt")
    with pytest.raises(ValueError, match="member must be in"):
        FixedRouter(5, 5)


def test_hash_net_for_other_inputs_is_refused(hash_checkpoint):
    with pytest.raises(ValueError, match=r"\(1, 28, 28\).*\(3, 32, 32\)"):
        build_router("neural", 5, hash_checkpoint=hash_checkpoint, input_shape=(3, 32, 32))


def shares(route, members):
    """Each member's share of the inputs over its fair share (1.0 = perfectly balanced)."""
    return route.bincount(minlength=members).float() / len(route) * members


def _boundary_inputs(router, count: int, seed: int = 0) -> torch.Tensor:
    """Inputs on a member boundary: bisect the blend of two inputs routed to different members to float resolution."""
    g = torch.Generator().manual_seed(seed)
    found = []
    while len(found) < count:
        a, b = torch.rand(2, 1, 1, 28, 28, generator=g)
        member_a = router(a).item()
        if router(b).item() == member_a:
            continue
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2
            if router((1 - middle) * a + middle * b).item() == member_a:
                low = middle
            else:
                high = middle
        found.append((1 - low) * a + low * b)
    return torch.cat(found)


@pytest.mark.parametrize("kind", ["neural", "aligned"])
def test_an_inputs_member_does_not_depend_on_the_batch_it_arrives_in(kind):
    """An attacker who controls batching must not get two members' answers for one input (even one on a boundary)."""
    torch.manual_seed(0)
    router = (NeuralHashRouter(build_net("small_cnn", (1, 28, 28), 10), 5) if kind == "neural"
              else AlignedKeyedHashRouter(5, key="secret"))  # float sampling and pooling: batch-independent too
    g = torch.Generator().manual_seed(1)
    for x in _boundary_inputs(router, 30):
        alone = router(x[None])[0]
        for size in (2, 7, 64, 1024):
            batch = torch.rand(size, 1, 28, 28, generator=g)
            batch[-1] = x
            assert router(batch)[-1] == alone, f"member changed in a batch of {size}"
