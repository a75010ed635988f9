"""The CoCo AnnotationPacket and the keyprovider ``UnWrapKey`` the hub answers with it.

An image encrypted for the ``attestation-agent`` key provider carries, in its
``org.opencontainers.image.enc.keys.provider.attestation-agent`` annotation, the base64 of::

    {"kid":"kbs:///default/key/key_id1","wrapped_data":"<std-b64>","iv":"<std-b64>",
     "wrap_type":"A256GCM"}

(version 2 adds ``version`` "0.1.0", ``provider`` "kbs", ``provider_settings``, ``annotations``).
``wrapped_data`` is the layer's private options (its key, nonce and digest) encrypted under a key
encryption key (KEK) that lives in the KBS under ``kid``: the guest gets it only after attesting.
With another ``provider`` the packet is opened by that KMS provider's decrypter instead.

:func:`unwrap_key` answers the ocicrypt keyprovider protocol's ``keyunwrap`` request (JSON) with
``{"keyunwrapresults":{"optsdata":[...]}}``: the options as a JSON array of byte values, the form
ocicrypt-rs requires (Go ocicrypt accepts it too). :func:`wrap_key` is the other direction (what
``coco_keyprovider``'s WrapKey does with a given KEK), for tests and the key provider service.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coco.guest.cdh import wrap
from coco.guest.cdh.errors import CdhError, UnwrapKeyError
from coco.guest.cdh.kms import KmsContext, new_decryptor
from coco.jsonio import loads
from coco.protocol.resource_uri import ResourceUri, ResourceUriError

VERSION = "0.1.0"
PROVIDER_NAME = "attestation-agent"
_FIELDS = {
    "version", "kid", "wrapped_data", "provider", "iv", "wrap_type", "provider_settings",
    "annotations",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class AnnotationPacket:
    kid: str
    wrapped_data: bytes
    iv: bytes | None = None
    wrap_type: str | None = None
    version: str = VERSION
    provider: str = "kbs"
    provider_settings: Mapping[str, Any] = field(default_factory=dict)
    annotations: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes) -> AnnotationPacket:
        what = "AnnotationPacket"
        doc = loads(raw, what=what, error=UnwrapKeyError)
        if not isinstance(doc, dict):
            raise UnwrapKeyError(f"{what}: expected a JSON object")
        unknown = sorted(set(doc) - _FIELDS)
        if unknown:
            raise UnwrapKeyError(f"{what}: unknown field {unknown[0]!r}")
        for f in ("kid", "wrapped_data"):
            if not isinstance(doc.get(f), str):
                raise UnwrapKeyError(f"{what}: expected a string {f!r}, found {doc.get(f)!r}")
        strings = {}
        for f in ("version", "provider", "iv", "wrap_type"):
            v = doc.get(f)
            if v is not None and not isinstance(v, str):
                raise UnwrapKeyError(f"{what}: {f!r} must be a string, found {v!r}")
            strings[f] = v
        maps = {}
        for f in ("provider_settings", "annotations"):
            v = doc.get(f) or {}
            if not isinstance(v, dict):
                raise UnwrapKeyError(f"{what}: {f!r} must be a JSON object")
            maps[f] = v
        return cls(
            kid=doc["kid"],
            wrapped_data=_b64(doc["wrapped_data"], f"{what}: wrapped_data"),
            iv=_b64(strings["iv"], f"{what}: iv") if strings["iv"] is not None else None,
            wrap_type=strings["wrap_type"],
            version=strings["version"] or VERSION,
            provider=strings["provider"] or "kbs",
            **maps,
        )

    def to_json(self) -> bytes:
        """Version 1 (what coco_keyprovider emits) unless a v2 field is set."""
        doc: dict[str, Any] = {"kid": self.kid, "wrapped_data": _e(self.wrapped_data)}
        if self.iv is not None:
            doc["iv"] = _e(self.iv)
        if self.wrap_type is not None:
            doc["wrap_type"] = self.wrap_type
        if self.provider != "kbs" or self.provider_settings or self.annotations:
            doc = {"version": self.version, **doc, "provider": self.provider,
                   "provider_settings": dict(self.provider_settings),
                   "annotations": dict(self.annotations)}  # fmt: skip
        return json.dumps(doc, separators=(",", ":")).encode()

    def open(self, get_kek: Callable[[str], bytes], kms: KmsContext) -> bytes:
        """The private options: the KEK from the KBS (provider ``kbs``) or a KMS decrypter."""
        if self.provider != "kbs":
            dec = new_decryptor(self.provider, self.provider_settings, kms)
            return dec.decrypt(self.wrapped_data, self.kid, self.annotations)
        if self.version != VERSION:
            raise UnwrapKeyError(
                f"AnnotationPacket: expected version {VERSION!r}, found {self.version!r}"
            )
        try:
            ResourceUri.parse(self.kid, "AnnotationPacket kid")
        except ResourceUriError as e:
            raise UnwrapKeyError(str(e)) from None
        if self.iv is None or self.wrap_type is None:
            raise UnwrapKeyError("AnnotationPacket: provider kbs needs 'iv' and 'wrap_type'")
        kek = get_kek(self.kid)
        return wrap.decrypt(
            kek, self.wrapped_data, self.iv, self.wrap_type,
            where=f"AnnotationPacket (kid {self.kid})", err=UnwrapKeyError,
        )  # fmt: skip


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UnwrapKeyError(f"{where}: not standard base64") from None


def _e(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wrap_key(optsdata: bytes, kid: str, kek: bytes, wrap_type: str = "A256GCM") -> AnnotationPacket:
    """Wrap a layer's private options under ``kek`` (fresh random iv), as coco_keyprovider does."""
    wrapped, iv = wrap.encrypt(kek, optsdata, wrap_type)
    return AnnotationPacket(kid=kid, wrapped_data=wrapped, iv=iv, wrap_type=wrap_type)


def parse_unwrap_request(request: bytes) -> bytes:
    """The AnnotationPacket bytes of a ``keyunwrap`` request."""
    try:
        doc = loads(request, what="UnWrapKey request", error=UnwrapKeyError)
    except UnwrapKeyError:
        raise UnwrapKeyError("UnwrapKey Parse request failed: not JSON") from None
    if not isinstance(doc, dict) or doc.get("op", "keyunwrap") != "keyunwrap":
        op = doc.get("op") if isinstance(doc, dict) else None
        raise UnwrapKeyError(
            f"UnwrapKey Parse request failed: expected op 'keyunwrap', found {op!r}"
        )
    params = doc.get("keyunwrapparams")
    ann = params.get("annotation") if isinstance(params, dict) else None
    if isinstance(ann, list) and all(isinstance(b, int) and 0 <= b <= 255 for b in ann):
        return bytes(ann)
    if not isinstance(ann, str):
        raise UnwrapKeyError("UnwrapKey Parse request failed: expected keyunwrapparams.annotation")
    return _b64(ann, "UnwrapKey Parse request failed: keyunwrapparams.annotation")


def unwrap_key(request: bytes, get_kek: Callable[[str], bytes], kms: KmsContext) -> bytes:
    """Answer a keyprovider ``keyunwrap`` request (JSON bytes in, JSON bytes out)."""
    packet = AnnotationPacket.parse(parse_unwrap_request(request))
    try:
        opts = packet.open(get_kek, kms)
    except UnwrapKeyError:
        raise
    except CdhError as e:
        raise UnwrapKeyError(f"AnnotationPacket (kid {packet.kid}): {e}") from None
    return unwrap_answer(opts)


def unwrap_answer(optsdata: bytes) -> bytes:
    return json.dumps(
        {"keyunwrapresults": {"optsdata": list(optsdata)}}, separators=(",", ":")
    ).encode()
