"""Serving figures of the prediction API: requests/s and latency, defended over undefended, exported over eager.

Each victim is served by the real server (``python -m edm_lightning.serve`` in a subprocess on a free
localhost port) and driven by ``clients`` concurrent HTTP clients sending ``.npy`` batches for ``seconds``;
the undefended model (one LeNet-5 behind the fixed router) is served the same way. The models have random
weights (the cost, not the accuracy, is measured); the neural router's hash network is balanced on the
stream as ``HashBalanceCallback`` balances it on real data, so all five members answer. Then the ONNX export of
the neural-router ensemble (onnxruntime) is timed beside the eager model in this process. Figures are printed,
never asserted.

    python benchmarks/api.py                         # batch 1, 64 and 256, 8 clients, 10 s each
    python benchmarks/api.py --stress true           # and 200 clients for 30 s against the keyed router
    python benchmarks/api.py --replicas true         # instead: the keyed router on SQLite (1 process) beside
                                                     # PostgreSQL (1 process, then 2 replicas sharing one database)

The replicas run starts a throw-away PostgreSQL server (``pgserver``, the dev extra) unless ``--ledger`` names a
database (``postgresql://USER@HOST/DB``, password in ``PGPASSWORD``; its tables are created if missing). Its clients
alternate between the replicas, as a load balancer would, and the ledger's count is checked against what was answered.

Client and server share this machine's cores, so absolute rates understate a server on its own machine;
the ratios compare like with like.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

import httpx  # noqa: E402
import torch  # noqa: E402
from jsonargparse import CLI  # noqa: E402

from edm_lightning.defense import VictimConfig  # noqa: E402
from edm_lightning.export import export_victim, load_exported  # noqa: E402
from edm_lightning.models import ClassifierModule, EnsembleModule  # noqa: E402
from edm_lightning.protocol import NPY, encode_npy  # noqa: E402
from edm_lightning.routing import BALANCE_KEY, balance_logit_bias  # noqa: E402
from edm_lightning.serve import add_client  # noqa: E402
from edm_lightning.serve.ledger import init_ledger  # noqa: E402

ROUTER_KEY = "benchmark-router-key"


def main(batch_sizes: tuple[int, ...] = (1, 64, 256), clients: int = 8, seconds: float = 10.0, stress: bool = False,
         replicas: bool = False, ledger: str | None = None) -> None:
    """Print requests/s, images/s, p50/p99 latency per victim and batch size, and the ratios.

    Args:
        batch_sizes: images per request.
        clients: concurrent HTTP clients.
        seconds: how long each setting is driven.
        stress: also drive the keyed router with 200 clients for 30 s and check every count.
        replicas: instead, the keyed router on one SQLite process beside PostgreSQL (1 process, 2 replicas).
        ledger: the PostgreSQL database of the replicas run (default: a throw-away server started here).
    """
    folder = Path(tempfile.mkdtemp(prefix="edm-api-bench-"))
    victims = write_checkpoints(folder)
    if replicas:
        return compare_replicas(folder, victims["EDM keyed router"], batch_sizes, clients, seconds, ledger)
    keys = {name: add_client(folder / "clients.yaml", name, 10**12) for name in ("bench", "stress")}  # read at start
    print(f"{clients} clients, {seconds:.0f} s per setting, cores={os.cpu_count()}")
    rates: dict[tuple[str, int], float] = {}
    for name, args in victims.items():
        with served(folder, args, name) as url:
            for batch in batch_sizes:
                figures = drive(url, keys["bench"], batch, clients, seconds)
                rates[(name, batch)] = figures["images/s"]
                print(f"{name:<22} batch {batch:>3}: {figures['requests/s']:7.1f} req/s {figures['images/s']:8.0f} img/s "
                      f"p50 {figures['p50_ms']:6.1f} ms p99 {figures['p99_ms']:6.1f} ms errors {figures['errors']}")
    for batch in batch_sizes:
        base = rates[("undefended", batch)]
        print(f"batch {batch:>3}: " + ", ".join(f"{name} {rates[(name, batch)] / base:.2f}x"
                                               for name in victims if name != "undefended") + " of undefended")
    compare_exported(folder, victims["EDM neural router"], batch_sizes)
    if stress:
        with served(folder, victims["EDM keyed router"], "stress") as url:
            stress_test(url, keys["stress"])


def write_checkpoints(folder: Path) -> dict[str, list[str]]:
    """Random-weight target, hash network (balanced) and 5-member ensemble; the server arguments of each victim."""
    torch.manual_seed(0)
    paths = {}
    for name, module in (("target", ClassifierModule()), ("hash", ClassifierModule(arch="small_cnn")),
                         ("edm", EnsembleModule(num_members=5))):
        state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
        if name == "hash":
            with torch.no_grad():
                logits = module.net(torch.rand(4096, 1, 28, 28))
            state[BALANCE_KEY] = {"logit_bias": balance_logit_bias(logits).tolist()}
        paths[name] = str(folder / f"{name}.ckpt")
        torch.save(state, paths[name])
    return {
        "undefended": ["--victim.checkpoint", paths["target"]],
        "EDM neural router": ["--victim.checkpoint", paths["edm"], "--victim.router", "neural",
                              "--victim.hash_checkpoint", paths["hash"]],
        "EDM keyed router": ["--victim.checkpoint", paths["edm"], "--victim.router", "keyed"],
    }


class served:
    """The server for one victim, in a subprocess, for the duration of a ``with`` block."""

    def __init__(self, folder: Path, victim_args: list[str], name: str, ledger: str | None = None):
        self.port = free_port()
        ledger = ledger or str(folder / f"ledger-{name.replace(' ', '_')}.sqlite")
        self.command = [sys.executable, "-m", "edm_lightning.serve", *victim_args, "--clients_file",
                        str(folder / "clients.yaml"), "--ledger", ledger, "--port", str(self.port), "--max_batch", "1024"]
        self.log = folder / "server.log"

    def __enter__(self) -> str:
        env = {**os.environ, "EDM_ROUTER_KEY": ROUTER_KEY, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.process = subprocess.Popen(self.command, env=env, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"the server did not start: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(url: str | list[str], key: str, batch: int, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads posting batches of ``batch`` random images for ``seconds`` (to the servers at ``url`` in
    turn, one per thread, when it names several)."""
    urls = [url] if isinstance(url, str) else url
    body = encode_npy(torch.rand(batch, 1, 28, 28))
    latencies: list[float] = []
    errors = Counter()
    stop = time.monotonic() + seconds

    def client(url: str) -> None:
        with httpx.Client(base_url=url, headers={"X-API-Key": key, "content-type": NPY}, timeout=120) as http:
            while time.monotonic() < stop:
                start = time.perf_counter()
                status = http.post("/v1/predict", content=body).status_code
                if status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[status] += 1

    threads = [threading.Thread(target=client, args=(urls[i % len(urls)],)) for i in range(clients)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - begin
    ordered = sorted(latencies) or [float("nan")]
    return {"requests/s": len(latencies) / elapsed, "images/s": len(latencies) * batch / elapsed,
            "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
            "errors": dict(errors), "answered": len(latencies) * batch}


def compare_replicas(folder: Path, victim_args: list[str], batch_sizes: tuple[int, ...], clients: int, seconds: float,
                     ledger: str | None) -> None:
    """Requests/s and p99 of one server process on SQLite, one on PostgreSQL, and two replicas sharing PostgreSQL
    (clients alternating between them); after the replicas, the ledger's count against the answered queries."""
    postgres = None
    if ledger is None:
        from tests.helpers.postgres import Postgres  # the dev extra's pgserver: only this run needs it

        data = Path(tempfile.mkdtemp(prefix="edm-api-bench-postgres-"))  # PostgreSQL's own user must reach it
        postgres = Postgres(data)
        ledger = postgres.new_database()[1]
    try:
        opened = init_ledger(ledger)  # the tables, created once before the servers start
        described = opened.describe()
        opened.close()
        name = f"replicas-{uuid.uuid4().hex[:8]}"  # a count of its own, in a database that may be used already
        key = add_client(folder / "clients.yaml", name, 10**12)
        print(f"{clients} clients, {seconds:.0f} s per setting, cores={os.cpu_count()}, EDM keyed router; "
              f"PostgreSQL: {described}")
        for batch in batch_sizes:
            figures = {}
            with served(folder, victim_args, f"replicas-{batch}") as url:
                figures["SQLite, 1 process"] = drive(url, key, batch, clients, seconds)
            with served(folder, victim_args, "postgres", ledger) as url:
                figures["PostgreSQL, 1 process"] = drive(url, key, batch, clients, seconds)
            with served(folder, victim_args, "postgres", ledger) as first, \
                    served(folder, victim_args, "postgres", ledger) as second:
                before = httpx.get(f"{first}/v1/usage", headers={"X-API-Key": key}, timeout=60).json()["queries_spent"]
                figures["PostgreSQL, 2 replicas"] = drive([first, second], key, batch, clients, seconds)
                spent = httpx.get(f"{second}/v1/usage", headers={"X-API-Key": key}, timeout=60).json()["queries_spent"]
            print(f"batch {batch:>3}: " + "; ".join(f"{setting} {result['requests/s']:.1f} req/s, p99 {result['p99_ms']:.0f} ms"
                                                 f"{', errors ' + str(result['errors']) if result['errors'] else ''}"
                                                 for setting, result in figures.items()))
            answered = figures["PostgreSQL, 2 replicas"]["answered"]
            print(f"           2 replicas: the ledger counted {spent - before} queries for {answered} answered "
                  f"({'equal' if spent - before == answered else 'DIFFERENT'})")
    finally:
        if postgres is not None:
            postgres.close()
            shutil.rmtree(data, ignore_errors=True)


def compare_exported(folder: Path, neural_args: list[str], batch_sizes: tuple[int, ...], rounds: int = 200) -> None:
    """Images/s of the ONNX export (onnxruntime, loaded as users load it: digest and content checked) and of the
    eager model, in this process, same inputs."""
    options = dict(zip([a.removeprefix("--victim.") for a in neural_args[::2]], neural_args[1::2]))
    victim = VictimConfig(**options).build().stack_members()  # as the server serves it
    run = load_exported(export_victim(victim, folder / "edm.onnx", "onnx"))
    for batch in batch_sizes:
        x = torch.rand(batch, 1, 28, 28)
        timings = {}
        for name, answer in (("eager", victim), ("onnxruntime", run)):
            answer(x)
            start = time.perf_counter()
            for _ in range(rounds):
                answer(x)
            timings[name] = rounds * batch / (time.perf_counter() - start)
        print(f"in process, batch {batch:>3}: eager {timings['eager']:8.0f} img/s, ONNX export {timings['onnxruntime']:8.0f} "
              f"img/s ({timings['onnxruntime'] / timings['eager']:.2f}x eager)")


def stress_test(url: str, key: str, clients: int = 200, seconds: float = 30.0) -> None:
    """200 clients for 30 s: every answer counted once, every error a status with a message."""
    figures = drive(url, key, 8, clients, seconds)
    spent = httpx.get(f"{url}/v1/usage", headers={"X-API-Key": key}, timeout=60).json()["queries_spent"]
    print(f"stress: {clients} clients x {seconds:.0f} s, batch 8: {figures['requests/s']:.1f} req/s, p99 "
          f"{figures['p99_ms']:.0f} ms, errors {figures['errors'] or 'none'}; ledger {spent} queries for "
          f"{figures['answered']} answered ({'equal' if spent == figures['answered'] else 'DIFFERENT'})")


if __name__ == "__main__":
    CLI(main)
