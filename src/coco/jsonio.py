"""Reading untrusted JSON: one loader every floor uses for bodies, files and sockets.

The standard library's parser recurses once per nesting level, so ``[`` repeated a hundred
thousand times ends in a ``RecursionError`` deep inside it, and bytes that are not UTF-8 end in a
``UnicodeDecodeError`` that does not say which input was at fault. :func:`loads` turns every way
a document can be unreadable into the caller's own error class, with a message that names the
input (``what``), says what was expected and what was found.
"""

from __future__ import annotations

import json
import sys

from coco.errors import CocoError

TYPE_CHECKING = False  # typing stays unloaded: light clients parse JSON too
if TYPE_CHECKING:
    from typing import Any


def decode_text(data: bytes | str, *, what: str, error: type[CocoError]) -> str:
    """``data`` as text: UTF-8 (a BOM is refused by the JSON spec, so not stripped)."""
    if isinstance(data, str):
        return data
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{what}: expected UTF-8 text, found a byte 0x{data[e.start]:02x} "
            f"that is not UTF-8 at offset {e.start} (binary file?)"
        ) from None


def loads(
    data: bytes | str,
    *,
    what: str,
    error: type[CocoError],
) -> Any:
    """Parse ``data`` as one JSON document, or raise ``error`` naming ``what``.

    Refuses: bytes that are not UTF-8, nesting deeper than the parser can follow (about a
    thousand levels: no format of this project comes close), the non-standard constants
    ``NaN``/``Infinity`` and anything that is not JSON.
    """
    text = decode_text(data, what=what, error=error)

    def _no_constants(name: str) -> Any:
        raise ValueError(f"non-standard constant {name}")

    try:
        doc = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise error(
            f"{what}: expected JSON of reasonable depth, found arrays/objects nested "
            f"more than {sys.getrecursionlimit()} levels deep"
        ) from None
    except json.JSONDecodeError as e:
        raise error(
            f"{what}: expected JSON, found invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except ValueError as e:
        raise error(f"{what}: expected standard JSON, found {e}") from None
    return doc
