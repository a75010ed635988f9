"""containerd's filter syntax, as its snapshot ``List`` (Walk) sends it.

A request holds filters that are ORed; a filter is selectors joined by ``,`` that are ANDed; a
selector is a field path (``name``, ``parent``, ``kind``, ``labels.<key>``, a part may be quoted:
``labels."containerd.io/snapshot.ref"``) alone (present) or followed by ``==``, ``!=`` or ``~=``
(regular expression) and a value, quoted or up to the next ``,``. containerd's metadata store
checks what it gets back itself; this keeps ``ctr snapshots ls`` style filters working too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from coco.host.snapshotter import InvalidArgument

Fields = Callable[[list[str]], str | None]  # a field path -> its value, None when absent


@dataclass(frozen=True)
class Selector:
    path: list[str]
    op: str  # "" (present), "==", "!=", "~="
    value: str

    def match(self, fields: Fields) -> bool:
        have = fields(self.path)
        if self.op == "":
            return have is not None
        if self.op == "==":
            return have == self.value
        if self.op == "!=":
            return have != self.value
        return have is not None and re.search(self.value, have) is not None


def _quoted(text: str, i: int, where: str) -> tuple[str, int]:
    quote = text[i]
    out = []
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if c == quote:
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise InvalidArgument(f"filter {where!r}: expected a closing {quote}, found the end")


def parse(text: str) -> list[Selector]:
    """One filter (selectors joined by ``,``)."""
    selectors = []
    i, n = 0, len(text)
    while i < n:
        path: list[str] = []
        while True:
            while i < n and text[i] == " ":
                i += 1
            if i < n and text[i] in "\"'`":
                part, i = _quoted(text, i, text)
            else:
                m = re.compile(r"[A-Za-z0-9_\-/:+@]+").match(text, i)
                if m is None:
                    raise InvalidArgument(
                        f"filter {text!r}: expected a field name at offset {i}, found "
                        f"{text[i : i + 10]!r}"
                    )
                part, i = m.group(0), m.end()
            path.append(part)
            if i < n and text[i] == ".":
                i += 1
                continue
            break
        while i < n and text[i] == " ":
            i += 1
        op, value = "", ""
        for candidate in ("==", "!=", "~="):
            if text.startswith(candidate, i):
                op = candidate
                i += 2
                break
        if op:
            while i < n and text[i] == " ":
                i += 1
            if i < n and text[i] in "\"'`/":
                value, i = _quoted(text, i, text)
            else:
                end = text.find(",", i)
                end = n if end < 0 else end
                value, i = text[i:end].strip(), end
            if op == "~=":
                try:
                    re.compile(value)
                except re.error as e:
                    raise InvalidArgument(f"filter {text!r}: bad regular expression: {e}") from None
        while i < n and text[i] == " ":
            i += 1
        if i < n:
            if text[i] != ",":
                raise InvalidArgument(f"filter {text!r}: expected ',' at offset {i}")
            i += 1
        selectors.append(Selector(path, op, value))
    return selectors


def matcher(filters: list[str]) -> Callable[[Fields], bool]:
    """A predicate: does a snapshot (given by its field lookup) match any of ``filters``."""
    parsed = [parse(f) for f in filters if f.strip()]
    if not parsed:
        return lambda fields: True
    return lambda fields: any(all(s.match(fields) for s in sel) for sel in parsed)
