"""KBS protocol 0.4.0 messages (kbs-types) and the report-data binding.

One strict class per message: :class:`Request`, :class:`Challenge`, :class:`TeePubKey`,
:class:`RuntimeData`, :class:`InitData`, :class:`CompositeEvidence`, :class:`Attestation`,
:class:`ErrorInformation`. ``from_json`` refuses unknown fields and wrong types with a message that
names the field; the one exception is :class:`TeePubKey`, which drops unknown members exactly as
the upstream deserializer does, because the binding hash is computed over the re-serialized key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from coco.crypto.jcs import canonicalize
from coco.errors import KbsError
from coco.jsonio import loads as json_loads

PROTOCOL_VERSION = "0.4.0"
ERROR_TYPE_PREFIX = "https://github.com/confidential-containers/kbs/errors/"
SESSION_COOKIE = "kbs-session-id"
HASH_ALGORITHMS = ("sha256", "sha384", "sha512", "sm3")

# kbs-types `Tee` wire names (serde lowercase).
TEE_NAMES = (
    "az-snp-vtpm", "az-tdx-vtpm", "nvidia", "sgx", "snp", "tdx", "cca", "csv", "se",
    "hygondcu", "tpm", "sample", "sampledevice", "nvidiadpu",
)  # fmt: skip


class ProtocolError(KbsError):
    """A KBS protocol message that is not what the protocol allows."""


def _obj(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, bytes | str):
        value = json_loads(value, what=where, error=ProtocolError)
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


def _check_keys(obj: dict[str, Any], where: str, required: set[str], optional: set[str]) -> None:
    unknown = set(obj) - required - optional
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    missing = required - set(obj)
    if missing:
        raise ProtocolError(f"{where}: missing field(s) {', '.join(sorted(missing))}")


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise ProtocolError(f"{where}.{key}: expected a string, found {type(v).__name__}")
    return v


@dataclass(frozen=True)
class Request:
    """``POST /kbs/v0/auth`` body."""

    version: str
    tee: str
    extra_params: Any = ""

    @classmethod
    def from_json(cls, data: Any) -> Request:
        obj = _obj(data, "Request")
        _check_keys(obj, "Request", {"version", "tee"}, {"extra-params"})
        return cls(
            _str(obj, "version", "Request"),
            _str(obj, "tee", "Request"),
            obj.get("extra-params", ""),
        )

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "tee": self.tee, "extra-params": self.extra_params}


@dataclass(frozen=True)
class Challenge:
    """``/auth`` response: the nonce and extra parameters (``""`` for every TEE but SE)."""

    nonce: str
    extra_params: Any = ""

    @classmethod
    def from_json(cls, data: Any) -> Challenge:
        obj = _obj(data, "Challenge")
        _check_keys(obj, "Challenge", {"nonce"}, {"extra-params"})
        return cls(_str(obj, "nonce", "Challenge"), obj.get("extra-params", ""))

    def to_json(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "extra-params": self.extra_params}

    def hash_algorithm(self) -> str:
        """The binding hash the server selected (``selected-hash-algorithm``), SHA-384 by default."""
        if isinstance(self.extra_params, dict):
            sel = self.extra_params.get("selected-hash-algorithm")
            if isinstance(sel, str) and sel.lower() in HASH_ALGORITHMS:
                return sel.lower()
        return "sha384"


@dataclass(frozen=True)
class TeePubKey:
    """``tee-pubkey``: an EC (P-256/P-521, ECDH-ES+A256KW) or RSA (RSA-OAEP-256/RSA1_5) JWK."""

    kty: str
    alg: str
    crv: str | None = None
    x: str | None = None
    y: str | None = None
    n: str | None = None
    e: str | None = None

    @classmethod
    def from_json(cls, data: Any, where: str = "tee-pubkey") -> TeePubKey:
        obj = _obj(data, where)
        kty = _str(obj, "kty", where)
        if kty == "EC":
            return cls("EC", _str(obj, "alg", where), crv=_str(obj, "crv", where),
                       x=_str(obj, "x", where), y=_str(obj, "y", where))  # fmt: skip
        if kty == "RSA":
            return cls(
                "RSA", _str(obj, "alg", where), n=_str(obj, "n", where), e=_str(obj, "e", where)
            )
        raise ProtocolError(f"{where}.kty: expected EC or RSA, found {kty!r}")

    def to_json(self) -> dict[str, Any]:
        if self.kty == "EC":
            return {"kty": "EC", "crv": self.crv, "alg": self.alg, "x": self.x, "y": self.y}
        return {"kty": "RSA", "alg": self.alg, "n": self.n, "e": self.e}


@dataclass(frozen=True)
class RuntimeData:
    nonce: str
    tee_pubkey: TeePubKey

    @classmethod
    def from_json(cls, data: Any) -> RuntimeData:
        obj = _obj(data, "runtime-data")
        _check_keys(obj, "runtime-data", {"nonce", "tee-pubkey"}, set())
        return cls(
            _str(obj, "nonce", "runtime-data"),
            TeePubKey.from_json(obj["tee-pubkey"], "runtime-data.tee-pubkey"),
        )

    def to_json(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "tee-pubkey": self.tee_pubkey.to_json()}


@dataclass(frozen=True)
class InitData:
    format: str
    body: str

    @classmethod
    def from_json(cls, data: Any) -> InitData:
        obj = _obj(data, "init-data")
        _check_keys(obj, "init-data", {"format", "body"}, set())
        return cls(_str(obj, "format", "init-data"), _str(obj, "body", "init-data"))

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "body": self.body}


@dataclass(frozen=True)
class CompositeEvidence:
    """``tee-evidence``: the primary TEE's evidence plus a JSON string of device evidence."""

    primary_evidence: Any
    additional_evidence: str = ""

    @classmethod
    def from_json(cls, data: Any) -> CompositeEvidence:
        obj = _obj(data, "tee-evidence")
        _check_keys(obj, "tee-evidence", {"primary_evidence"}, {"additional_evidence"})
        add = obj.get("additional_evidence", "")
        if not isinstance(add, str):
            raise ProtocolError(
                f"tee-evidence.additional_evidence: expected a string, found {type(add).__name__}"
            )
        return cls(obj["primary_evidence"], add)

    def to_json(self) -> dict[str, Any]:
        return {
            "primary_evidence": self.primary_evidence,
            "additional_evidence": self.additional_evidence,
        }

    def additional(self) -> dict[str, Any]:
        """The device evidence by TEE name (empty when there is none)."""
        if not self.additional_evidence:
            return {}
        parsed = json_loads(
            self.additional_evidence, what="tee-evidence.additional_evidence", error=ProtocolError
        )
        if not isinstance(parsed, dict):
            raise ProtocolError("tee-evidence.additional_evidence: expected a JSON object")
        return parsed


@dataclass(frozen=True)
class Attestation:
    """``POST /kbs/v0/attest`` body."""

    runtime_data: RuntimeData
    tee_evidence: CompositeEvidence
    init_data: InitData | None = None

    @classmethod
    def from_json(cls, data: Any) -> Attestation:
        obj = _obj(data, "Attestation")
        _check_keys(obj, "Attestation", {"runtime-data", "tee-evidence"}, {"init-data"})
        init = obj.get("init-data")
        return cls(
            RuntimeData.from_json(obj["runtime-data"]),
            CompositeEvidence.from_json(obj["tee-evidence"]),
            InitData.from_json(init) if init is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "init-data": self.init_data.to_json() if self.init_data else None,
            "runtime-data": self.runtime_data.to_json(),
            "tee-evidence": self.tee_evidence.to_json(),
        }


@dataclass(frozen=True)
class ErrorInformation:
    """Every non-200 KBS answer: ``{"type": ".../errors/<Variant>", "detail": "..."}``."""

    type: str
    detail: str

    @classmethod
    def from_json(cls, data: Any) -> ErrorInformation:
        obj = _obj(data, "ErrorInformation")
        _check_keys(obj, "ErrorInformation", {"type", "detail"}, set())
        return cls(_str(obj, "type", "ErrorInformation"), _str(obj, "detail", "ErrorInformation"))

    @property
    def variant(self) -> str:
        return self.type.removeprefix(ERROR_TYPE_PREFIX)


def hash_bytes(data: bytes, alg: str) -> bytes:
    if alg not in ("sha256", "sha384", "sha512", "sm3"):
        raise ProtocolError(
            f"hash algorithm: expected one of {', '.join(HASH_ALGORITHMS)}, found {alg!r}"
        )
    try:
        return hashlib.new(alg, data).digest()
    except ValueError:
        raise ProtocolError(f"hash algorithm {alg} is not available in this Python") from None


def runtime_data_claims(nonce: str, tee_pubkey: TeePubKey, additional_evidence: str | None) -> dict:
    """The structured runtime data the binding hashes (``additional-evidence`` only for primary)."""
    rd: dict[str, Any] = {"nonce": nonce, "tee-pubkey": tee_pubkey.to_json()}
    if additional_evidence is not None:
        rd["additional-evidence"] = additional_evidence
    return rd


def report_data(
    nonce: str, tee_pubkey: TeePubKey, additional_evidence: str | None = "", alg: str = "sha384"
) -> bytes:
    """HashAlg(JCS(runtime data)): what the evidence's report data must carry.

    Pass ``additional_evidence=None`` for device (additional) evidence, which binds only the
    nonce and the key.
    """
    return hash_bytes(
        canonicalize(runtime_data_claims(nonce, tee_pubkey, additional_evidence)), alg
    )
