"""Stateful defenses: detectors that watch each client's stream of queries (PRADA), beside any victim.

A post-processor answers each query on its own; a detector remembers a client's earlier queries and, once it judges
the client an attacker, changes what that client gets (:class:`MonitoredVictim`), with its state kept on disk
(:class:`DetectorStore`) so a restart forgets nobody.
"""

from edm_lightning.defense.detectors.benign import benign_clients
from edm_lightning.defense.detectors.monitor import (
    ClientRefused,
    ClientWatch,
    DetectorConfig,
    MonitoredVictim,
    misinform,
    open_store,
)
from edm_lightning.defense.detectors.prada import ClientHistory, Prada, as_bytes
from edm_lightning.defense.detectors.store import DetectorStore

__all__ = ["ClientHistory", "ClientRefused", "ClientWatch", "DetectorConfig", "DetectorStore", "MonitoredVictim", "Prada",
           "as_bytes", "benign_clients", "misinform", "open_store"]
