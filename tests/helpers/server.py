"""A real prediction API server in a subprocess on a free localhost port, as the serving and attack tests drive it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from edm_lightning.protocol import NPY
from tests.helpers.files import REPO_ROOT

ROUTER_KEY = "serving-test-router-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    checkpoint: str
    folder: Path
    keys: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    ledger: str | None = None  # a SQLite path or a postgresql:// URL; None: ledger.sqlite in the folder
    extra_args: list[str] = field(default_factory=list)  # more server options, after the defaults

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "EDM_ROUTER_KEY": ROUTER_KEY, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edm_lightning.serve", "--victim.checkpoint", self.checkpoint, "--victim.router", "keyed",
             "--clients_file", str(self.folder / "clients.yaml"), "--ledger", self.ledger or str(self.folder / "ledger.sqlite"),
             "--port", str(self.port), "--max_batch", "64", "--max_body_mb", "1", *self.extra_args],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.folder / "server.log", "ab"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start within 120 s")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def post(self, client: str | None, body: bytes | None = None, content_type: str = NPY, **kwargs) -> httpx.Response:
        headers = {"content-type": content_type} | ({"X-API-Key": self.keys[client]} if client else {})
        return httpx.post(f"{self.url}/v1/predict", content=body, headers=headers, timeout=60, **kwargs)

    def spent(self, client: str) -> int:
        return httpx.get(f"{self.url}/v1/usage", headers={"X-API-Key": self.keys[client]}, timeout=30).json()["queries_spent"]
