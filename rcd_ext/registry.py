"""A name -> value registry: the one mechanism behind every extension point.

Alpha strategies (`rcd_ext.alpha_strategies`), init strategies (`rcd_ext.init_strategies`),
model families (`rcd_ext.models.adapters`) and tasks (`rcd_ext.tasks.registry`) each keep one
`Registry`. Register with a decorator or a call, look up with `get` (a one-line ValueError naming
the known names), list with `names()`. `view()` is a live read-only sequence of the names, for
module constants that must see later registrations (`STRATEGIES`, `INIT_STRATEGIES`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar, overload

__all__ = ["NamesView", "Registry"]

Value = TypeVar("Value")


class Registry(Generic[Value]):
    """Values by name, in registration order.

    Args:
        kind: what a name names, for error messages ("alpha strategy", "task", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._values: dict[str, Value] = {}

    @overload
    def register(self, name: str) -> Callable[[Value], Value]: ...

    @overload
    def register(self, name: str, value: Value) -> Value: ...

    def register(self, name: str, value: Value | None = None):
        """Register `value` under `name` (`register(name, value)`), or decorate:
        `@registry.register(name)`. Returns the value. ValueError when `name` is not a
        non-empty string or already names a different value."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if value is None:
            return lambda decorated: self.register(name, decorated)
        existing = self._values.get(name)
        if existing is not None and existing is not value:
            raise ValueError(f"{self.kind} {name!r} is already registered ({existing!r}); "
                             f"unregister it first")
        self._values[name] = value
        return value

    def unregister(self, name: str) -> Value:
        """Remove `name` (tests and plugins that register for a while); returns its value."""
        self.get(name)
        return self._values.pop(name)

    def get(self, name: str) -> Value:
        """The value registered as `name`; ValueError naming the known names otherwise."""
        try:
            return self._values[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise ValueError(f"unknown {self.kind} {name!r}; known: "
                             f"{', '.join(self._values)}") from None

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._values)

    def items(self) -> tuple[tuple[str, Value], ...]:
        """(name, value) pairs, in registration order."""
        return tuple(self._values.items())

    def view(self) -> NamesView:
        """A live read-only sequence of the names (sees later registrations)."""
        return NamesView(self)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._values


class NamesView(Sequence[str]):
    """The names of a `Registry` as a tuple-like sequence that follows the registry: `in`,
    iteration, indexing, `len` and a tuple's repr (error messages print it as before)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, index):  # int or slice, as a tuple's
        return self._registry.names()[index]

    def __len__(self) -> int:
        return len(self._registry.names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.names())

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, NamesView) else other)

    def __repr__(self) -> str:
        return repr(self._registry.names())
