"""Evaluate Kata agent API requests against an agent policy, the way the agent does.

A policy is Rego text in package ``agent_policy``: rules plus ``policy_data := {...}``. A request
``NAME`` with JSON body ``input`` is allowed when ``data.agent_policy.NAME`` is true. With our own
rules (``rules.rego`` next to this module) a denial also names the failing rule and field: the
rules compute ``why_NAME``, a list of ``{rule, field, expected, got}`` objects.

The Rego engine is the ground floor's :class:`coco.rego.RegoPolicy`, the one the KBS uses too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from coco.errors import AgentPolicyError
from coco.rego import RegoPolicy

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
    """A compiled agent policy (full Rego text, package ``agent_policy``)."""

    def __init__(self, text: str, where: str = "policy") -> None:
        # Compiled now, so a broken policy is reported before any request.
        self._rego = RegoPolicy(text, where, package="agent_policy", error=AgentPolicyError)
        self.text = text
        self.where = where

    @classmethod
    def from_data(cls, policy_data: dict[str, Any], rules: str | None = None) -> AgentPolicy:
        return cls(policy_text(rules or default_rules(), policy_data), "policy_data")

    def allows_failing_requests(self) -> bool:
        """``data.agent_policy.AllowRequestsFailingPolicy`` with an empty input: upstream's
        debugging switch that lets denied requests through."""
        out = self._rego.evaluate({}, rules=("AllowRequestsFailingPolicy",))
        return out.get("AllowRequestsFailingPolicy") is True

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
        # One evaluation for both: the explanation shares the checks, so it is nearly free.
        out = self._rego.evaluate(body, rules=(request, f"why_{request}"))
        result = out.get(request)
        if isinstance(result, dict):  # newer rules answer {allowed, ops}
            result = result.get("allowed")
        if result is True:
            return Decision(request, True)
        if result is not False and result is not None:
            raise AgentPolicyError(
                f"{self.where}: data.agent_policy.{request}: expected true or false, got {result!r}"
            )
        # An undefined answer is an error for the agent, never an allow.
        return Decision(request, False, _violations(out.get(f"why_{request}")))


def _violations(why: Any) -> tuple[Violation, ...]:
    if not isinstance(why, list):
        return ()
    out = []
    for v in why:
        if isinstance(v, dict) and {"rule", "field"} <= v.keys():
            out.append(Violation(str(v["rule"]), str(v["field"]), v.get("expected"), v.get("got")))
    return tuple(out)
