"""Name -> object registries, so configs can pick builders by name (`loss.name: flow_matching`).

`get` also takes an import string `pkg.module:Attr`, the escape hatch that lets a config use user code
without registering it first.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """`Registry.get` was given a name nobody registered."""

    def __str__(self) -> str:
        # KeyError's default str is the repr of its argument, which would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class ImportStringError(ImportError):
    """A `pkg.module:Attr` import string could not be resolved."""


class Registry(Generic[T]):
    """Maps names to objects of one kind; `kind` ("loss", "model") only words the error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@losses.register("mse")` registers the decorated object under `name` and returns it."""
        if not name or ":" in name:
            # ":" marks an import string in `get`, so such a name could never be looked up.
            raise ValueError(f"invalid {self.kind} name {name!r}: must be non-empty and contain no ':'")

        def decorator(obj: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered to {existing!r}")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The object registered as `name`, or the attribute named by an import string `pkg.module:Attr`."""
        if ":" in name:
            return self._import(name)
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self._unknown_message(name)) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def _unknown_message(self, name: str) -> str:
        known = self.names()
        if not known:
            return f"unknown {self.kind} {name!r}: no {self.kind} names are registered"
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (
            f"unknown {self.kind} {name!r}{hint}; known {self.kind} names: {', '.join(known)};"
            " or give an import string `pkg.module:Name`"
        )

    def _import(self, spec: str) -> T:
        module_name, _, attr_path = spec.partition(":")
        if not module_name or not attr_path:
            raise ImportStringError(f"malformed {self.kind} import string {spec!r}: expected `pkg.module:Name`")
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportStringError(f"cannot import module {module_name!r} for {self.kind} {spec!r}: {exc}") from exc
        for attr in attr_path.split("."):  # dotted attributes reach nested objects, e.g. `mod:Outer.Inner`
            try:
                obj = getattr(obj, attr)
            except AttributeError as exc:
                raise ImportStringError(f"{self.kind} {spec!r}: {obj!r} has no attribute {attr!r}") from exc
        return obj
