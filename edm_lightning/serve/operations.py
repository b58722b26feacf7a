"""What operators watch: Prometheus metrics and a JSON-lines audit log of every prediction request.

Neither ever holds an API key, an image or an answer: a request is known by its client's public name (``null``
for an unknown key), its row count, status and latency. Metric labels come from fixed sets (the API's paths, HTTP
statuses, refusal reasons) and the names in the clients file, so no request can make a new label.

The metrics live in a registry of their own per application (not prometheus-client's global one), so several
applications in one process (tests) do not collide. Budget left per client is read from the ledger when scraped,
so every replica reports the same figure and a scrape costs one query.

``/metrics`` shows every client's name and budget left, which an API client has no business seeing. So it answers
a scraper on this machine (a loopback peer: Prometheus or its agent beside the server) without more, and any other
only with the bearer token from ``$EDM_METRICS_TOKEN`` or the file ``$EDM_METRICS_TOKEN_FILE`` (Prometheus:
``authorization: {credentials_file: ...}``); without a token set, nobody elsewhere can read it. The peer is the one
uvicorn reports: behind a proxy on the same host that sets ``X-Forwarded-For``, the client's own address (uvicorn
trusts that header from 127.0.0.1 only). The token is a secret apart from the clients' keys: a scraper holding it
cannot query the model, and a client's key cannot read the metrics. ``metrics: false`` removes the page.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

from edm_lightning.errors import ConfigError
from edm_lightning.protocol import INFO_PATH, PREDICT_PATH, USAGE_PATH
from edm_lightning.serve.clients import Client
from edm_lightning.serve.ledger import Ledger, LedgerUnavailable

__all__ = ["METRICS_PATH", "METRICS_TOKEN_ENV", "METRICS_TOKEN_FILE_ENV", "AuditLog", "Metrics", "RequestRecorder",
           "is_loopback", "metrics_token", "token_matches"]

log = logging.getLogger("edm_lightning.serve")

METRICS_PATH = "/metrics"
PATHS = (PREDICT_PATH, INFO_PATH, USAGE_PATH, "/health", METRICS_PATH)  # any other path is labelled "other"
REFUSALS = ("rate", "budget", "ledger_unavailable", "detector")
METRICS_TOKEN_ENV = "EDM_METRICS_TOKEN"
METRICS_TOKEN_FILE_ENV = "EDM_METRICS_TOKEN_FILE"
MIN_TOKEN_CHARS = 16


def metrics_token() -> str | None:
    """The bearer token that lets a scraper beyond this machine read ``/metrics``: ``$EDM_METRICS_TOKEN``, else the
    file ``$EDM_METRICS_TOKEN_FILE``'s text (surrounding whitespace dropped), else ``None`` (this machine only).

    Returns:
        The token, or ``None``.

    Raises:
        ConfigError: the token file cannot be read, or the token is under 16 characters.
    """
    token, source = os.environ.get(METRICS_TOKEN_ENV, "").strip(), f"${METRICS_TOKEN_ENV}"
    if not token and os.environ.get(METRICS_TOKEN_FILE_ENV):
        path = os.environ[METRICS_TOKEN_FILE_ENV]
        try:
            token, source = Path(path).read_text(encoding="utf-8-sig").strip(), f"the metrics token file {path!r}"
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read the metrics token file {path!r} (${METRICS_TOKEN_FILE_ENV}): {reason}") from None
    if token and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the metrics token in {source} is {len(token)} characters, under {MIN_TOKEN_CHARS}: make one "
                          "with `python -c 'import secrets; print(secrets.token_hex(32))'`")
    return token or None


def token_matches(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as its bearer token (compared in constant time)."""
    given = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    return hmac.compare_digest(given.encode(), token.encode())


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a peer's address) is this machine's loopback interface."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # no address at all (None, a test client's name)
        return False


class Metrics:
    """The API's Prometheus metrics, in their own registry.

    Args:
        clients: the current clients (called at each scrape: a client added or removed while serving shows at once).
        ledger: where each client's spent queries are read at scrape time.
    """

    def __init__(self, clients: Callable[[], Iterable[Client]], ledger: Ledger):
        from prometheus_client import CollectorRegistry, Counter, Histogram  # optional: the [serve] extra

        self.registry = CollectorRegistry()
        self.requests = Counter("edm_api_requests", "HTTP requests answered, by path and status code",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("edm_api_request_seconds", "Time from a request's arrival to its response, in seconds",
                                 ["path"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.images = Counter("edm_api_images_charged", "Images charged to a budget and answered (a refunded batch "
                              "is not counted)", registry=self.registry)
        self.refusals = Counter("edm_api_refusals", "Prediction requests refused after validation: over the rate "
                                "limit, over the budget, the ledger unavailable, or a key the detector flagged", ["reason"],
                                registry=self.registry)
        for reason in REFUSALS:
            self.refusals.labels(reason)  # every series present from the start, at 0
        self.registry.register(_BudgetCollector(clients, ledger))

    def observe(self, path: str, status: int, seconds: float) -> None:
        """Count one response to ``path`` (labelled ``other`` if it is none of the API's paths)."""
        path = path if path in PATHS else "other"
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (reads the ledger: call it off the event loop)."""
        from prometheus_client import generate_latest  # optional: the [serve] extra

        return generate_latest(self.registry)


class _BudgetCollector:
    """Each configured client's budget, spent queries and budget left, read from the ledger at scrape time, labelled
    by the clients file's names only; ``edm_api_ledger_up`` is 0 when the ledger cannot be read.
    """

    def __init__(self, clients: Callable[[], Iterable[Client]], ledger: Ledger):
        self.clients, self.ledger = clients, ledger

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily  # optional: the [serve] extra

        up = GaugeMetricFamily("edm_api_ledger_up", "1 if the ledger answered this scrape, else 0")
        try:
            spent = self.ledger.spent_by_client()
        except LedgerUnavailable as err:
            log.warning("metrics: the ledger cannot be read (%s)", err)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        budget = GaugeMetricFamily("edm_api_budget_queries", "Each client's query budget", labels=["client"])
        used = GaugeMetricFamily("edm_api_queries_spent", "Queries charged to each client", labels=["client"])
        left = GaugeMetricFamily("edm_api_budget_left_queries", "Queries each client may still make", labels=["client"])
        for client in sorted(self.clients(), key=lambda c: c.name):
            count = spent.get(client.name, 0)
            budget.add_metric([client.name], client.budget)
            used.add_metric([client.name], count)
            left.add_metric([client.name], max(client.budget - count, 0))
        yield from (budget, used, left)


class AuditLog:
    """One JSON line per prediction request, appended to ``path``: UTC time, client name (``null`` for an unknown
    or missing key), rows, status, latency in ms, and the replica (``host:port`` and process id).

    Each line is one ``write`` to a file opened with ``O_APPEND``, so replicas on one host can share the file
    without interleaving lines.

    Args:
        path: the log file (created with its folder, mode 0600; appended to).
        replica: this server's ``host:port``.

    Raises:
        ConfigError: the file cannot be opened for appending.
    """

    def __init__(self, path: str | Path, replica: str):
        self.path, self.replica, self.pid = Path(path), replica, os.getpid()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as err:
            raise ConfigError(f"the audit log {str(path)!r} cannot be opened for appending "
                              f"({os.strerror(err.errno) if err.errno else err}): name a writable file, or set "
                              "audit_log: null") from None
        self._failed = False

    def write(self, client: str | None, rows: int | None, status: int, seconds: float) -> None:
        """Append one request's line; a failed write is logged once (the request is answered all the same)."""
        line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "client": client,
                           "rows": rows, "status": status, "latency_ms": round(1000 * seconds, 3),
                           "replica": self.replica, "pid": self.pid}, separators=(",", ":"))
        try:
            os.write(self._fd, (line + "\n").encode())
            self._failed = False
        except OSError as err:
            if not self._failed:
                log.error("the audit log %s cannot be written (%s)", self.path, os.strerror(err.errno) if err.errno else err)
            self._failed = True

    def close(self) -> None:
        """Close the file (the server's shutdown)."""
        os.close(self._fd)


class RequestRecorder:
    """ASGI middleware: every response counted and timed in ``metrics``; every prediction request's line written to
    ``audit`` (the route leaves the client's name and the row count in ``request.state``).
    """

    def __init__(self, app, metrics: Metrics, audit: AuditLog | None):
        self.app, self.metrics, self.audit = app, metrics, audit

    async def __call__(self, scope, receive, send):
        """Pass the request on, then record its response's status and time."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # unless a response starts: an error no handler answered
        state = scope.setdefault("state", {})  # what the route's request.state holds

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.observe(scope["path"], status, seconds)
            if self.audit is not None and scope["path"] == PREDICT_PATH:
                self.audit.write(state.get("client"), state.get("rows"), status, seconds)
