"""Files that may come from someone else (checkpoints, caches, transfer sets) are never unpickled as code."""

from pathlib import Path

import pytest
import torch

from edm_lightning.attacks.transfer_set import TransferSet, build_transfer_set
from edm_lightning.checkpoints import load_classifier_net
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.routing import load_hash_net


class _Payload:
    """Unpickling this runs ``Path.touch`` on the marker: what an attacker's planted file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _crafted(tmp_path: Path, name: str, wrap) -> tuple[Path, Path]:
    marker = tmp_path / f"{name}.ran"
    path = tmp_path / name
    torch.save(wrap(_Payload(marker)), path)
    return path, marker


def test_a_planted_transfer_set_is_refused_and_runs_nothing(tmp_path: Path):
    path, marker = _crafted(tmp_path, "knockoff-cafe.pt", lambda payload: {"indices": payload, "answers": None, "state": None})
    with pytest.raises(ConfigError, match="is not a readable transfer set .* delete it"):
        TransferSet.load(path)
    with pytest.raises(ConfigError, match="knockoff-cafe.pt"):
        build_transfer_set(lambda spent: pytest.fail("no query may be spent"), torch.zeros(4, 1, 8, 8, dtype=torch.uint8),
                           torch.zeros(4, dtype=torch.long), 4, path, batch_size=2)
    assert not marker.exists()


def test_a_truncated_transfer_set_names_the_file(tmp_path: Path):
    path = tmp_path / "knockoff-cut.pt"
    TransferSet(torch.arange(8), torch.rand(8, 10)).save(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConfigError, match="knockoff-cut.pt"):
        TransferSet.load(path)


@pytest.mark.parametrize("load", [
    lambda path: VictimConfig(str(path)).build(),
    lambda path: load_hash_net(str(path)),
    lambda path: load_classifier_net(path, "misinformation model"),
], ids=["victim", "hash network", "classifier net"])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, load):
    path, marker = _crafted(tmp_path, "model.ckpt", lambda payload: {"state_dict": {}, "hyper_parameters": {"arch": payload}})
    with pytest.raises(ConfigError, match="model.ckpt"):
        load(path)
    assert not marker.exists()
