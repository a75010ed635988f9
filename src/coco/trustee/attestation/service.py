"""The built-in Attestation Service: verify evidence, grade it with a Rego policy, issue an EAR.

For each verification request the TEE's verifier (``coco.tee.get_verifier``) checks the evidence
against the expected report data (HashAlg of the JCS runtime data) and init-data digest; its
claims, shaped as upstream's, become the policy input ``{<tee>: claims, report_data,
runtime_data_claims, init_data, init_data_claims}``. Policy ``<id>_<tee class>`` (``default_cpu``,
``default_gpu``) yields ``trust_claims`` (and optional ``extensions``); the result is an EAR JWT.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import logging
import re
import threading
import time
import tomllib
from dataclasses import dataclass
from typing import Any

from coco.errors import AttestationError, InitdataError, RegoError
from coco.integrity.initdata import Initdata
from coco.protocol.kbs import InitData, TeePubKey, report_data, runtime_data_claims
from coco.rego import RegoPolicy
from coco.tee import get_verifier
from coco.trustee.attestation.ear import TokenSigner, check_trust_vector, ear_status
from coco.trustee.policy_engine import PolicyEngine
from coco.trustee.rvps import Rvps
from coco.trustee.storage import NS_AS_POLICY, Store
from coco.trustee.storage.base import check_key

log = logging.getLogger(__name__)

EAT_PROFILE = "tag:github.com,2024:confidential-containers/Trustee"
_POLICY_RULES = ("trust_claims", "extensions")
# query_reference_value(id), the upstream regorus extension, over the RVPS values in data.
_RV_MODULE = "package policy\n\nquery_reference_value(id) := data.reference_values[id]\n"


@dataclass
class VerificationRequest:
    """One piece of evidence and what it must be bound to.

    ``additional_evidence`` is the composite's device evidence string for the primary TEE and
    ``None`` for a device's own evidence (which binds only the nonce and the key).
    """

    tee: str
    evidence: Any
    nonce: str
    tee_pubkey: TeePubKey
    additional_evidence: str | None = ""
    hash_algorithm: str = "sha384"
    init_data: Initdata | None = None

    @property
    def runtime_data(self) -> dict[str, Any]:
        return runtime_data_claims(self.nonce, self.tee_pubkey, self.additional_evidence)

    @property
    def report_data(self) -> bytes:
        """What the evidence's report data must carry: the client computes it the same way."""
        return report_data(
            self.nonce, self.tee_pubkey, self.additional_evidence, self.hash_algorithm
        )


_PER_REQUEST = ("runtime_data_claims", "report_data")
# `input` used other than as input.<name> or input["<name>"] (whole-document access, iteration,
# `with input as`, imports): the policy might observe the per-request fields.
_OPAQUE_INPUT = re.compile(r'\binput\b(?!\.[A-Za-z_]|\[\s*"[^"\\]*"\s*\])')


@functools.lru_cache(maxsize=64)
def _blind_to_runtime_data(text: str) -> bool:
    if any(name in text for name in _PER_REQUEST):
        return False
    return _OPAQUE_INPUT.search(text) is None


@functools.cache
def default_policy_text(policy_id: str) -> str | None:
    name = {"default_cpu": "default_cpu.rego", "default_gpu": "default_gpu.rego"}.get(policy_id)
    if name is None:
        return None
    return (importlib.resources.files("coco.trustee.attestation") / "policies" / name).read_text()


def compile_attestation_policy(text: str, policy_id: str) -> RegoPolicy:
    """An attestation policy (package ``policy``): ``trust_claims`` and ``extensions``."""
    return RegoPolicy(
        text,
        f"attestation policy {policy_id}",
        package="policy",
        rules=_POLICY_RULES,
        modules={"coco_reference_values.rego": _RV_MODULE},
    )


def parse_init_data(init: InitData) -> Initdata:
    """The init-data of an ``/attest`` request as the one :class:`Initdata` model (TOML only)."""
    if init.format != "toml":
        raise AttestationError(f"init-data: format: expected 'toml', found {init.format!r}")
    try:
        return Initdata.parse(init.body.encode(), "init-data")
    except InitdataError as e:
        raise AttestationError(str(e)) from None


def init_data_claims(init: Initdata) -> dict[str, Any]:
    """The policy's ``init_data_claims``: ``data`` with nested ``*.toml`` files parsed."""
    claims: dict[str, Any] = {}
    for k, v in init.data.items():
        if k.endswith(".toml"):
            try:
                claims[k] = tomllib.loads(v)
                continue
            except tomllib.TOMLDecodeError:
                pass
        claims[k] = v
    return claims


class AttestationService:
    def __init__(
        self,
        store: Store,
        rvps: Rvps,
        signer: TokenSigner,
        *,
        duration_min: int = 5,
        issuer: str = "CoCo-Attestation-Service",
        developer: str = "https://confidentialcontainers.org",
        build: str = "coco attestation-service 0.1.0",
        verbose_token: bool = True,
        engine: PolicyEngine | None = None,
        verifier_settings: dict[str, dict[str, Any]] | None = None,
    ):
        """``engine`` evaluates the policies in bounded worker processes (None: in this one);
        ``verifier_settings`` are each TEE verifier's arguments, by TEE name."""
        self.store = store
        self.rvps = rvps
        self.signer = signer
        self.duration_min = duration_min
        self.issuer = issuer
        self.developer = developer
        self.build = build
        self.verbose_token = verbose_token
        self.engine = engine
        self.verifier_settings = verifier_settings or {}
        self._policies: dict[str, RegoPolicy] = {}
        self._results: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ policies

    def set_policy(self, policy_id: str, text: str) -> None:
        """Compile and store an attestation policy (refused if it does not compile or recurses)."""
        check_key(policy_id)
        policy = compile_attestation_policy(text, policy_id)
        policy.check_recursion()
        self.store.put(NS_AS_POLICY, f"{policy_id}.rego", text.encode())
        with self._lock:
            self._policies[policy_id] = policy

    def policy(self, policy_id: str) -> RegoPolicy:
        raw = self.store.get(NS_AS_POLICY, f"{policy_id}.rego")
        text = raw.decode() if raw is not None else default_policy_text(policy_id)
        if text is None:
            raise AttestationError(f"attestation policy {policy_id!r} not found")
        with self._lock:
            cached = self._policies.get(policy_id)
        if cached is not None and cached.text == text:
            return cached
        policy = compile_attestation_policy(text, policy_id)
        with self._lock:
            self._policies[policy_id] = policy
        return policy

    def _evaluate(
        self, policy: RegoPolicy, annotated: dict[str, Any], reference_values: dict[str, Any]
    ) -> dict[str, Any]:
        """Evaluate, memoized when the policy provably cannot see the per-request fields.

        A policy that names neither ``runtime_data_claims`` nor ``report_data`` and reads
        ``input`` only as ``input.<name>`` / ``input["<name>"]`` gets the same answer whatever
        those fields hold; its result is then cached on the rest of the input and the reference
        values (both part of the key).
        """
        data = {"reference_values": reference_values}
        evaluate = self.engine.evaluate if self.engine else RegoPolicy.evaluate
        if not _blind_to_runtime_data(policy.text):
            return evaluate(policy, annotated, data)
        stable = {k: v for k, v in annotated.items() if k not in _PER_REQUEST}
        key = (policy.digest, json.dumps([stable, reference_values], sort_keys=True))
        with self._lock:
            hit = self._results.get(key)
        if hit is not None:
            return copy.deepcopy(hit)
        result = evaluate(policy, stable, data)
        with self._lock:
            self._results[key] = copy.deepcopy(result)
            while len(self._results) > 2048:
                self._results.pop(next(iter(self._results)))
        return result

    def list_policies(self) -> list[str]:
        ids = {k.removesuffix(".rego") for k in self.store.keys(NS_AS_POLICY)}
        return sorted(ids | {"default_cpu", "default_gpu"})

    # ------------------------------------------------------------------------------ evaluate

    def _annotate(self, req: VerificationRequest) -> tuple[str, dict[str, Any]]:
        init = req.init_data
        verifier = get_verifier(req.tee, self.verifier_settings.get(req.tee))
        claims = verifier.verify(req.evidence, req.report_data, init.digest() if init else None)
        body = dict(claims.claims)
        report_data = body.pop("report_data", None)
        init_data = body.pop("init_data", None)
        annotated: dict[str, Any] = {req.tee: body}
        if report_data is not None:
            rdc = dict(req.runtime_data)
            if not self.verbose_token:
                rdc.pop("additional-evidence", None)
            annotated["report_data"] = report_data
            annotated["runtime_data_claims"] = rdc
        if init_data is not None:
            annotated["init_data"] = init_data
            annotated["init_data_claims"] = init_data_claims(init) if init else None
        return claims.tee_class, annotated

    def evaluate(
        self, requests: list[VerificationRequest], policy_ids: list[str] | None = None
    ) -> str:
        """Verify every request and return the signed EAR token (raises AttestationError)."""
        return self.issue(requests, policy_ids)[0]

    def issue(
        self, requests: list[VerificationRequest], policy_ids: list[str] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Like :meth:`evaluate`, also returning the token's claims."""
        if not requests:
            raise AttestationError("attestation: no evidence to verify")
        policy_id = (policy_ids or ["default"])[0]
        reference_values = None
        counters: dict[str, int] = {}
        submods: dict[str, Any] = {}
        for req in requests:
            tee_class, annotated = self._annotate(req)
            if reference_values is None:
                reference_values = self.rvps.all_values()
            full_id = f"{policy_id}_{tee_class}"
            try:
                result = self._evaluate(self.policy(full_id), annotated, reference_values)
            except RegoError as e:
                raise AttestationError(str(e)) from None
            vector = check_trust_vector(result.get("trust_claims"), f"attestation policy {full_id}")
            index = counters.get(tee_class, 0)
            counters[tee_class] = index + 1
            submod: dict[str, Any] = {
                "ear.status": ear_status(vector),
                "ear.trustworthiness-vector": vector,
                "ear.appraisal-policy-id": policy_id,
                "ear.veraison.annotated-evidence": annotated,
            }
            exts = result.get("extensions")
            if isinstance(exts, list):
                for ext in exts:
                    if (
                        isinstance(ext, dict)
                        and isinstance(ext.get("name"), str)
                        and "value" in ext
                    ):
                        submod[ext["name"]] = ext["value"]
            submods[f"{tee_class}{index}"] = submod
        now = int(time.time())
        payload = {
            "eat_profile": EAT_PROFILE,
            "iat": now,
            "ear.verifier-id": {"developer": self.developer, "build": self.build},
            "submods": submods,
            "exp": now + 60 * self.duration_min,
            "iss": self.issuer,
        }
        return self.signer.sign(payload), payload


__all__ = ["AttestationService", "VerificationRequest", "default_policy_text", "parse_init_data"]
