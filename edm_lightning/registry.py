"""Names to objects, filled where each object is defined (the idiom of timm's ``register_model``).

Architectures, routers, post-processors, attacks and datasets are chosen by name in configs and
checkpoints; each kind has one :class:`Registry`, and each entry registers itself next to its
definition with ``@REGISTRY.register("name")``, so adding one never means editing a list elsewhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from edm_lightning.errors import ConfigError

__all__ = ["Registry", "import_plugins"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table for one kind of thing, whose unknown names fail with the known ones listed.

    Args:
        kind: what the entries are, in the error message ("architecture", "router").

    Example:
        >>> SHAPES = Registry("shape")
        >>> @SHAPES.register("square")
        ... def square(side):
        ...     return side * side
        >>> SHAPES.get("square")(3)
        9
        >>> SHAPES.get("circle")
        Traceback (most recent call last):
        ...
        edm_lightning.errors.ConfigError: Unknown shape 'circle'. Known shapes: square.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator adding the decorated object under ``name`` (default: its ``__name__``).

        Returns:
            The decorator; it returns the object unchanged.

        Raises:
            ValueError: ``name`` is already registered (two definitions would silently shadow each other).
        """

        def add(obj: T) -> T:
            key = name if name is not None else obj.__name__  # type: ignore[attr-defined]
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The entry called ``name``.

        Returns:
            The registered object.

        Raises:
            ConfigError: no entry has that name (the message lists the known names).
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(f"Unknown {self.kind} {name!r}. Known {self.kind}s: {', '.join(self.names())}.") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, sorted by name."""
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def import_plugins(package: str, path: Iterable[str]) -> None:
    """Import every module of ``package`` (its ``__path__``), so each registers itself without being listed anywhere.

    Called at the end of a plug-in package's ``__init__`` (attacks, routers, post-processors).
    """
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
