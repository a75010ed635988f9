"""The policy gate: every request is judged by the agent policy before anything happens.

The policy is Rego text in package ``agent_policy`` (:class:`coco.integrity.agent_policy.
AgentPolicy`); a request of message type ``NAME`` is allowed when ``data.agent_policy.NAME`` is
true. A denial answers PERMISSION_DENIED ``<NAME> is blocked by policy: rule <rule>: <field>
expected ..., got ...`` and is logged. Without a policy every request is allowed, as upstream's
default, with a loud warning; with ``require_policy`` every request is refused until
``SetPolicy`` installs one. ``SetPolicy`` is itself judged by the current policy
(``SetPolicyRequest``), the new text must compile (INVALID_ARGUMENT otherwise), and it then
replaces the old policy whole. A policy whose ``AllowRequestsFailingPolicy`` is true lets denied
requests through with a warning (upstream's debugging switch).

Decisions of a policy depend only on the request, so they are remembered (by the policy's digest
and the request's JSON): the ReadStdout loop of a shim costs one evaluation, not one per read.
:attr:`PolicyGate.stats` counts evaluations, cache hits and the time spent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from coco.errors import CocoError
from coco.integrity.agent_policy import AgentPolicy, Decision
from coco.rpc.status import Code, RpcError

log = logging.getLogger(__name__)

_CACHE = 4096


@dataclass
class GateStats:
    evaluations: int = 0
    cache_hits: int = 0
    seconds: float = 0.0  # spent in evaluations (cache misses)
    denials: int = 0


class PolicyGate:
    """The current policy (or none) and the judgement of requests against it."""

    def __init__(self, policy: AgentPolicy | None = None, *, require: bool = False) -> None:
        self._lock = threading.Lock()
        self._policy: AgentPolicy | None = None
        self._permissive = False
        self._digest = ""
        self._cache: OrderedDict[tuple[str, str, str], Decision] = OrderedDict()
        self.require = require
        self.stats = GateStats()
        if policy is not None:
            self._install(policy)
        elif require:
            log.warning("agent policy: none set; every request is refused until SetPolicy")
        else:
            log.warning(
                "agent policy: NONE SET: every request from the host is allowed "
                "(upstream's default; give --policy, an initdata policy.rego or --require-policy)"
            )

    @property
    def policy(self) -> AgentPolicy | None:
        return self._policy

    def _install(self, policy: AgentPolicy) -> None:
        permissive = False
        try:
            permissive = policy.allows_failing_requests()
        except CocoError as e:
            log.warning(
                "agent policy %s: AllowRequestsFailingPolicy not evaluable: %s", policy.where, e
            )
        with self._lock:
            self._policy = policy
            self._permissive = permissive
            self._digest = hashlib.sha256(policy.text.encode()).hexdigest()
            self._cache.clear()
        log.info("agent policy: %s installed (sha256 %s)", policy.where, self._digest)
        if permissive:
            log.warning(
                "agent policy %s: AllowRequestsFailingPolicy is true: denied requests are let "
                "through (debugging only)",
                policy.where,
            )

    def decide(self, name: str, body: dict[str, Any]) -> Decision:
        """The decision for request ``name`` (e.g. ``CreateContainerRequest``), no raising."""
        policy = self._policy
        if policy is None:
            if self.require:
                return Decision(name, False)
            return Decision(name, True)
        key = (self._digest, name, json.dumps(body, sort_keys=True, separators=(",", ":")))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                return hit
        start = time.perf_counter()
        decision = policy.evaluate(name, body)
        with self._lock:
            self.stats.evaluations += 1
            self.stats.seconds += time.perf_counter() - start
            self._cache[key] = decision
            if len(self._cache) > _CACHE:
                self._cache.popitem(last=False)
        return decision

    def check(self, name: str, body: dict[str, Any]) -> bool:
        """Allowed: True. Denied: PERMISSION_DENIED naming the rule and field (logged), or
        False when the policy lets denials through. An evaluation error: INTERNAL."""
        try:
            decision = self.decide(name, body)
        except CocoError as e:
            log.error("agent policy: %s: %s", name, e)
            raise RpcError(Code.INTERNAL, f"{name}: internal error {e}") from None
        if decision.allowed:
            return True
        self.stats.denials += 1
        why = denial_text(decision, no_policy=self._policy is None)
        if self._permissive:
            log.warning(
                "agent policy: %s is blocked by policy: %s (allowed: AllowRequestsFailingPolicy)",
                name,
                why,
            )
            return True
        log.warning("agent policy: %s is blocked by policy: %s", name, why)
        raise RpcError(Code.PERMISSION_DENIED, f"{name} is blocked by policy: {why}")

    def check_quietly(self, name: str, body: dict[str, Any]) -> bool:
        """:meth:`check` answering False instead of raising (ReadStream: data cleared)."""
        try:
            return self.check(name, body)
        except RpcError as e:
            if e.code != Code.PERMISSION_DENIED:
                raise
            return False

    def set_policy(self, text: str) -> None:
        """Replace the policy with ``text`` (SetPolicy, after the gate allowed the request)."""
        try:
            policy = AgentPolicy(text, "SetPolicy")
        except CocoError as e:
            raise RpcError(Code.INVALID_ARGUMENT, f"SetPolicyRequest: {e}") from None
        self._install(policy)

    def allows_set_policy(self) -> bool:
        """With no policy and ``require``, SetPolicy is the one request let through."""
        return self._policy is None and self.require


def denial_text(decision: Decision, *, no_policy: bool = False) -> str:
    if no_policy:
        return "no agent policy is set and --require-policy refuses every request until SetPolicy"
    if decision.violations:
        return str(decision.violations[0])
    return f"rule default: the policy does not allow {decision.request}"
