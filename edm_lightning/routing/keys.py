"""The keyed routers' secret key: where it comes from, how it is hidden, and its public fingerprint.

The key is resolved from an argument, ``$EDM_ROUTER_KEY`` or the file ``$EDM_ROUTER_KEY_FILE`` (or the public
default, with a loud warning: experiments only; a server refuses it, and any short key, however it arrives);
configs type it as jsonargparse's ``SecretStr``, so dumps show ``**********``; a short keyed digest, its
fingerprint, tells runs apart without revealing it.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import warnings

from jsonargparse.typing import SecretStr

from edm_lightning.errors import ConfigError

__all__ = ["DEFAULT_ROUTER_KEY", "MIN_SECRET_KEY_BYTES", "ROUTER_KEY_ENV", "ROUTER_KEY_FILE_ENV", "SECRET_MASK",
           "PublicRouterKeyWarning", "as_secret", "check_key_fingerprint", "key_fingerprint", "resolve_router_key"]

DEFAULT_ROUTER_KEY = "edm-lightning"  # public: experiments only (a warning says so)
ROUTER_KEY_ENV = "EDM_ROUTER_KEY"
ROUTER_KEY_FILE_ENV = "EDM_ROUTER_KEY_FILE"
SECRET_MASK = "**********"  # what jsonargparse writes for a SecretStr
MIN_SECRET_KEY_BYTES = 16  # a served key's least length in bytes: 32 hex digits (128 bits) are what the message suggests
_MAKE_A_KEY = "python -c \"import secrets; print(secrets.token_hex(32))\""
_warned_public_key = False


def resolve_router_key(key: str | bytes | SecretStr | None = None, require_secret: bool = False) -> bytes:
    """The keyed router's secret key as bytes: ``key`` if given, else ``$EDM_ROUTER_KEY``, else the contents of
    the file ``$EDM_ROUTER_KEY_FILE``, else the public default :data:`DEFAULT_ROUTER_KEY`, with a loud warning
    (also when the public default is given explicitly). A key from the environment or a key file is its text as
    it reads: a UTF-8 byte-order mark an editor saved before it and the whitespace around it are not part of it.

    With ``require_secret`` (a server: its key must be one nobody else can compute), the public default is
    refused however it arrives (unset, or set explicitly in the environment, a key file or a config), and so
    is a key shorter than :data:`MIN_SECRET_KEY_BYTES` or made of fewer than 4 distinct characters.

    Configs type the key as jsonargparse's ``SecretStr``, so config dumps, ``--print_config`` and logged
    configs show ``**********`` instead; a key read back from such a dump is refused rather than used.

    Returns:
        The key, 1 to 64 bytes (16 to 64 with ``require_secret``).

    Raises:
        ConfigError: an empty or too long key, a key file that cannot be read, the mask of a saved config, or,
            with ``require_secret``, no key, the public default or a key too short or too plain to be secret.
    """
    if isinstance(key, SecretStr):
        key = key.get_secret_value()
    source = "the config"
    if key is None and os.environ.get(ROUTER_KEY_ENV):
        key, source = _as_typed(os.fsencode(os.environ[ROUTER_KEY_ENV])), f"${ROUTER_KEY_ENV}"
    elif key is None and os.environ.get(ROUTER_KEY_FILE_ENV):
        path = os.environ[ROUTER_KEY_FILE_ENV]
        try:
            key, source = _as_typed(open(path, "rb").read()), f"the key file {path!r}"
        except OSError as err:
            raise ConfigError(f"cannot read the router key file {path!r} (${ROUTER_KEY_FILE_ENV}): {err.strerror}") from None
    elif key is None and require_secret:
        raise ConfigError(f"no router key is set, and the public default key would let anyone compute which member answers "
                          f"a query: set ${ROUTER_KEY_ENV} or ${ROUTER_KEY_FILE_ENV} to a random key ({_MAKE_A_KEY})")
    elif key is None:
        key, source = DEFAULT_ROUTER_KEY, "the public default"  # warned about below
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if _as_typed(raw) == SECRET_MASK.encode():
        raise ConfigError(
            f"the router key from {source} is {SECRET_MASK!r}, the mask a saved config shows in place of the key: "
            f"give the real key through ${ROUTER_KEY_ENV} or ${ROUTER_KEY_FILE_ENV} (or --...router_key)"
        )
    if not 0 < len(raw) <= hashlib.blake2b.MAX_KEY_SIZE:
        raise ConfigError(f"the router key from {source} must be 1 to {hashlib.blake2b.MAX_KEY_SIZE} bytes, got {len(raw)}")
    if require_secret:
        _refuse_public_key(raw, source)
    elif _is_public_default(raw):
        _warn_public_key()  # unset or set explicitly: anyone can compute the routes
    return raw


def _as_typed(raw: bytes) -> bytes:
    """A key as its text reads: without the byte-order mark an editor may save before it (``utf-8-sig``) or the
    whitespace around it; a key that is not UTF-8 text (random bytes) loses a leading mark and ASCII whitespace.

    Returns:
        The key's bytes, what the routers use (from the environment or a key file) and what the checks see.
    """
    try:
        return raw.decode("utf-8-sig").strip().encode()
    except UnicodeDecodeError:
        return raw.removeprefix(codecs.BOM_UTF8).strip()


def _is_public_default(raw: bytes) -> bool:
    return _as_typed(raw).lower() == DEFAULT_ROUTER_KEY.encode()


def _refuse_public_key(raw: bytes, source: str) -> None:
    """Refuse a key anyone can compute: the public default (in any case, with any spaces or byte-order mark around
    it), a short or plain one (measured without them).

    Raises:
        ConfigError: such a key, with how to make a random one.
    """
    typed = _as_typed(raw)
    if _is_public_default(typed):
        raise ConfigError(f"the router key from {source} is the public default {DEFAULT_ROUTER_KEY!r}, which anyone can use "
                          f"to compute which member answers a query: set ${ROUTER_KEY_ENV} or ${ROUTER_KEY_FILE_ENV} to a "
                          f"random key ({_MAKE_A_KEY})")
    if len(typed) < MIN_SECRET_KEY_BYTES or len(set(typed)) < 4:
        raise ConfigError(f"the router key from {source} is too short or too plain to be secret ({len(typed)} bytes, "
                          f"{len(set(typed))} distinct): a served key needs at least {MIN_SECRET_KEY_BYTES} bytes of random "
                          f"text ({_MAKE_A_KEY})")


def as_secret(key: str | bytes | SecretStr | None) -> SecretStr | None:
    """``key`` wrapped so that ``repr``, ``str`` and config dumps never show it (``None`` stays ``None``).

    Returns:
        A ``SecretStr``, or ``None``.
    """
    if key is None or isinstance(key, SecretStr):
        return key
    return SecretStr(key.decode("latin-1") if isinstance(key, bytes) else str(key))


def key_fingerprint(key: str | bytes | SecretStr | None) -> str:
    """A short public name of a router key (a keyed hash of a fixed text), to tell runs apart without the key.

    Returns:
        8 hex digits; equal keys give equal fingerprints.
    """
    raw = resolve_router_key(key) if not isinstance(key, bytes) else key
    return hashlib.blake2b(b"edm-lightning router key fingerprint", digest_size=4, key=raw).hexdigest()


def check_key_fingerprint(key: str | bytes | SecretStr | None, expected: str, where: str) -> None:
    """Refuse a router key whose fingerprint is not ``expected`` (the key resolved as :func:`resolve_router_key` does).

    Raises:
        ConfigError: another key, with both fingerprints and where to set the right one.
    """
    found = key_fingerprint(key)
    if found != expected:
        raise ConfigError(f"{where} was set up with the router key of fingerprint {expected}, but the key given "
                          f"(argument, ${ROUTER_KEY_ENV}, ${ROUTER_KEY_FILE_ENV} or the public default) has fingerprint "
                          f"{found}: set ${ROUTER_KEY_ENV} to the key that served it")


def _warn_public_key() -> None:
    global _warned_public_key
    if _warned_public_key:
        return
    _warned_public_key = True
    message = (f"WARNING: the keyed router uses the public default key {DEFAULT_ROUTER_KEY!r}: anyone can compute "
               f"which member answers a query. Set ${ROUTER_KEY_ENV} or ${ROUTER_KEY_FILE_ENV} to a random key "
               f"(e.g. `{_MAKE_A_KEY}`) before serving a real model.")
    warnings.warn(message, PublicRouterKeyWarning, stacklevel=3)


class PublicRouterKeyWarning(UserWarning):
    """The keyed router runs with the public default key (fine for experiments, not for a deployment)."""
