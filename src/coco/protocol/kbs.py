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
from coco.crypto.jose import JoseError, public_key_from_jwk
from coco.errors import KbsError
from coco.jsonfields import Fields
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


# The (kty, alg) pairs and EC curves a guest's ephemeral key may use (kbs_protocol's choices).
TEE_KEY_ALGORITHMS = (("EC", "ECDH-ES+A256KW"), ("RSA", "RSA-OAEP-256"), ("RSA", "RSA1_5"))
TEE_KEY_CURVES = ("P-256", "P-521")


class ProtocolError(KbsError):
    """A KBS protocol message that is not what the protocol allows."""


_FIELDS = Fields(ProtocolError)


def _obj(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, bytes | str):
        value = json_loads(value, what=where, error=ProtocolError)
    return _FIELDS.object(value, where)


@dataclass(frozen=True)
class Request:
    """``POST /kbs/v0/auth`` body."""

    version: str
    tee: str
    extra_params: Any = ""

    @classmethod
    def from_json(cls, data: Any) -> Request:
        obj = _obj(data, "Request")
        _FIELDS.check(obj, "Request", required={"version", "tee"}, optional={"extra-params"})
        return cls(
            _FIELDS.string(obj, "version", "Request"),
            _FIELDS.string(obj, "tee", "Request"),
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
        _FIELDS.check(obj, "Challenge", required={"nonce"}, optional={"extra-params"})
        return cls(_FIELDS.string(obj, "nonce", "Challenge"), obj.get("extra-params", ""))

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
        """Parse and check a supported (kty, alg, crv); :meth:`public_key` loads the key itself."""
        obj = _obj(data, where)
        kty = _FIELDS.string(obj, "kty", where)
        alg = _FIELDS.string(obj, "alg", where)
        if kty == "EC":
            key = cls("EC", alg, crv=_FIELDS.string(obj, "crv", where),
                      x=_FIELDS.string(obj, "x", where), y=_FIELDS.string(obj, "y", where))  # fmt: skip
        elif kty == "RSA":
            key = cls(
                "RSA", alg, n=_FIELDS.string(obj, "n", where), e=_FIELDS.string(obj, "e", where)
            )
        else:
            raise ProtocolError(f"{where}.kty: expected EC or RSA, found {kty!r}")
        if (kty, alg) not in TEE_KEY_ALGORITHMS or (kty == "EC" and key.crv not in TEE_KEY_CURVES):
            raise ProtocolError(
                f"{where}: unsupported kty={kty} alg={alg}"
                + (f" crv={key.crv}" if kty == "EC" else "")
                + ": expected EC P-256/P-521 with ECDH-ES+A256KW, or RSA with RSA-OAEP-256 or RSA1_5"
            )
        return key

    def public_key(self, where: str = "tee-pubkey") -> Any:
        """The key itself, loaded (refuses an EC point off its curve, a malformed modulus)."""
        try:
            return public_key_from_jwk(self.to_json(), where)
        except JoseError as e:
            raise ProtocolError(str(e)) from None

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
        _FIELDS.check(obj, "runtime-data", required={"nonce", "tee-pubkey"}, optional=())
        return cls(
            _FIELDS.string(obj, "nonce", "runtime-data"),
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
        _FIELDS.check(obj, "init-data", required={"format", "body"}, optional=())
        return cls(
            _FIELDS.string(obj, "format", "init-data"), _FIELDS.string(obj, "body", "init-data")
        )

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
        _FIELDS.check(
            obj, "tee-evidence", required={"primary_evidence"}, optional={"additional_evidence"}
        )
        add = _FIELDS.string(obj, "additional_evidence", "tee-evidence", "")
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
        _FIELDS.check(
            obj, "Attestation", required={"runtime-data", "tee-evidence"}, optional={"init-data"}
        )
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
        _FIELDS.check(obj, "ErrorInformation", required={"type", "detail"}, optional=())
        return cls(
            _FIELDS.string(obj, "type", "ErrorInformation"),
            _FIELDS.string(obj, "detail", "ErrorInformation"),
        )

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
