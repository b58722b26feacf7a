"""A victim behind the prediction API: the attacks query a server over HTTP instead of a model in this process.

:class:`RemoteVictim` is a :class:`~edm_lightning.attacks.oracle.Servable`, so it goes behind the same
:class:`~edm_lightning.attacks.oracle.BlackBoxOracle` (the same budget accounting) as an in-process victim,
and KnockoffNets buys the same transfer set from a server as from the model it serves. Here the attacker
is where the threat model puts it: only answers cross, and the router key and weights stay on the server.
The server counts every query against the API key too, including the experimenter's evaluation labels
(the victim's answers on its test set, which the oracle's budget does not count).

A batch larger than one request is sent in several; when one fails, the answers of those before it are not lost:
:class:`RemoteError` carries them (a :class:`~edm_lightning.attacks.oracle.PartlyAnswered`), with the rows of the
failing request the server may have answered and charged (a lost reply, an answer that could not be read).

A request the server asks to repeat later is repeated after the time it names: a 429 with ``Retry-After`` (the
key's rate limit; the server counted nothing) or a 503 (the server's ledger unavailable: nothing answered or counted),
for at most ``max_wait_s`` seconds of waiting in all per request. A 429 without ``Retry-After`` is the key's query
budget: waiting would not help, and it is raised at once.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import torch
from jsonargparse.typing import SecretStr
from torch import Tensor, nn

from edm_lightning.attacks.oracle import BadAnswers, PartlyAnswered, answer_problem
from edm_lightning.errors import ConfigError
from edm_lightning.protocol import API_KEY_HEADER, INFO_PATH, NPY, PREDICT_PATH, encode_npy
from edm_lightning.routing import SECRET_MASK

__all__ = ["API_KEY_ENV", "RemoteError", "RemoteVictim", "RemoteVictimConfig"]

API_KEY_ENV = "EDM_API_KEY"

log = logging.getLogger(__name__)


#: Statuses of a request the server refused as malformed before charging it (the oracle's ``ValueError``).
MALFORMED = (400, 413, 415, 422)


class RemoteError(PartlyAnswered):
    """The server refused or failed a request; the message is the server's, with its HTTP status.

    ``answers`` holds the answers of the requests before it in the same batch; ``unsure`` the rows of the failing
    request the server may have answered and charged: all of them unless it refused the request (a 4xx, which this
    package's server sends before charging) or the request never reached it (no connection).
    """

    def __init__(self, status: int, detail: str, rows: int = 0, answers: Tensor | None = None):
        self.status, self.detail = status, detail
        refused = 400 <= status < 500
        super().__init__(f"the prediction API answered {status}: {detail}", answers, 0 if refused else rows)


@dataclass
class RemoteVictimConfig:
    """The victim as a prediction API (``python -m edm_lightning.serve``) serves it.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        api_key: the client's API key (default ``$EDM_API_KEY``); never written to config dumps or logs.
        timeout_s: seconds to wait for one answer.
        max_wait_s: most seconds to wait in all, per request, when the server asks to retry later (its rate limit's
            429 with ``Retry-After``, or a 503); past it the refusal is raised. 0: never wait.
    """

    url: str
    api_key: SecretStr | None = None
    timeout_s: float = 60.0
    max_wait_s: float = 600.0

    def __post_init__(self) -> None:
        if isinstance(self.api_key, str):
            self.api_key = SecretStr(self.api_key)

    def build(self) -> RemoteVictim:
        """The connected victim (asks the server for its input shape and class count)."""
        key = self.api_key.get_secret_value() if self.api_key is not None else os.environ.get(API_KEY_ENV)
        if not key:
            raise ConfigError(f"the prediction API needs an API key: set ${API_KEY_ENV} (or api_key in a private config)")
        if key == SECRET_MASK:
            raise ConfigError(f"the API key is {SECRET_MASK!r}, the mask a saved config shows in place of the key: "
                              f"set ${API_KEY_ENV} to the real key")
        if not (math.isfinite(self.max_wait_s) and self.max_wait_s >= 0):
            raise ConfigError(f"max_wait_s must be a number of seconds >= 0, got {self.max_wait_s!r}")
        return RemoteVictim(self.url, key, self.timeout_s, self.max_wait_s)


class RemoteVictim:
    """Images ``(N, C, H, W)`` in [0, 1] to probabilities ``(N, K)``, answered by a prediction API.

    A batch larger than one request may carry (the server's ``max_batch`` images and ``max_body_bytes``) is
    sent in several requests. A server that answers top-1 labels only is answered as one-hot vectors, as the
    oracle's ``label_only`` does; labels that are not class ids of the served model are refused.

    Raises:
        ConfigError: httpx is missing (names the extra), the server cannot be reached, refuses the key, or
            does not describe itself as a prediction API of this package does.
    """

    def __init__(self, url: str, api_key: str, timeout_s: float = 60.0, max_wait_s: float = 600.0):
        if importlib.util.find_spec("httpx") is None:
            raise ConfigError("querying a prediction API needs the 'httpx' package: pip install 'edm-lightning[serve]'")
        import httpx  # optional: the [serve] extra

        self.url = url.rstrip("/")
        self.max_wait_s = max_wait_s
        self._transport_error = httpx.HTTPError
        self._connect_errors = (httpx.ConnectError, httpx.ConnectTimeout)
        self._client = httpx.Client(base_url=self.url, headers={API_KEY_HEADER: api_key}, timeout=timeout_s)
        try:
            response = self._client.get(INFO_PATH)
        except httpx.HTTPError as err:
            raise ConfigError(f"cannot reach the prediction API at {self.url}: {err}") from None
        if response.status_code != 200:
            raise ConfigError(f"the prediction API at {self.url} refused {INFO_PATH}: {response.status_code} "
                              f"{_detail(response)}")
        try:
            info = response.json()
            self.input_shape: tuple[int, int, int] = tuple(int(v) for v in info["input_shape"])
            self.num_classes: int = int(info["num_classes"])
            self.answers: str = info["answer"]
            self.model_id: str = str(info["model_id"])
            row_bytes = 4 * self.input_shape[0] * self.input_shape[1] * self.input_shape[2]  # float32 .npy rows
            self.rows_per_request = max(1, min(int(info["max_batch"]), (int(info["max_body_bytes"]) - 1024) // row_bytes))
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ConfigError(f"{self.url}{INFO_PATH} is not this package's prediction API "
                              f"({type(err).__name__}: {err})") from None
        self.trained_on: str | None = None  # the server does not say

    def eval(self) -> RemoteVictim:
        """Nothing to switch: the server's model is always in eval mode (kept for the oracle's interface)."""
        return self

    @property
    def name(self) -> str:
        """How messages name this victim: the API's URL (never the key)."""
        return f"the prediction API at {self.url}"

    def __call__(self, x: Tensor) -> Tensor:
        """Probabilities ``(N, num_classes)`` (float32) for images ``x``, from the server.

        Returns:
            The server's answers, or one-hot labels where it answers labels only.

        Raises:
            ValueError: the server refused the batch's first request as malformed (400, 413, 415, 422), with its
                message; nothing was answered.
            RemoteError: any other refusal (the key, the budget: 401, 429; a rate limit or an unavailable server
                still refusing after ``max_wait_s`` of waiting), a server failure, or no answer at all
                (connection, timeout); it carries the answers of the requests before it (a batch is sent in several
                requests of at most ``rows_per_request`` rows) and the rows the server may have answered besides.
            BadAnswers: the server answered with something that is not answers to the batch (not JSON, labels that
                are no class, a count other than asked); every row it answered so far is charged, none is kept.
        """
        if x.shape[0] == 0:
            return torch.zeros((0, self.num_classes))
        answered: list[Tensor] = []
        for part in x.detach().cpu().float().split(self.rows_per_request):
            done = sum(len(a) for a in answered)
            try:
                answered.append(self._ask(part))
            except BadAnswers as err:  # the server answered (and charged) this request and those before it
                raise BadAnswers(f"{self.name} answered request rows {done}-{done + len(part) - 1} of a batch of "
                                 f"{len(x)} with unusable answers: {err}. Nothing of the batch was kept; its "
                                 f"{done + len(part)} answered queries are counted", done + len(part)) from None
            except RemoteError as err:
                if err.status in MALFORMED and not answered:
                    raise ValueError(f"the prediction API refused the batch ({err.status}): {err.detail}") from None
                err.answers = torch.cat(answered) if answered else torch.zeros((0, self.num_classes))
                raise
        return torch.cat(answered)

    def _ask(self, x: Tensor) -> Tensor:
        request, waited = encode_npy(x), 0.0
        while True:
            try:
                response = self._client.post(PREDICT_PATH, content=request, headers={"content-type": NPY})
            except self._transport_error as err:
                never_sent = isinstance(err, self._connect_errors)  # no connection: the server never saw the request
                raise RemoteError(0, f"no answer from {self.url} ({type(err).__name__}: {err})",
                                  0 if never_sent else len(x)) from None
            if response.status_code == 200:
                break
            wait = _retry_after(response)
            if wait is None:
                raise RemoteError(response.status_code, _detail(response), len(x))
            if waited + wait > self.max_wait_s:
                raise RemoteError(response.status_code, f"{_detail(response)} (still refused after waiting {waited:.0f} s "
                                  f"in all; max_wait_s is {self.max_wait_s:g})", len(x))
            log.info("%s asks to retry in %.0f s (%d); waiting", self.name, wait, response.status_code)
            time.sleep(wait)
            waited += wait
        try:
            body = response.json()
            if not isinstance(body, dict):
                raise ValueError(f"a JSON {type(body).__name__}, not an object")
            if "labels" in body:
                return _one_hot(body["labels"], len(x), self.num_classes)
            answers = torch.tensor(body["probabilities"], dtype=torch.float32)
        except Exception as err:  # noqa: BLE001 - whatever the body is, the server answered it: charged, not kept
            raise BadAnswers(f"its answer is not this API's ({_reason(err)}): {response.text[:200]!r}", len(x)) from None
        problem = answer_problem(answers, len(x), self.num_classes)  # per request: one extra row would shift the rest
        if problem is not None:
            raise BadAnswers(problem, len(x))
        return answers

    def __repr__(self) -> str:
        return f"RemoteVictim(url={self.url!r}, model_id={self.model_id!r})"  # never the key


def _retry_after(response) -> float | None:
    """Seconds the server asks a refused request to wait before it is sent again, or ``None``: not to be repeated.

    A 429 with ``Retry-After`` is a rate limit (a 429 without one is the query budget: ``None``); a 503 is a server
    that cannot count queries right now (1 s unless it says). ``Retry-After`` is whole seconds or an HTTP date; one
    that reads as neither counts as 1 s, and so does anything shorter (a server saying 0 is not asked in a loop).

    Returns:
        Seconds to wait (>= 1), or ``None``.
    """
    header = response.headers.get("retry-after")
    if response.status_code not in (429, 503) or (response.status_code == 429 and header is None):
        return None
    if header is None:
        return 1.0
    try:
        return max(float(int(header.strip())), 1.0)
    except ValueError:
        pass
    try:
        return max((parsedate_to_datetime(header) - datetime.now(timezone.utc)).total_seconds(), 1.0)
    except (TypeError, ValueError):  # neither seconds nor a date (with its zone)
        return 1.0


def _one_hot(labels: object, rows: int, num_classes: int) -> Tensor:
    """A label-only answer as one-hot vectors.

    Returns:
        Float one-hot vectors ``(rows, num_classes)``.

    Raises:
        ValueError: ``labels`` is not a list of ``rows`` class ids in ``[0, num_classes)``.
    """
    if not isinstance(labels, list) or len(labels) != rows:
        count = f"{len(labels)} labels" if isinstance(labels, list) else f"a {type(labels).__name__}"
        raise ValueError(f"{count} for {rows} queries")
    bad = [label for label in labels if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"labels {bad[:5]} are not class ids in [0, {num_classes})")
    return nn.functional.one_hot(torch.tensor(labels, dtype=torch.long), num_classes).float()


def _reason(err: BaseException) -> str:  # why an answer could not be read: our own message, or the error's
    return str(err) if isinstance(err, ValueError) and str(err) else f"{type(err).__name__}: {err}"


def _detail(response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:500]
