"""The prediction API: FastAPI over the eager victim, every query authenticated and counted before it is answered.

FastAPI + uvicorn rather than LitServe: what this server must get exactly right is per-request, not
throughput across requests. A key's budget is checked and committed (:class:`~edm_lightning.serve.ledger.QueryLedger`)
between validating a batch and answering it, and every refusal is a precise 4xx; FastAPI gives that control
in one process that owns the model. LitServe's strengths (dynamic batching across requests, a worker per
GPU) matter less when each request already is a batch, and its workers would each need the ledger anyway.

Order of a request: key (401) -> body size (413) -> decoding (400/415; a PNG's work bounded by the model's input
size, :mod:`~edm_lightning.serve.images`; 422 for transparency or colour to a grey model) -> shape, dtype, range, NaN (422)
-> batch size (413) -> budget, committed (429 if it does not fit; nothing counted) -> answer (500 refunds).
The model answers one batch at a time (a lock), so concurrent clients queue instead of oversubscribing cores.

FastAPI is imported inside :func:`create_app` (the ``[serve]`` extra), and annotations are evaluated where the
routes are defined (no ``from __future__ import annotations``): FastAPI reads them to inject the request.
"""

import json
import logging
import threading
from typing import Any, Literal

import torch
from torch import Tensor

from edm_lightning.defense import Victim, validate_inputs
from edm_lightning.files import state_digest
from edm_lightning.protocol import API_KEY_HEADER, INFO_PATH, NPY, PREDICT_PATH, USAGE_PATH, decode_npy
from edm_lightning.serve.clients import Client, key_digest
from edm_lightning.serve.images import UnsupportedImage, decode_png_body
from edm_lightning.serve.ledger import BudgetExhausted, QueryLedger

__all__ = ["create_app"]

log = logging.getLogger("edm_lightning.serve")
Answer = Literal["probabilities", "labels"]


def create_app(
    victim: Victim,
    clients: dict[str, Client],
    ledger: QueryLedger,
    answer: Answer = "probabilities",
    max_batch: int = 1024,
    max_body_bytes: int = 8 << 20,
    model_id: str = "",
):
    """The API serving ``victim`` to ``clients`` (by key digest), counting in ``ledger``.

    Args:
        victim: the model answered with (router, members, post-processors).
        clients: who may query, from :func:`~edm_lightning.serve.clients.load_clients`.
        ledger: where every key's spent queries are committed.
        answer: the policy: full probability vectors, or top-1 labels only.
        max_batch: most images in one request.
        max_body_bytes: largest request body.
        model_id: an opaque public name of what is served (weights, router and key, post-processors, policy): it
            lets a client tell servers apart (an attack's caches are keyed by it) without learning the defense.

    Returns:
        The FastAPI application (run it with uvicorn).
    """
    from fastapi import FastAPI, HTTPException, Request  # optional: the [serve] extra
    from fastapi.responses import JSONResponse  # optional: the [serve] extra
    from starlette.concurrency import run_in_threadpool  # optional: the [serve] extra (FastAPI's own)

    app = FastAPI(title="EDM-Lightning prediction API", docs_url=None, redoc_url=None, openapi_url=None)
    model_lock = threading.Lock()
    channels, height, width = victim.input_shape
    model_id = model_id or state_digest(victim)[:16]

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

    def answer_batch(client: Client, content_type: str, body: bytes) -> dict[str, Any]:
        x = decode(content_type, body)
        if x.ndim == 3 and tuple(x.shape) == (channels, height, width):
            x = x.unsqueeze(0)  # one image without its batch axis
        try:
            validate_inputs(x, victim.input_shape, victim.input_range)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        count = int(x.shape[0])
        if count == 0:
            raise HTTPException(422, "empty batch: send at least one image")
        if count > max_batch:
            raise HTTPException(413, f"batch of {count} images is over the limit of {max_batch} per request")
        try:
            spent = ledger.charge(client.name, count, client.budget)
        except BudgetExhausted as err:
            raise HTTPException(429, str(err)) from None
        try:
            with model_lock:
                probs = victim(x)
        except Exception:
            ledger.refund(client.name, count)
            log.exception("the model failed on a batch of %d from client %s (refunded)", count, client.name)
            raise HTTPException(500, "the model failed to answer this batch; it was not counted") from None
        result: dict[str, Any] = {"queries_spent": spent, "budget": client.budget}
        if answer == "labels":
            result["labels"] = probs.argmax(dim=-1).tolist()
        else:
            result["probabilities"] = probs.float().tolist()
        return result

    @app.post(PREDICT_PATH)
    async def predict(request: Request) -> dict[str, Any]:
        client = authenticate(request)
        body = await read_body(request)
        return await run_in_threadpool(answer_batch, client, request.headers.get("content-type", ""), body)

    @app.get(INFO_PATH)
    async def info(request: Request) -> dict[str, Any]:
        authenticate(request)
        return {"input_shape": [channels, height, width], "input_range": list(victim.input_range),
                "num_classes": victim.num_classes, "answer": answer, "max_batch": max_batch,
                "max_body_bytes": max_body_bytes, "model_id": model_id}

    @app.get(USAGE_PATH)
    async def usage(request: Request) -> dict[str, Any]:
        client = authenticate(request)
        spent = await run_in_threadpool(ledger.spent, client.name)
        return {"client": client.name, "queries_spent": spent, "budget": client.budget}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": f"internal server error ({type(err).__name__})"}, status_code=500)

    return app

