"""Evaluate Kata agent API requests against an agent policy, the way the agent does.

A policy is Rego text in package ``agent_policy``: rules plus ``policy_data := {...}``. A request
``NAME`` with JSON body ``input`` is allowed when ``data.agent_policy.NAME`` is true. With our own
rules (``rules.rego`` next to this module) a denial also names the failing rule and field: the
rules compute ``why_NAME``, a list of ``{rule, field, expected, got}`` objects.

The Rego engine is ``regopy`` (rego-cpp). The KBS has its own small wrapper around it in
``coco.trustee``; integrity may not import trustee, hence this second, equally small one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import regopy

from coco.errors import AgentPolicyError

_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*Request$")


def default_rules() -> str:
    """Our own ``rules.rego`` text."""
    return resources.files("coco.integrity").joinpath("rules.rego").read_text(encoding="utf-8")


def policy_text(rules: str, policy_data: dict[str, Any]) -> str:
    """The full policy as genpolicy writes it: the rules, then ``policy_data := {...}``."""
    return rules.rstrip("\n") + "\n\npolicy_data := " + json.dumps(policy_data, indent=2) + "\n"


@dataclass(frozen=True, slots=True)
class Violation:
    """One failed check: the rule, the request field, what the policy expected, what came."""

    rule: str
    field: str
    expected: Any
    got: Any

    def __str__(self) -> str:
        return (
            f"rule {self.rule}: {self.field} expected {_show(self.expected)}, got {_show(self.got)}"
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one request; ``violations`` is empty when allowed or unexplained."""

    request: str
    allowed: bool
    violations: tuple[Violation, ...] = ()

    def message(self) -> str:
        if self.allowed:
            return "allowed"
        if self.violations:
            return f"denied: {self.request}: {self.violations[0]}"
        return f"denied: {self.request}: rule default: the policy does not allow {self.request}"


def _show(v: Any) -> str:
    if isinstance(v, str):
        return repr(v) if v == "" or v != v.strip() else v
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 400 else text[:397] + "..."


class AgentPolicy:
    """A compiled agent policy (full Rego text, module ``agent_policy``)."""

    def __init__(self, text: str, where: str = "policy") -> None:
        self.text = text
        self.where = where
        # Compile once now, so a broken policy is reported before any request.
        self._interpreter()

    @classmethod
    def from_data(cls, policy_data: dict[str, Any], rules: str | None = None) -> AgentPolicy:
        return cls(policy_text(rules or default_rules(), policy_data), "policy_data")

    def _interpreter(self) -> regopy.Interpreter:
        rego = regopy.Interpreter()
        try:
            with _quiet_fd(1), _quiet_fd(2):  # rego-cpp also prints its errors
                rego.add_module("agent_policy", self.text)
        except Exception as e:  # regopy raises plain errors
            raise AgentPolicyError(
                f"{self.where}: Rego does not compile: {_rego_error(self.text, e)}"
            ) from None
        return rego

    def _query(self, rego: regopy.Interpreter, query: str) -> Any:
        try:
            out = rego.query(query)
        except Exception as e:
            raise AgentPolicyError(
                f"{self.where}: {query}: evaluation failed: {_first(e)}"
            ) from None
        text = str(out)
        if text.startswith("error") or text.strip() == "":
            raise AgentPolicyError(f"{self.where}: {query}: evaluation failed: {_first(text)}")
        if text.strip() == "undefined":
            return None
        try:
            obj = json.loads(text)
        except ValueError:
            raise AgentPolicyError(
                f"{self.where}: {query}: unexpected engine output: {_first(text)}"
            ) from None
        exprs = obj.get("expressions") if isinstance(obj, dict) else None
        if not exprs:
            return None
        return exprs[0]

    def evaluate(self, request: str, body: dict[str, Any]) -> Decision:
        """Decide ``request`` (e.g. ``CreateContainerRequest``) with JSON body ``body``."""
        if not _NAME.match(request):
            raise AgentPolicyError(
                f"request name: expected an agent API message name like CreateContainerRequest, "
                f"got {request!r}"
            )
        if not isinstance(body, dict):
            raise AgentPolicyError(
                f"{request}: expected the request as a JSON object, got {type(body).__name__}"
            )
        rego = self._interpreter()
        rego.set_input(regopy.Input(body))
        with _quiet(self.text):
            result = self._query(rego, f"data.agent_policy.{request}")
        if isinstance(result, dict):  # newer rules answer {allowed, ops}
            result = result.get("allowed")
        if result is True:
            return Decision(request, True)
        if result is not False and result is not None:
            raise AgentPolicyError(
                f"{self.where}: data.agent_policy.{request}: expected true or false, got {result!r}"
            )
        # An undefined answer is an error for the agent, never an allow.
        with _quiet(self.text):
            why = self._query(rego, f"data.agent_policy.why_{request}")
        return Decision(request, False, _violations(why))


def _violations(why: Any) -> tuple[Violation, ...]:
    if not isinstance(why, list):
        return ()
    out = []
    for v in why:
        if isinstance(v, dict) and {"rule", "field"} <= v.keys():
            out.append(Violation(str(v["rule"]), str(v["field"]), v.get("expected"), v.get("got")))
    return tuple(out)


def _first(e: object) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _rego_error(text: str, e: object) -> str:
    """``line L column C: message`` from rego-cpp's error tree (offsets into ``text``)."""
    raw = str(e)
    msg = re.search(r"\(errormsg \d+:([^)]*)\)", raw)
    pos = re.search(r"\(error \d+:[^|]*\|(\d+)\|", raw)
    if msg is None:
        return _first(raw)
    if pos is None:
        return msg.group(1)
    offset = int(pos.group(1))
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"line {line} column {col}: {msg.group(1)}"


@contextlib.contextmanager
def _quiet(text: str) -> Iterator[None]:
    """Keep Rego ``print()`` output (upstream rules print a lot) off our standard output."""
    if "print(" not in text:
        yield
        return
    with _quiet_fd(1):
        yield


@contextlib.contextmanager
def _quiet_fd(fd: int) -> Iterator[None]:
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
