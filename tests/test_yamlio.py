"""coco.yamlio: YAML graphs that contain themselves or expand past a bound are refused at once,
and every other unreadable input becomes the caller's one-line error naming it."""

from __future__ import annotations

import pytest

from coco.errors import GenpolicyError
from coco.yamlio import load, load_all


def laughs(levels: int, width: int = 9) -> str:
    """The "billion laughs": each level a list of ``width`` aliases of the one below."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _error(text: str | bytes, **kw: int) -> str:
    with pytest.raises(GenpolicyError) as ei:
        load_all(text, what="pod.yaml", error=GenpolicyError, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("pod.yaml")
    return msg


@pytest.mark.parametrize(
    "text", ["a: &a [*a]", "a: &a {b: *a}", "x: 1\n---\nb: &b [1, [2, {c: *b}]]"]
)
def test_a_value_that_contains_itself_is_refused(text: str) -> None:
    assert "an alias inside its own anchor" in _error(text)


def test_billion_laughs_is_refused_without_expanding_it() -> None:
    assert "(an alias bomb?)" in _error(laughs(9))  # 9**10 nodes expanded, ~400 bytes of YAML


def test_the_bound_counts_expanded_nodes_across_documents() -> None:
    text = laughs(2, 3)  # l0: 4 nodes, l1: 1 + 3*4, l2: 1 + 3*13; mapping + keys: 1 + 3
    assert len(load_all(text, what="x", error=GenpolicyError, max_nodes=4 + 13 + 40 + 4)) == 1
    assert "at most 60 YAML nodes" in _error(text, max_nodes=60)
    assert "at most 70 YAML nodes" in _error(text + "---\n" + text, max_nodes=70)


def test_shared_values_and_merge_keys_still_load() -> None:
    doc = load(
        "base: &b {cpu: 1, mem: 2}\nx: {<<: *b, mem: 3}\ny: [*b, *b]\n",
        what="x",
        error=GenpolicyError,
    )
    assert doc["x"] == {"cpu": 1, "mem": 3} and doc["y"] == [doc["base"], doc["base"]]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"kind: Pod\n\xff\xfe binary", "expected UTF-8 text, found a byte 0xff"),
        ("a: \x00", "not valid YAML: character #x0000"),
        ("a: [", "line 1 column 5: not valid YAML"),
        ("[" * 100_000, "expected YAML of reasonable depth"),
        (
            "!!python/object/apply:os.system [id]",
            "not valid YAML: could not determine a constructor",
        ),
    ],
    ids=["binary", "nul", "unclosed", "deep", "python-tag"],
)
def test_unreadable_yaml_is_one_line(data: str | bytes, needle: str) -> None:
    assert needle in _error(data)


def test_load_takes_one_document() -> None:
    assert load("", what="x", error=GenpolicyError) is None
    with pytest.raises(GenpolicyError, match="expected one YAML document, found 2"):
        load("a: 1\n---\nb: 2\n", what="x", error=GenpolicyError)
