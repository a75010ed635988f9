"""The one strict field reader (coco.jsonfields): messages, types, the caller's error class."""

from __future__ import annotations

import pytest

from coco.errors import KbsError, ManifestError
from coco.jsonfields import REQUIRED, Fields, kind

F = Fields(ManifestError)


def test_kind_speaks_json() -> None:
    assert [kind(v) for v in ({}, [], "", True, 1, 1.5, None)] == [
        "an object", "an array", "a string", "a boolean", "an integer", "a number", "null"]  # fmt: skip


def test_check_unknown_then_missing_in_the_callers_class() -> None:
    with pytest.raises(ManifestError, match=r"^m: unknown field 'x' \(allowed: a, b\)$"):
        F.check({"a": 1, "x": 2}, "m", required=["a"], optional=["b"])
    with pytest.raises(ManifestError, match=r"^m: unknown fields 'x', 'y'"):
        F.check({"x": 1, "y": 2}, "m", optional=["a"])
    with pytest.raises(ManifestError, match=r"^m: missing fields 'a', 'c'$"):
        F.check({}, "m", required={"c", "a"})
    assert F.check({"z": 1}, "m", optional=None) == {"z": 1}  # formats that ignore unknowns
    with pytest.raises(KbsError, match=r"^cfg: unknown key 'z'"):
        Fields(KbsError, noun="key").check({"z": 1}, "cfg")
    with pytest.raises(ManifestError, match=r"^m: expected an object, found an array$"):
        F.check([], "m")


def test_get_types_and_defaults() -> None:
    assert F.get({}, "a", "m", int, 5) == 5
    assert F.get({"a": 2}, "a", "m", float) == 2  # JSON numbers: an integer is a number
    with pytest.raises(
        ManifestError, match=r"^m.a: expected an integer, found a boolean \(True\)$"
    ):
        F.get({"a": True}, "a", "m", int)
    with pytest.raises(ManifestError, match=r"^m: missing field 'a'$"):
        F.get({}, "a", "m", int, REQUIRED)
    with pytest.raises(ManifestError, match=r"^m.s: expected a non-empty string, found ''$"):
        F.string({"s": ""}, "s", "m", nonempty=True)
    with pytest.raises(
        ManifestError, match=r"^m.l: expected an array of strings, found an integer"
    ):
        F.strings({"l": ["a", 1]}, "l", "m")
    with pytest.raises(ManifestError, match=r"^m.ann.k: expected a string, found null$"):
        F.mapping({"ann": {"k": None}}, "ann", "m")
    with pytest.raises(
        ManifestError, match=r"^doc: spec: expected a string or null, found an array$"
    ):
        F.expect([], "doc: spec", (str, type(None)))
