"""One root: every exception class of the package derives from coco.errors.CocoError, and there is
one usage error (its status is the exit code)."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import coco
from coco.errors import CocoError, OciError, UsageError

SRC = Path(coco.__file__).parent
BUILTIN_EXCEPTIONS = {
    name for name, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, Exception)
}  # KeyboardInterrupt stays allowed: a signal that stops a command as Ctrl-C does (cli/pod.py)
# pid 1 of the pod VM runs before anything but the standard library may be trusted to import.
STANDALONE = {"host/podvm/guest_init.py"}


def test_no_exception_class_outside_the_root() -> None:
    stray = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in STANDALONE or "/protos/" in rel:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                if bases & BUILTIN_EXCEPTIONS and node.name != "CocoError":
                    stray.append(f"{rel}:{node.lineno} {node.name}({', '.join(sorted(bases))})")
    assert stray == []


def test_transport_and_control_flow_errors_are_coco_errors() -> None:
    from coco.cli._args import Usage
    from coco.oci.http import TransportError
    from coco.oci.stream import Cancelled

    assert issubclass(TransportError, OciError) and issubclass(Cancelled, CocoError)
    e = Usage("bad flag")
    assert type(e) is UsageError and e.status == 2 and UsageError("x").status == 1
