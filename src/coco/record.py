"""Immutable value classes for the modules a short ``coco`` process loads.

``@dataclass`` writes each class's methods as source text and compiles it at import: about 0.7 ms
per class here, on top of ~10 ms to import :mod:`dataclasses` (it loads :mod:`inspect`, :mod:`ast`
and :mod:`dis`). A warm ``coco image pull`` defines eighteen such classes on its way and takes
about 60 ms in all, so they were a third of it. :func:`record` makes the same kind of class (frozen,
slotted, compared and hashed by its fields in order, with a readable ``repr``) from shared methods
instead, in a few microseconds.

    @record
    class Point:
        x: int
        y: int = 0
        tags: tuple[str, ...] = ()
        extra: dict[str, str] = Factory(dict)  # a fresh default for every instance

        def __post_init__(self) -> None: ...  # checks, as with dataclasses

Fields are the class's annotations, in order (``ClassVar`` ones excluded); a field with a default
may not come before one without. :func:`replace` makes a changed copy. Classes elsewhere (not
loaded by short-lived commands) keep using :mod:`dataclasses`.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    T = TypeVar("T")

__all__ = ["Factory", "fields", "record", "replace"]

_MISSING = object()


class Factory:
    """A default made afresh for each instance (``Factory(dict)``, ``Factory(SomeClass)``)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def fields(obj_or_cls: Any) -> tuple[str, ...]:
    """The field names of a record class or instance, in order."""
    return obj_or_cls.__record_fields__  # type: ignore[no-any-return]


def replace(obj: T, **changes: Any) -> T:
    """A copy of record ``obj`` with ``changes`` (its ``__post_init__`` runs again)."""
    names = obj.__record_fields__  # type: ignore[attr-defined]
    unknown = set(changes) - set(names)
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field {sorted(unknown)[0]!r}")
    return type(obj)(**{n: changes[n] if n in changes else getattr(obj, n) for n in names})


def record(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen, slotted value class of its annotated fields (see the module)."""
    ann = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 (inspect is what we avoid)
    names = tuple(n for n, a in ann.items() if "ClassVar" not in str(a))
    ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    defaults: dict[str, Any] = {}
    for n in names:
        if n in ns:
            defaults[n] = ns.pop(n)
        elif defaults:
            raise TypeError(f"{cls.__name__}: field {n!r} without a default follows one with")
    ns["__slots__"] = names
    ns["__match_args__"] = names
    ns["__record_fields__"] = names
    qualname = cls.__qualname__
    post = ns.get("__post_init__")
    given = frozenset(names)
    count = len(names)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > count:
            raise TypeError(f"{qualname}() takes {count} arguments, {len(args)} were given")
        for k in kwargs:
            if k not in given:
                raise TypeError(f"{qualname}() got an unexpected keyword argument {k!r}")
        setter = object.__setattr__
        for i, n in enumerate(names):
            if i < len(args):
                if n in kwargs:
                    raise TypeError(f"{qualname}() got multiple values for argument {n!r}")
                value = args[i]
            elif n in kwargs:
                value = kwargs[n]
            else:
                value = defaults.get(n, _MISSING)
                if value is _MISSING:
                    raise TypeError(f"{qualname}() missing required argument {n!r}")
                if isinstance(value, Factory):
                    value = value.make()
            setter(self, n, value)
        if post is not None:
            post(self)

    def _values(self: Any) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in names)

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{qualname}({inner})"

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return _values(self) == _values(other)

    def __hash__(self: Any) -> int:
        return hash(_values(self))

    def __setattr__(self: Any, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of {qualname}")

    def __delattr__(self: Any, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of {qualname}")

    def __reduce__(self: Any) -> tuple[Any, ...]:
        return (type(self), _values(self))

    for fn in (__init__, __repr__, __eq__, __hash__, __setattr__, __delattr__, __reduce__):
        fn.__qualname__ = f"{qualname}.{fn.__name__}"
        ns.setdefault(fn.__name__, fn)
    new = type(cls)(cls.__name__, cls.__bases__, ns)
    new.__qualname__ = qualname
    return new
