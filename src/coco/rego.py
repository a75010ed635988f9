"""The one Rego engine wrapper: every Rego policy coco evaluates goes through :class:`RegoPolicy`.

The Trustee's attestation and resource policies and the Kata agent policy all run here, on
``regopy`` (rego-cpp). A policy is one Rego text in a known package, plus optional helper
modules. It is compiled into a bundle (the query plan) once per distinct ``data`` document and
set of rules, and the bundle is cached, so an evaluation only builds the input and runs the plan.

``evaluate(input, data, rules)`` returns ``{rule: value}`` for the rules that are defined; an
undefined rule is absent, and what that means (deny, error) is the caller's call. A policy that
does not compile, an input that is not JSON, and an evaluation error (a conflict, a missing
function) raise one-line errors naming the policy and the rules, or the line and column: a
:class:`~coco.errors.RegoError`, or the error family the caller passes (e.g. ``AgentPolicyError``).
Rego ``print()`` output is kept off our standard output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import regopy
from regopy import rego_shared as _rs

from coco.errors import CocoError, RegoError

__all__ = ["RegoPolicy"]

_PKG = re.compile(r"^\s*package\s+([A-Za-z_][A-Za-z0-9_.]*)", re.M)
_RULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ERRMSG = re.compile(rb"\(errormsg (\d+):")
_ERRPOS = re.compile(r"\(error \d+:([^|\s]*)\|(\d+)\|")
_MAIN = "policy.rego"
_OUT = "coco_out.rego"
_CACHE = 256
_PLAN_TIMEOUT = 30.0

_LIB = _rs.rego
_OK = _rs.Code.OK
_quiet_lock = threading.Lock()


class RegoPolicy:
    """One Rego policy text in package ``package``, queried for some of its rules.

    ``where`` names the policy in every error (``"resource policy"``, a file path). ``rules`` is
    the default rule set of :meth:`evaluate`; ``modules`` are helper modules (name to text)
    compiled beside the policy. The policy is compiled at once, so a broken one is refused
    before any input.
    """

    def __init__(
        self,
        text: str,
        where: str,
        *,
        package: str,
        rules: Sequence[str] = (),
        modules: Mapping[str, str] | None = None,
        error: type[CocoError] = RegoError,
    ) -> None:
        self.text = text
        self.where = where
        self.package = package
        self.rules = tuple(rules)
        self.error = error
        self.digest = hashlib.sha384(text.encode()).hexdigest()
        found = _PKG.search(text)
        if found is None:
            raise error(f"{where}: expected a 'package {package}' declaration, found none")
        if found.group(1) != package:
            raise error(f"{where}: expected 'package {package}', found {found.group(1)!r}")
        self._modules = {_MAIN: text, **(modules or {})}
        self._prints = any("print(" in t for t in self._modules.values())
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], regopy.Bundle] = OrderedDict()
        self._lock = threading.Lock()
        if self.rules:
            self._bundle("{}", self.rules)
        else:  # nothing to plan yet: parse only
            with self._compile_errors():
                self._parsed()

    def evaluate(
        self, input_doc: Any, data: Mapping[str, Any] | None = None, rules: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The defined rules among ``rules`` (default: the policy's), given ``input_doc``."""
        names = tuple(rules) or self.rules
        if not names:
            return {}
        try:
            data_json = json.dumps(data or {}, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise self.error(f"{self.where}: data: expected a JSON document: {e}") from None
        bundle = self._bundle(data_json, names)
        runner = regopy.Interpreter()
        runner.set_input(self._input(input_doc))
        with self._quiet():
            try:
                out = _rs.rego_bundle_query(runner._impl, bundle._impl)
            except _rs.RegoError as e:
                raise self._failed(names, _messages(str(e))) from None
        try:
            ok, text = _rs.rego_output_ok(out), _rs.rego_output_string(out)
        finally:
            _rs.rego_free_output(out)
        if not ok or text.startswith("(error"):
            raise self._failed(names, _messages(text))
        if text == "undefined":
            return {}
        try:
            value = json.loads(text).get("bindings", {}).get("x")
        except ValueError:  # rego-cpp does not escape '"' in some computed strings
            raise self._failed(
                names, [f"the engine's result is not JSON: {text[:200]!r}"]
            ) from None
        return value if isinstance(value, dict) else {}

    def spec(self) -> dict[str, Any]:
        """What rebuilds this policy elsewhere (another process): ``RegoPolicy(**spec)``-shaped."""
        return {
            "text": self.text,
            "where": self.where,
            "package": self.package,
            "rules": list(self.rules),
            "modules": {k: v for k, v in self._modules.items() if k != _MAIN},
        }

    def check_recursion(self) -> None:
        """Refuse a policy whose rules or functions depend on themselves (``x := y; y := x``).

        rego-cpp finds recursion only while evaluating; this plans the whole package and looks
        for a cycle among the planned rules, so a policy is refused before it is ever used.
        Planning runs in a child process: rego-cpp has been seen to abort the whole process in
        ``save_bundle`` after many policies were compiled in it, and a policy upload must never
        take its server down. A child that dies gives a warning and no verdict (evaluation stays
        bounded by its caller's limits); a compile error in the child is this policy's error.
        """
        spec = json.dumps(self.spec()).encode()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "coco.rego"],
                input=spec,
                capture_output=True,
                timeout=_PLAN_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise self.error(
                f"{self.where}: expected a policy that can be planned within "
                f"{_PLAN_TIMEOUT:g} s, found one whose planning did not end"
            ) from None
        if proc.returncode == 2:
            raise self.error(proc.stderr.decode(errors="replace").strip() or self.where)
        if proc.returncode != 0:
            logging.getLogger(__name__).warning(
                "%s: the recursion check could not run (planner exited with %s); "
                "the policy is accepted and its evaluations stay bounded",
                self.where,
                proc.returncode,
            )
            return
        try:
            calls = {k: set(v) for k, v in json.loads(proc.stdout).items()}
        except (ValueError, AttributeError, TypeError):
            logging.getLogger(__name__).warning("%s: the recursion check gave no plan", self.where)
            return
        cycle = _cycle(calls)
        if cycle:
            names = " -> ".join(c.removeprefix("g0.data.") for c in cycle)
            raise self.error(
                f"{self.where}: expected rules that do not depend on themselves, found the "
                f"recursion {names}"
            )

    def _call_graph(self) -> dict[str, list[str]]:
        """Which planned function calls which (run in the planner child, see check_recursion)."""
        with self._compile_errors():
            interp = self._parsed()
            bundle = interp.build(f"x := data.{self.package}", [])
            with tempfile.TemporaryDirectory(prefix="coco-rego-") as d:
                interp.save_bundle(os.path.join(d, "b"), bundle)
                with open(os.path.join(d, "b", "plan.json"), "rb") as f:
                    plan = json.load(f)
        calls: dict[str, list[str]] = {}
        for func in plan.get("funcs", {}).get("funcs", []):
            found: set[str] = set()
            _calls(func.get("blocks"), found)
            calls[func["name"]] = sorted(found)
        return calls

    def _failed(self, rules: tuple[str, ...], messages: list[str]) -> CocoError:
        why = messages[0] if messages else "rego-cpp gave no reason (conflicting rule values?)"
        what = f"rule {rules[0]}" if len(rules) == 1 else f"rules {', '.join(rules)}"
        return self.error(f"{self.where}: {what}: evaluation failed: {why}")

    def _bundle(self, data_json: str, rules: tuple[str, ...]) -> regopy.Bundle:
        key = (data_json, rules)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        for r in rules:
            if not _RULE.match(r):
                raise self.error(f"{self.where}: expected a rule name, found {r!r}")
        out = "package coco_out\n\n" + "".join(
            f'out["{r}"] := data.{self.package}.{r}\n' for r in rules
        )
        with self._compile_errors():
            interp = self._parsed()
            interp.add_module(_OUT, out)
            interp.add_data_json(data_json)
            bundle = interp.build("x := data.coco_out.out", [])
        with self._lock:
            self._cache[key] = bundle
            while len(self._cache) > _CACHE:
                self._cache.popitem(last=False)
        return bundle

    def _parsed(self) -> regopy.Interpreter:
        """An interpreter holding the policy's modules (parsing them raises syntax errors)."""
        interp = regopy.Interpreter()
        interp.log_level = _rs.LogLevel.NONE  # else rego-cpp prints its errors on stdout
        for name, text in self._modules.items():
            interp.add_module(name, text)
        return interp

    @contextlib.contextmanager
    def _compile_errors(self) -> Iterator[None]:
        try:
            yield
        except _rs.RegoError as e:
            raise self.error(f"{self.where}: Rego does not compile: {self._position(e)}") from None

    def _position(self, e: Exception) -> str:
        """``line L column C: message`` (naming the module if not the policy) from rego-cpp."""
        raw = str(e)
        messages = _messages(raw)
        if not messages:
            return " ".join(raw.split())[:300]
        pos = _ERRPOS.search(raw)
        if pos is None or pos.group(1) not in self._modules:
            return messages[0]
        module, offset = pos.group(1), int(pos.group(2))
        text = self._modules[module].encode()
        line = text.count(b"\n", 0, offset) + 1
        col = len(text[text.rfind(b"\n", 0, offset) + 1 : offset].decode(errors="replace")) + 1
        name = "" if module == _MAIN else f"{module} "
        return f"{name}line {line} column {col}: {messages[0]}"

    def _input(self, value: Any) -> regopy.Input:
        """The input document built with direct C calls (regopy's builder is several times slower)."""
        inp = regopy.Input.__new__(regopy.Input)
        inp._impl = p = _rs.rego_new_input()  # freed by Input.__del__, also on errors below
        lib = _LIB

        def add(v: Any) -> int:
            if v is True or v is False:
                return lib.regoInputBoolean(p, v)
            if isinstance(v, str):
                return lib.regoInputString(p, v.encode("utf-8"))
            if isinstance(v, dict):
                for k, item in v.items():
                    if add(k) != _OK or add(item) != _OK or lib.regoInputObjectItem(p) != _OK:
                        return -1
                return lib.regoInputObject(p, len(v))
            if isinstance(v, list | tuple):
                for item in v:
                    if add(item) != _OK:
                        return -1
                return lib.regoInputArray(p, len(v))
            if isinstance(v, int):
                if -(1 << 63) <= v < 1 << 63:
                    return lib.regoInputInt(p, v)
                raise self.error(f"{self.where}: input: expected a 64-bit integer, found {v}")
            if isinstance(v, float):
                return lib.regoInputFloat(p, v)
            if v is None:
                return lib.regoInputNull(p)
            raise self.error(f"{self.where}: input: expected JSON values, found {type(v).__name__}")

        if add(value) != _OK:
            raise self.error(f"{self.where}: input: the Rego engine refused the input document")
        return inp

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Send Rego ``print()`` output (upstream agent rules print a lot) to nowhere."""
        if not self._prints:
            yield
            return
        with _quiet_lock:  # fd 1 is process-wide: one redirection at a time
            sys.stdout.flush()
            saved = os.dup(1)
            sink = os.open(os.devnull, os.O_WRONLY)
            os.dup2(sink, 1)
            os.close(sink)
            try:
                yield
            finally:
                os.dup2(saved, 1)
                os.close(saved)


def _calls(node: Any, out: set[str]) -> None:
    """The functions a plan fragment calls (``CallStmt``), added to ``out``."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if n.get("type") == "CallStmt" and isinstance(n.get("stmt"), dict):
                out.add(str(n["stmt"].get("func")))
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)


def _cycle(calls: dict[str, set[str]]) -> list[str]:
    """One cycle of the call graph ``calls`` (first node repeated at the end), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(calls):
        if state.get(root):
            continue
        path = [root]
        todo = [iter(sorted(calls[root]))]
        state[root] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
                continue
            if nxt not in calls or state.get(nxt) == 2:
                continue
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            state[nxt] = 1
            path.append(nxt)
            todo.append(iter(sorted(calls[nxt])))
    return []


def _messages(raw: str) -> list[str]:
    """The ``errormsg`` texts of a rego-cpp error tree (each is length-prefixed)."""
    b = raw.encode()
    return [
        b[m.end() : m.end() + int(m.group(1))].decode(errors="replace") for m in _ERRMSG.finditer(b)
    ]


def _plan_main() -> None:
    """``python -m coco.rego``: read a policy spec on stdin, print its call graph as JSON.

    Exit 2 with the one-line error on stderr when the policy does not compile.
    """
    try:
        spec = json.loads(sys.stdin.buffer.read())
        policy = RegoPolicy(**{**spec, "rules": ()})
        graph = policy._call_graph()
    except CocoError as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(2)
    sys.stdout.write(json.dumps(graph))


if __name__ == "__main__":
    _plan_main()
