"""coco.record: frozen, slotted value classes, compared with what dataclasses would give."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

import pytest

from coco.record import Factory, fields, record, replace


@record
class Point:
    x: int
    y: int = 0
    tags: dict[str, str] = Factory(dict)

    LIMIT = 100  # not annotated: a class attribute, not a field

    def __post_init__(self) -> None:
        if self.x > self.LIMIT:
            raise ValueError(f"x must be <= {self.LIMIT}, found {self.x}")

    def moved(self, dx: int) -> Point:
        return replace(self, x=self.x + dx)


@dataclasses.dataclass(frozen=True, slots=True)
class DPoint:
    x: int
    y: int = 0
    tags: dict[str, str] = dataclasses.field(default_factory=dict)


def test_behaves_as_a_frozen_slotted_dataclass() -> None:
    p, d = Point(1, y=2), DPoint(1, y=2)
    assert repr(p) == repr(d).replace("DPoint", "Point")
    assert fields(Point) == tuple(f.name for f in dataclasses.fields(DPoint)) == ("x", "y", "tags")
    assert p == Point(1, 2, {}) and p != Point(1, 3) and p != (1, 2, {})
    assert Point(1).tags is not Point(1).tags  # a fresh default each time
    assert not hasattr(p, "__dict__") and Point.__slots__ == ("x", "y", "tags")
    assert hash(Point(1, tags=None)) == hash(Point(1, tags=None))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        hash(p)  # a dict field: unhashable, as with dataclasses
    with pytest.raises(AttributeError):
        p.x = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.y  # type: ignore[misc]
    assert Point.LIMIT == 100 and p.moved(3) == Point(4, 2)
    match p:
        case Point(x, y):
            assert (x, y) == (1, 2)


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="missing required argument 'x'"):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        Point(1, z=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values for argument 'x'"):
        Point(1, x=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="takes 3 arguments, 4 were given"):
        Point(1, 2, {}, 4)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="x must be <= 100, found 101"):
        Point(101)
    with pytest.raises(ValueError):  # replace runs the checks again
        replace(Point(1), x=500)
    with pytest.raises(TypeError, match="has no field 'z'"):
        replace(Point(1), z=1)
    with pytest.raises(TypeError, match="without a default follows one with"):

        @record
        class Bad:
            a: int = 0
            b: int


def test_pickles_and_copies() -> None:
    import copy

    p = Point(7, 8, {"a": "b"})
    assert pickle.loads(pickle.dumps(p)) == p
    assert copy.copy(p) == p and copy.deepcopy(p) == p


def test_a_warm_pull_path_loads_neither_dataclasses_nor_typing() -> None:
    """What the records are for: the modules of a warm pull import without dataclasses (and
    its inspect, ast, dis) and without typing."""
    mods = [
        "coco.image.pull", "coco.image.bundle", "coco.image.store", "coco.oci.transport",
        "coco.oci.models", "coco.oci.reference", "coco.oci.auth", "coco.crypto.digest",
        "coco.cli.image", "coco.image.request", "coco.image.service",
    ]  # fmt: skip
    code = (
        f"import sys\nfor m in {mods!r}: __import__(m)\n"
        "print(sorted(m for m in ('dataclasses', 'typing', 'inspect') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
