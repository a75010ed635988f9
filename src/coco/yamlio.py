"""Reading untrusted YAML: one loader for every YAML file the project reads (Kubernetes workloads,
genpolicy config files, registries.d).

YAML anchors and aliases make a document a graph, not a tree: ``a: &a [*a]`` (12 bytes) is a list
that contains itself, and a "billion laughs" file of a few hundred bytes is a tree of billions of
nodes. Both are valid YAML that PyYAML builds happily; any code that then walks the result runs
forever. :func:`load_all` composes each document's node graph, refuses one that contains itself
and one whose tree (every alias expanded) holds more than ``max_nodes`` nodes, and only then builds
the Python objects, so whatever walks them walks a bounded tree. Nesting deeper than the
composer can follow, bytes that are not UTF-8 and every other way a file is not YAML raise the
caller's error class too, with a message that names the input (``what``).

The pure-Python loader is used on purpose: libyaml's composer recurses in C without a limit.
"""

from __future__ import annotations

from typing import Any

import yaml

from coco.errors import CocoError
from coco.jsonio import decode_text

# Every alias expanded, the nodes (scalars, sequences, mappings, keys included) all documents of
# one input may hold: far above any Kubernetes manifest, far below what hangs a walk over it.
MAX_NODES = 1_000_000


class _TooBig(CocoError):
    pass


class _Recursive(CocoError):
    pass


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _tree_size(root: yaml.Node, budget: int) -> int:
    """The number of nodes of ``root`` with every alias expanded, counted in time proportional
    to the distinct nodes (each shared node once); a node inside itself raises _Recursive, more
    than ``budget`` nodes _TooBig."""
    size: dict[int, int] = {}
    open_: set[int] = set()  # the nodes whose subtree is being counted: the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, counted = stack.pop()
        key = id(node)
        if counted:
            open_.discard(key)
            n = 1 + sum(size[id(c)] for c in _children(node))
            if n > budget:
                raise _TooBig
            size[key] = n
            continue
        if key in size:
            continue
        open_.add(key)
        stack.append((node, True))
        for c in _children(node):
            if id(c) in open_:
                raise _Recursive
            if id(c) not in size:
                stack.append((c, False))
    return size[id(root)]


def load_all(
    data: str | bytes,
    *,
    what: str,
    error: type[CocoError],
    max_nodes: int = MAX_NODES,
) -> list[Any]:
    """Every document of the YAML stream ``data`` (empty documents are ``None``), or ``error``
    naming ``what``: not UTF-8, not YAML, nested too deep, a node that contains itself, or more
    than ``max_nodes`` nodes once aliases are expanded."""
    text = decode_text(data, what=what, error=error)
    try:
        loader = yaml.SafeLoader(text)  # checks that every character may appear in YAML
    except yaml.YAMLError as e:
        raise error(_describe(e, what)) from None
    docs: list[Any] = []
    budget = max_nodes
    try:
        while loader.check_node():
            node = loader.get_node()
            where = f"{what}: document {len(docs) + 1}"
            try:
                budget -= _tree_size(node, budget)
            except _Recursive:
                raise error(
                    f"{where}: expected a tree of values, found an alias inside its own anchor "
                    f"(line {node.start_mark.line + 1}: a value that contains itself)"
                ) from None
            except _TooBig:
                raise error(
                    f"{what}: expected at most {max_nodes} YAML nodes with aliases expanded, "
                    f"found more in document {len(docs) + 1} (an alias bomb?)"
                ) from None
            docs.append(loader.construct_document(node))
    except yaml.YAMLError as e:
        raise error(_describe(e, what)) from None
    except RecursionError:
        raise error(
            f"{what}: expected YAML of reasonable depth, found collections nested too deeply"
        ) from None
    finally:
        loader.dispose()
    return docs


def load(
    data: str | bytes, *, what: str, error: type[CocoError], max_nodes: int = MAX_NODES
) -> Any:
    """The one document of ``data`` (``None`` when empty); see :func:`load_all`."""
    docs = load_all(data, what=what, error=error, max_nodes=max_nodes)
    if len(docs) > 1:
        raise error(f"{what}: expected one YAML document, found {len(docs)}")
    return docs[0] if docs else None


def _describe(e: yaml.YAMLError, what: str) -> str:
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.reader.ReaderError):
        c = e.character
        code = c if isinstance(c, int) else ord(c)
        problem = f"character #x{code:04x}: {e.reason}"
        return f"{what}: position {e.position}: not valid YAML: {problem}"
    pos = f" line {mark.line + 1} column {mark.column + 1}:" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    text = f"{context}: {problem}" if context else problem
    return f"{what}:{pos} not valid YAML: {' '.join(str(text).split())}"
