"""``python -m edm_lightning.serve --config configs/serve.yaml`` (or ``edm-lightning serve``): the prediction API on localhost.

    python -m edm_lightning.serve add-client --file clients.yaml --name alice --budget 50000   # prints the key once
    python -m edm_lightning.serve --config configs/serve.yaml

Clients and their budgets come from the clients file (key digests only; re-read when it changes and on SIGHUP, so
keys are added, revoked and re-budgeted without a restart); the router key, for ``router: keyed``
or ``coarse``, from ``$EDM_ROUTER_KEY`` or ``$EDM_ROUTER_KEY_FILE`` (required: the server refuses the public
default key and any key too short to be secret, however it is given), never the command line.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edm_lightning.command_line import parse_command_line, refuse_keys_on_command_line
from edm_lightning.defense import VictimConfig
from edm_lightning.defense.detectors import ClientWatch, open_store
from edm_lightning.errors import ConfigError, exit_if_user_error
from edm_lightning.files import digest, state_digest
from edm_lightning.routing import (
    ROUTER_KEY_ENV,
    ROUTER_KEY_FILE_ENV,
    key_fingerprint,
    resolve_router_key,
    router_class,
    router_label,
)
from edm_lightning.routing.keys import MIN_SECRET_KEY_BYTES
from edm_lightning.serve.app import create_app
from edm_lightning.serve.clients import LiveClients, add_client
from edm_lightning.serve.ledger import init_ledger_main, open_ledger
from edm_lightning.serve.operations import AuditLog, metrics_token
from edm_lightning.serve.rates import RateLimit, RateLimits

__all__ = ["ServeConfig", "add_client_main", "build_app", "listen", "main"]

DESCRIPTION = ("Serve a trained victim over HTTP, every query authenticated by a client's API key and counted against its "
               "budget. Add each client first with `{prog} add-client --file clients.yaml --name NAME --budget QUERIES` "
               "(it prints the client's key once; `{prog} add-client --help`). The keyed routers (keyed, coarse, aligned) need a "
               f"secret key (at least {MIN_SECRET_KEY_BYTES} bytes) in ${ROUTER_KEY_ENV} or ${ROUTER_KEY_FILE_ENV}.")


@dataclass
class ServeConfig:
    """The served model and the API's policy.

    Args:
        victim: the model to serve (checkpoint, router, post-processors), as attacks name it.
        clients_file: who may query and their budgets (key digests only).
        ledger: where every client's queries are counted, kept across restarts: a SQLite file (one host), or a
            ``postgresql://`` URL shared by replicas (its tables made first by ``init-ledger``).
        host: interface to listen on (``127.0.0.1``: this machine only).
        port: TCP port.
        answer: ``probabilities`` (full vectors) or ``labels`` (top-1 only), for every client.
        max_batch: most images in one request.
        max_body_mb: largest request body, in MiB.
        client_rate_limit: requests and images per second each client may send, with bursts (null: no limit);
            shared by every replica on one ledger. Over it: 429 with ``Retry-After``.
        global_rate_limit: the same for all clients together.
        metrics: serve Prometheus metrics at ``/metrics``: to this machine, and elsewhere only with the bearer token
            in ``$EDM_METRICS_TOKEN`` (or the file ``$EDM_METRICS_TOKEN_FILE``).
        audit_log: a JSON-lines file getting one line per prediction request (null: none); never a key, an image
            or an answer.
    """

    victim: VictimConfig
    clients_file: str = "clients.yaml"
    ledger: str = "runs/serve/ledger.sqlite"
    host: str = "127.0.0.1"
    port: int = 8000
    answer: Literal["probabilities", "labels"] = "probabilities"
    max_batch: int = 1024
    max_body_mb: float = 8.0
    client_rate_limit: RateLimit = field(default_factory=RateLimit)
    global_rate_limit: RateLimit = field(default_factory=RateLimit)
    metrics: bool = True
    audit_log: str | None = None


def build_app(config: ServeConfig):
    """The FastAPI application ``config`` describes (checked before anything listens).

    Returns:
        The application.

    Raises:
        ConfigError: FastAPI/uvicorn missing (names the extra), bad limits or rate limits, a short or unreadable
            metrics token, a router key anyone could compute (the public default, however given, or a
            short one), a bad clients file, ledger, audit log or victim.
    """
    for package in ("fastapi", "uvicorn", "prometheus_client"):
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"serving needs the {package!r} package: pip install 'edm-lightning[serve]'")
    if config.max_batch < 1 or not config.max_body_mb > 0 or not 0 < config.port < 65536:
        raise ConfigError(f"max_batch must be >= 1, max_body_mb > 0 and port in 1..65535, got {config.max_batch}, "
                          f"{config.max_body_mb} and {config.port}")
    rate_limits = RateLimits.from_config(config.client_rate_limit, config.global_rate_limit, config.max_batch)
    token = metrics_token() if config.metrics else None
    keyed = router_class(config.victim.router).keyed
    if keyed:
        resolve_router_key(config.victim.key, require_secret=True)  # a server never uses a key anyone can compute
    clients = LiveClients(config.clients_file)
    watch = _client_watch(config)  # before the ledger: a detector behind replicas is refused without a database
    ledger = open_ledger(config.ledger)  # a damaged ledger is refused before the victim is loaded
    audit = AuditLog(config.audit_log, f"{socket.gethostname()}:{config.port}") if config.audit_log else None
    victim = config.victim.build().stack_members()  # the members stacked for speed (EDM's serving cost)
    identity = {"weights": state_digest(victim), "router": config.victim.router, "member": config.victim.member,
                "postprocessors": config.victim.postprocessors, "answer": config.answer,
                "key": key_fingerprint(config.victim.key) if keyed else None,
                "detector": config.victim.detector.identity() if config.victim.detector else None}
    return create_app(victim, clients, ledger, config.answer, config.max_batch,
                      int(config.max_body_mb * (1 << 20)), model_id=digest(identity, length=16),
                      rate_limits=rate_limits, audit=audit, metrics=config.metrics, metrics_token=token, watch=watch)


def _client_watch(config: ServeConfig) -> ClientWatch | None:
    """PRADA over the clients, when the victim has a detector: its histories in ``detector.state``, one process only.

    Raises:
        ConfigError: no ``state`` file, or a PostgreSQL ledger (replicas would each see part of a client's queries).
    """
    detector = config.victim.detector
    if detector is None:
        return None
    if not detector.state:
        raise ConfigError("victim.detector.state must name the SQLite file where the server keeps every client's PRADA "
                          "history (e.g. runs/serve/prada.sqlite): without it a restart would forget flagged clients")
    if str(config.ledger).startswith(("postgresql://", "postgres://")):
        raise ConfigError("a detector keeps each client's history in one server process (victim.detector.state), so it "
                          "cannot watch replicas that share a PostgreSQL ledger: each would see part of a client's "
                          "queries. Serve one replica with a SQLite ledger, or serve without the detector")
    return ClientWatch(detector, open_store(detector, Path(detector.state)))


def main(argv: list[str] | None = None, prog: str = "python -m edm_lightning.serve") -> None:
    """Parse the serving config, build the app and serve until interrupted (or run ``add-client``); ``prog`` is
    the name its help and errors give it (``edm-lightning serve`` from the dispatcher)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["add-client"]:
        return add_client_main(argv[1:], prog=f"{prog} add-client")
    if argv[:1] == ["init-ledger"]:
        return init_ledger_main(argv[1:], prog=f"{prog} init-ledger")
    config, argv = parse_command_line(ServeConfig, argv, prog, description=DESCRIPTION.format(prog=prog))
    try:
        refuse_keys_on_command_line(config, argv)
        app = build_app(config)
    except Exception as err:
        exit_if_user_error(err)
        raise
    import uvicorn  # optional: the [serve] extra (build_app checked it is installed)

    served = logging.getLogger("edm_lightning.serve")  # reloads, refusals and failures, beside uvicorn's own lines
    if not served.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        served.addHandler(handler)
        served.setLevel(logging.INFO)

    try:
        listening = listen(config.host, config.port)
    except Exception as err:
        exit_if_user_error(err)
        raise
    print(f"serving {config.victim.checkpoint} ({router_label(config.victim.router)} router) at http://{config.host}:{config.port}",
          file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info")).run(sockets=[listening])


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening, for uvicorn to serve on (which would exit 1 with a log line).

    Returns:
        The socket.

    Raises:
        ConfigError: the host name does not resolve, the address is not this machine's, the port is taken or
            reserved; each says which and what to change.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except OSError as err:  # socket.gaierror
        raise ConfigError(f"cannot resolve the host {host!r} ({err.strerror or err}): give --host an address of this "
                          "machine (127.0.0.1 for it alone, 0.0.0.0 for every interface) or a name that resolves "
                          "to one") from None
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            what = "choose another --port, or stop what listens there"
        elif err.errno == errno.EACCES:
            what = "choose a --port above 1023, or run with the right to bind it"
        else:  # EADDRNOTAVAIL and the like: the address is not one of this machine's
            what = (f"the host {host!r} cannot be bound here: give --host an address of this machine (127.0.0.1 for it "
                    "alone, 0.0.0.0 for every interface)")
        reason = os.strerror(err.errno) if err.errno else str(err)  # without create_server's own addition
        raise ConfigError(f"cannot listen on {host}:{port} ({reason}): {what}") from None


def add_client_main(argv: list[str], prog: str = "python -m edm_lightning.serve add-client") -> None:
    """``add-client --file clients.yaml --name alice --budget 50000``: a new client; its key printed once."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                     description="Add a client with a new random API key (printed once, stored as its digest).")
    parser.add_argument("--file", required=True, help="the clients file (created if missing)")
    parser.add_argument("--name", required=True, help="the client's public name (what its queries are counted under)")
    parser.add_argument("--budget", type=int, required=True, help="most queries the client may make")
    args = parser.parse_args(argv)
    try:
        key = add_client(args.file, args.name, args.budget)  # checks the name, the budget and the file
    except Exception as err:
        exit_if_user_error(err)
        raise
    print(f"added client {args.name!r} (budget {args.budget}) to {args.file}; a running server on this file takes it "
          "within a second (it re-reads the file when it changes). Its API key, shown only now:", file=sys.stderr)
    print(key)


if __name__ == "__main__":
    main()
