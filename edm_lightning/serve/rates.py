"""Rate limits from the serving config: requests and images per second, each with a burst, per client and for all
clients together.

The limits are token buckets kept in the ledger (:meth:`~edm_lightning.serve.ledger.Ledger.admit`), so every replica
on one ledger shares them: two replicas do not give a key twice its rate. A request takes one unit of each requests
bucket and one per image of each images bucket, all at once or none. Budgets bound how much a key may ever ask;
rates bound how fast, which is what an extraction attack with a large budget needs most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from edm_lightning.errors import ConfigError
from edm_lightning.serve.ledger import Bucket

__all__ = ["RateLimit", "RateLimits"]


@dataclass
class RateLimit:
    """How fast one principal (one client, or all clients together) may query; null (``None``): no limit.

    Args:
        requests_per_s: requests per second, sustained.
        request_burst: most requests at once (null: one second's worth, at least 1).
        images_per_s: images per second, sustained.
        image_burst: most images at once (null: one second's worth, at least one batch of ``max_batch``); a batch
            of more images can never pass, and is refused (413).
    """

    requests_per_s: float | None = None
    request_burst: float | None = None
    images_per_s: float | None = None
    image_burst: float | None = None

    def checked(self, where: str, max_batch: int) -> RateLimit:
        """This limit with its bursts filled in (see the arguments).

        Args:
            where: its name in the config, for messages (``client_rate_limit``).
            max_batch: the server's most images per request.

        Returns:
            A copy whose bursts are set wherever its rates are.

        Raises:
            ConfigError: a rate or burst that is not a finite number > 0, a burst without its rate, or a request
                or image burst under 1 (no request could ever pass).
        """
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{where}.{field.name} must be a number > 0 (null: no limit), got {value!r}")
        for rate, burst in (("requests_per_s", "request_burst"), ("images_per_s", "image_burst")):
            if getattr(self, burst) is not None and getattr(self, rate) is None:
                raise ConfigError(f"{where}.{burst} is set but {where}.{rate} is not: set the rate too, or neither")
        if self.request_burst is not None and self.request_burst < 1:
            raise ConfigError(f"{where}.request_burst must be >= 1 (a request takes 1), got {self.request_burst!r}")
        if self.image_burst is not None and self.image_burst < 1:
            raise ConfigError(f"{where}.image_burst must be >= 1 (a batch holds at least 1 image), got "
                              f"{self.image_burst!r}")
        return replace(
            self,
            request_burst=self.request_burst or (max(self.requests_per_s, 1.0) if self.requests_per_s else None),
            image_burst=self.image_burst or (max(self.images_per_s, float(max_batch)) if self.images_per_s else None))

    def buckets(self, name: str, images: int) -> list[Bucket]:
        """The buckets a request of ``images`` images takes from this (checked) limit.

        Returns:
            Its requests bucket and its images bucket (where set), named ``name:requests`` and ``name:images``.
        """
        found = []
        if self.requests_per_s is not None:
            found.append(Bucket(f"{name}:requests", 1.0, float(self.requests_per_s), float(self.request_burst)))
        if self.images_per_s is not None:
            found.append(Bucket(f"{name}:images", float(images), float(self.images_per_s), float(self.image_burst)))
        return found


@dataclass(frozen=True)
class RateLimits:
    """The server's checked limits: one per client (each client its own buckets) and one for all clients together.

    Args:
        client: each client's limit (its buckets are named by the client's name).
        overall: all clients' requests together.
    """

    client: RateLimit
    overall: RateLimit

    @classmethod
    def from_config(cls, client: RateLimit, overall: RateLimit, max_batch: int) -> RateLimits:
        """Checked limits from the config's ``client_rate_limit`` and ``global_rate_limit``.

        Returns:
            The limits, bursts filled in.

        Raises:
            ConfigError: see :meth:`RateLimit.checked`.
        """
        return cls(client.checked("client_rate_limit", max_batch), overall.checked("global_rate_limit", max_batch))

    @property
    def max_images(self) -> int | None:
        """Most images one request can ever pass (the smallest image burst, rounded down), or ``None``: no limit."""
        bursts = [limit.image_burst for limit in (self.client, self.overall) if limit.image_burst is not None]
        return math.floor(min(bursts)) if bursts else None

    def too_many_images(self, images: int) -> str | None:
        """Why a batch of ``images`` can never pass the image bursts (a sentence naming the burst), or ``None``."""
        for where, limit in (("client_rate_limit", self.client), ("global_rate_limit", self.overall)):
            if limit.image_burst is not None and images > limit.image_burst:
                return (f"a batch of {images} images is over the server's image burst of {limit.image_burst:g} "
                        f"({where}.image_burst): no batch larger can ever pass its rate limit; send at most "
                        f"{math.floor(limit.image_burst)} images per request")
        return None

    def buckets(self, client: str, images: int) -> list[Bucket]:
        """Every bucket a request of ``images`` images from ``client`` takes (client names hold no ``:``)."""
        return self.client.buckets(f"client:{client}", images) + self.overall.buckets("global", images)
