"""The prediction API: FastAPI over the eager victim, every query authenticated and counted before it is answered.

FastAPI + uvicorn rather than LitServe: what this server must get exactly right is per-request, not
throughput across requests. A key's budget is checked and committed (:class:`~edm_lightning.serve.ledger.Ledger`)
between validating a batch and answering it, and every refusal is a precise 4xx; FastAPI gives that control
in one process that owns the model. LitServe's strengths (dynamic batching across requests, a worker per
GPU) matter less when each request already is a batch, and its workers would each need the ledger anyway.

Order of a request: key (401) -> body size (413) -> decoding (400/415; a PNG's work bounded by the model's input
size, :mod:`~edm_lightning.serve.images`; 422 for transparency or colour to a grey model) -> shape, dtype, range, NaN (422)
-> batch size (413, also over an image burst of the rate limits) -> rate limits, per key and global, taken in the ledger
(429 with ``Retry-After``; nothing counted) -> budget, committed (429 without ``Retry-After`` if it does not fit;
nothing counted) -> answer (500 refunds). A ledger that cannot be reached at any step: 503 with ``Retry-After: 1``,
nothing answered, nothing counted. The model answers one batch at a time (a lock), so concurrent clients queue instead
of oversubscribing cores.

Clients are looked up in :class:`~edm_lightning.serve.clients.LiveClients` at each request, so keys added, revoked
or re-budgeted in the clients file count within a second; every response is counted in the Prometheus metrics, and
every prediction request written to the audit log (:mod:`~edm_lightning.serve.operations`).

FastAPI is imported inside :func:`create_app` (the ``[serve]`` extra), and annotations are evaluated where the
routes are defined (no ``from __future__ import annotations``): FastAPI reads them to inject the request.
"""

import json
import logging
import math
import signal
import threading
from contextlib import asynccontextmanager
from typing import Any, Literal

import torch
from torch import Tensor

from edm_lightning.defense import Victim, validate_inputs
from edm_lightning.defense.detectors import ClientRefused, ClientWatch
from edm_lightning.files import state_digest
from edm_lightning.protocol import API_KEY_HEADER, INFO_PATH, NPY, PREDICT_PATH, USAGE_PATH, decode_npy
from edm_lightning.serve.clients import Client, LiveClients, key_digest
from edm_lightning.serve.images import UnsupportedImage, decode_png_body
from edm_lightning.serve.ledger import BudgetExhausted, Ledger, LedgerUnavailable
from edm_lightning.serve.operations import (
    METRICS_PATH,
    METRICS_TOKEN_ENV,
    AuditLog,
    Metrics,
    RequestRecorder,
    is_loopback,
    token_matches,
)
from edm_lightning.serve.rates import RateLimit, RateLimits

__all__ = ["create_app"]

log = logging.getLogger("edm_lightning.serve")
Answer = Literal["probabilities", "labels"]


def create_app(
    victim: Victim,
    clients: LiveClients,
    ledger: Ledger,
    answer: Answer = "probabilities",
    max_batch: int = 1024,
    max_body_bytes: int = 8 << 20,
    model_id: str = "",
    rate_limits: RateLimits | None = None,
    audit: AuditLog | None = None,
    metrics: bool = True,
    metrics_token: str | None = None,
    watch: ClientWatch | None = None,
):
    """The API serving ``victim`` to ``clients`` (by key digest), counting in ``ledger``.

    Args:
        victim: the model answered with (router, members, post-processors).
        clients: who may query (the clients file, re-read while serving; watched from the app's start-up).
        ledger: where every key's spent queries are committed and the rate limits' buckets kept.
        answer: the policy: full probability vectors, or top-1 labels only.
        max_batch: most images in one request.
        max_body_bytes: largest request body.
        model_id: an opaque public name of what is served (weights, router and key, post-processors, policy): it
            lets a client tell servers apart (an attack's caches are keyed by it) without learning the defense.
        rate_limits: requests and images per second, per key and global (``None``: no limit).
        audit: where each prediction request's line goes (``None``: no audit log).
        metrics: serve Prometheus metrics at ``/metrics``.
        metrics_token: the bearer token a scraper beyond this machine sends for ``/metrics`` (``None``: this machine
            only; see :mod:`~edm_lightning.serve.operations`).
        watch: a stateful detector over the clients (PRADA, :class:`~edm_lightning.defense.detectors.ClientWatch`):
            a flagged client gets misinformation, or 403 with nothing counted (``response: refuse``).

    Returns:
        The FastAPI application (run it with uvicorn).
    """
    from fastapi import FastAPI, HTTPException, Request  # optional: the [serve] extra
    from fastapi.responses import JSONResponse, Response  # optional: the [serve] extra
    from prometheus_client import CONTENT_TYPE_LATEST  # optional: the [serve] extra
    from starlette.concurrency import run_in_threadpool  # optional: the [serve] extra (FastAPI's own)

    rate_limits = rate_limits or RateLimits(RateLimit(), RateLimit())
    instruments = Metrics(clients.values, ledger)

    @asynccontextmanager
    async def lifespan(app):
        clients.start()
        hangup = None
        if threading.current_thread() is threading.main_thread():  # uvicorn's process: SIGHUP re-reads the clients
            hangup = signal.signal(signal.SIGHUP, lambda signum, frame: clients.wake())
        try:
            yield
        finally:
            if hangup is not None:
                signal.signal(signal.SIGHUP, hangup)
            clients.stop()

    app = FastAPI(title="EDM-Lightning prediction API", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.add_middleware(RequestRecorder, metrics=instruments, audit=audit)
    model_lock = threading.Lock()
    channels, height, width = victim.input_shape
    model_id = model_id or state_digest(victim)[:16]
    images_per_request = min(max_batch, rate_limits.max_images or max_batch)  # what /v1/info tells clients

    def authenticate(request: Request) -> Client:
        key = request.headers.get(API_KEY_HEADER)
        authorization = request.headers.get("authorization", "")
        if key is None and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        if not key:
            raise HTTPException(401, f"missing API key: send it in the {API_KEY_HEADER} header")
        client = clients.get(key_digest(key))
        if client is None:
            raise HTTPException(401, "unknown API key")
        return client

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise HTTPException(413, f"request body of {int(declared)} bytes is over the limit of {max_body_bytes} bytes: "
                                     "send fewer images per request")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise HTTPException(413, f"request body is over the limit of {max_body_bytes} bytes")
        if not body:
            raise HTTPException(400, "empty request body: send a batch of images (see the API's content types)")
        return bytes(body)

    def decode(content_type: str, body: bytes) -> Tensor:
        kind = content_type.split(";")[0].strip().lower()
        try:
            if kind == NPY:
                return decode_npy(body)
            if kind == "application/json":
                payload = json.loads(body)
                if not isinstance(payload, dict) or "inputs" not in payload:
                    raise ValueError('the JSON body must be an object {"inputs": [[[[...]]]]} of shape (N, C, H, W)')
                return torch.tensor(payload["inputs"], dtype=torch.float64)
            if kind == "image/png":
                return decode_png_body(body, victim.input_shape)  # header and image data checked before decoding
        except UnsupportedImage as err:
            raise HTTPException(422, str(err)) from None
        except (ValueError, TypeError, RuntimeError) as err:  # json, torch.tensor of ragged lists, image decoders
            raise HTTPException(400, f"malformed {kind} body: {err}") from None
        raise HTTPException(415, f"unsupported content type {kind!r}: send {NPY}, application/json or image/png")

    def answer_batch(state, client: Client, content_type: str, body: bytes) -> dict[str, Any]:
        x = decode(content_type, body)
        if x.ndim == 3 and tuple(x.shape) == (channels, height, width):
            x = x.unsqueeze(0)  # one image without its batch axis
        state.rows = int(x.shape[0]) if x.ndim else None  # for the audit log
        try:
            validate_inputs(x, victim.input_shape, victim.input_range)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        count = int(x.shape[0])
        if count == 0:
            raise HTTPException(422, "empty batch: send at least one image")
        if count > max_batch:
            raise HTTPException(413, f"batch of {count} images is over the limit of {max_batch} per request")
        too_many = rate_limits.too_many_images(count)
        if too_many:
            raise HTTPException(413, too_many)
        if watch is not None:
            with model_lock:
                refused = watch.refused(client.name)
            if refused:
                instruments.refusals.labels("detector").inc()
                raise HTTPException(403, "this key was flagged as a model-stealing attacker and is answered no more; "
                                         "nothing was counted")
        wait = ledger.admit(rate_limits.buckets(client.name, count))
        if wait > 0:
            instruments.refusals.labels("rate").inc()
            retry = max(1, math.ceil(wait))
            raise HTTPException(429, f"rate limit: this key, or all keys together, asked faster than the server's rate "
                                     f"limit; retry after {retry} s (the Retry-After header). This is the rate, not the "
                                     "query budget: nothing was counted", headers={"Retry-After": str(retry)})
        try:
            spent = ledger.charge(client.name, count, client.budget)
        except BudgetExhausted as err:
            instruments.refusals.labels("budget").inc()
            raise HTTPException(429, str(err)) from None
        try:
            with model_lock:
                probs = victim(x)
                if watch is not None:
                    probs = watch.respond(client.name, x, probs)  # its history committed before the answer leaves
        except ClientRefused:  # flagged by this batch: nothing of it leaves the server, so nothing of it is counted
            instruments.refusals.labels("detector").inc()
            try:
                ledger.refund(client.name, count)
            except LedgerUnavailable as err:  # counted and not answered: the safe side of the budget
                log.error("the refund of %d queries to client %s failed: %s", count, client.name, err)
            raise HTTPException(403, "this key was flagged as a model-stealing attacker and is answered no more") from None
        except Exception:
            log.exception("the model failed on a batch of %d from client %s (refunding it)", count, client.name)
            try:
                ledger.refund(client.name, count)
            except LedgerUnavailable as err:  # counted and not answered: the safe side of the budget
                log.error("the refund of %d queries to client %s failed: %s", count, client.name, err)
                raise HTTPException(500, f"the model failed to answer this batch, and the ledger could not refund it: "
                                         f"its {count} queries stay counted") from None
            raise HTTPException(500, "the model failed to answer this batch; it was not counted") from None
        instruments.images.inc(count)
        result: dict[str, Any] = {"queries_spent": spent, "budget": client.budget}
        if answer == "labels":
            result["labels"] = probs.argmax(dim=-1).tolist()
        else:
            result["probabilities"] = probs.float().tolist()
        return result

    @app.post(PREDICT_PATH)
    async def predict(request: Request) -> dict[str, Any]:
        client = authenticate(request)
        request.state.client = client.name  # for the audit log: the public name, never the key
        body = await read_body(request)
        return await run_in_threadpool(answer_batch, request.state, client, request.headers.get("content-type", ""),
                                       body)

    @app.get(INFO_PATH)
    async def info(request: Request) -> dict[str, Any]:
        authenticate(request)
        return {"input_shape": [channels, height, width], "input_range": list(victim.input_range),
                "num_classes": victim.num_classes, "answer": answer, "max_batch": images_per_request,
                "max_body_bytes": max_body_bytes, "model_id": model_id}

    @app.get(USAGE_PATH)
    async def usage(request: Request) -> dict[str, Any]:
        client = authenticate(request)
        spent = await run_in_threadpool(ledger.spent, client.name)
        return {"client": client.name, "queries_spent": spent, "budget": client.budget}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    if metrics:
        @app.get(METRICS_PATH)
        async def metrics_page(request: Request) -> Response:
            if not is_loopback(request.client.host if request.client else None):
                if metrics_token is None:
                    raise HTTPException(403, f"metrics are served to this machine only: set ${METRICS_TOKEN_ENV} on the "
                                             "server to let a scraper elsewhere read them with that bearer token")
                if not token_matches(request.headers.get("authorization", ""), metrics_token):
                    raise HTTPException(401, "metrics from beyond this machine need the metrics token: send "
                                             "Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"})
            return Response(await run_in_threadpool(instruments.exposition), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(LedgerUnavailable)
    async def ledger_unavailable(request: Request, err: LedgerUnavailable) -> JSONResponse:
        log.warning("503 on %s: %s", request.url.path, err)
        instruments.refusals.labels("ledger_unavailable").inc()
        return JSONResponse({"detail": "the query ledger cannot be reached right now; nothing was answered or counted: "
                                       "retry in a second"}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": f"internal server error ({type(err).__name__})"}, status_code=500)

    return app

