"""Reading the fields of a parsed document strictly: one reader for every format of the project.

:mod:`coco.jsonio` turns untrusted bytes into Python values; this module checks the shape of those
values (JSON bodies, TOML configs, YAML manifests). A :class:`Fields` is bound to the caller's
error class, so each package raises its own family, and every message has the same form::

    <where>: expected an object, found an array
    <where>: unknown field 'x' (allowed: a, b)
    <where>: missing field 'a'
    <where>.<key>: expected a string, found an integer
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from coco.errors import CocoError

TYPE_CHECKING = False  # typing stays unloaded in short processes
if TYPE_CHECKING:
    from typing import Any, Final

__all__ = ["REQUIRED", "Fields", "kind"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()
"""The ``default`` of a field that must be present."""

_NAMES: dict[type, str] = {
    bool: "a boolean",
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def kind(value: object) -> str:
    """What ``value`` is, in the words of JSON: ``an object``, ``an array``, ``a string`` ..."""
    for t, name in _NAMES.items():  # bool before int: True is an int to Python
        if isinstance(value, t):
            return name
    return type(value).__name__


def _expected(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(_NAMES.get(t, t.__name__) for t in ts)


def _is(value: object, types: type | tuple[type, ...]) -> bool:
    ts = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in ts:  # JSON true is not a number
        return False
    if isinstance(value, int) and not isinstance(value, bool) and float in ts:
        return True
    return isinstance(value, ts)


def _names(keys: Iterable[str]) -> str:
    return ", ".join(repr(k) for k in keys)


class Fields:
    """Strict field readers that raise ``error``.

    ``noun`` names a member (``field`` in JSON, ``key`` in TOML); ``unknown`` is the word for a
    member outside the allowed set (``unsupported`` where the format knows it but we do not).
    """

    def __init__(
        self, error: type[CocoError], *, noun: str = "field", unknown: str = "unknown"
    ) -> None:
        self.error = error
        self.noun = noun
        self.unknown = unknown

    def object(self, value: Any, where: str) -> dict[str, Any]:
        """``value`` itself when it is an object (a dict)."""
        if not isinstance(value, dict):
            raise self.error(f"{where}: expected an object, found {kind(value)}")
        return value

    def check(
        self,
        value: Any,
        where: str,
        *,
        required: Iterable[str] = (),
        optional: Iterable[str] | None = (),
    ) -> dict[str, Any]:
        """``value`` as an object with every ``required`` key and no key outside both sets.

        ``optional=None`` lets unknown keys through (formats that must ignore them).
        """
        obj = self.object(value, where)
        required = list(required)
        if optional is not None:
            allowed = set(required) | set(optional)
            unknown = sorted(k for k in obj if k not in allowed)
            if unknown:
                s = "s" if len(unknown) > 1 else ""
                raise self.error(
                    f"{where}: {self.unknown} {self.noun}{s} {_names(unknown)} "
                    f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
                )
        missing = sorted(k for k in required if k not in obj)
        if missing:
            s = "s" if len(missing) > 1 else ""
            raise self.error(f"{where}: missing {self.noun}{s} {_names(missing)}")
        return obj

    def get(
        self,
        obj: Mapping[str, Any],
        key: str,
        where: str,
        types: type | tuple[type, ...],
        default: Any = REQUIRED,
    ) -> Any:
        """``obj[key]`` checked against ``types`` (``bool`` is never an ``int``); ``default`` when absent."""
        if key not in obj:
            if default is REQUIRED:
                raise self.error(f"{where}: missing {self.noun} {key!r}")
            return default
        return self.expect(obj[key], f"{where}.{key}", types)

    def expect(self, value: Any, where: str, types: type | tuple[type, ...]) -> Any:
        """``value`` itself when it is of ``types`` (a value already taken out of its object)."""
        if not _is(value, types):
            raise self.error(
                f"{where}: expected {_expected(types)}, found {kind(value)}{_short(value)}"
            )
        return value

    def string(
        self,
        obj: Mapping[str, Any],
        key: str,
        where: str,
        default: Any = REQUIRED,
        *,
        nonempty: bool = False,
    ) -> Any:
        """``obj[key]`` as a string (``nonempty``: refuse ``""``)."""
        value = self.get(obj, key, where, str, default)
        if nonempty and value == "":
            raise self.error(f"{where}.{key}: expected a non-empty string, found ''")
        return value

    def strings(self, obj: Mapping[str, Any], key: str, where: str, default: Any = REQUIRED) -> Any:
        """``obj[key]`` as a list of strings."""
        value = self.get(obj, key, where, list, default)
        if value is not default and not all(isinstance(x, str) for x in value):
            bad = next(x for x in value if not isinstance(x, str))
            raise self.error(
                f"{where}.{key}: expected an array of strings, found {kind(bad)} in it"
            )
        return value

    def mapping(self, obj: Mapping[str, Any], key: str, where: str, default: Any = REQUIRED) -> Any:
        """``obj[key]`` as an object of strings (labels, annotations)."""
        value = self.get(obj, key, where, dict, default)
        if value is not default:
            for k, v in value.items():
                if not isinstance(v, str):
                    raise self.error(f"{where}.{key}.{k}: expected a string, found {kind(v)}")
        return value


def _short(value: object) -> str:
    if isinstance(value, dict | list) or value is None:
        return ""
    text = repr(value)
    return f" ({text[:40]}...)" if len(text) > 43 else f" ({text})"
