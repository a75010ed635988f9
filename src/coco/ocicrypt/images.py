"""Encrypting and decrypting image layers while they are copied (:mod:`coco.oci.copy` transforms).

Encryption (:class:`EncryptLayers`), as skopeo does it: each selected layer is encrypted with a
fresh key and nonce; its media type gains ``+encrypted``; its descriptor gets one
``org.opencontainers.image.enc.keys.<scheme>`` annotation per key wrapper with recipients and
``org.opencontainers.image.enc.pubopts`` (cipher name and HMAC). The private options (key, nonce,
plaintext digest) only exist wrapped.

Decryption (:class:`DecryptLayers`): for every ``+encrypted`` layer the private options are
unwrapped with the keys given, the layer is decrypted and its HMAC checked at the end, the
plaintext digest must equal the one the private options promise, and the descriptor loses
``+encrypted`` and every ``org.opencontainers.image.enc.*`` annotation. Layers that are not
encrypted pass through untouched.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coco import jsonio
from coco.errors import DecryptionError, OcicryptError, UsageError
from coco.jsonfields import Fields
from coco.oci import mediatypes as mt
from coco.oci.models import Descriptor, go_json
from coco.ocicrypt import cipher
from coco.ocicrypt.config import DecryptConfig, EncryptConfig
from coco.ocicrypt.keyspec import ANN_PREFIX
from coco.ocicrypt.keywrap import KeyUnwrapError
from coco.ocicrypt.keywrap import jwe as jwe_wrap

if TYPE_CHECKING:  # the copier (and its thread pool) and pkcs7 load only when used
    from coco.oci.copy import TransformedLayer

PKCS7_SCHEME = "pkcs7"
PROVIDER_PREFIX = "provider."  # keyprovider.SCHEME_PREFIX (loaded only for providers)

ANN_KEYS = ANN_PREFIX + "keys."
ANN_PUBOPTS = ANN_PREFIX + "pubopts"


# --- the options documents ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrivateOptions:
    """``PrivateLayerBlockCipherOptions``: what the key wrappers protect."""

    symkey: bytes
    digest: str
    nonce: bytes

    def to_bytes(self) -> bytes:
        return go_json(
            {
                "symkey": _b64(self.symkey),
                "digest": self.digest,
                "cipheroptions": {"nonce": _b64(self.nonce)},
            }
        )

    @classmethod
    def parse(cls, raw: bytes, public_nonce: bytes | None, where: str) -> PrivateOptions:
        obj = _json_object(raw, f"{where}: private options", {"symkey", "digest", "cipheroptions"})
        symkey = _b64field(obj, "symkey", f"{where}: private options")
        if len(symkey) != cipher.KEY_SIZE:
            raise DecryptionError(
                f"{where}: private options: symkey must be {cipher.KEY_SIZE} bytes, found {len(symkey)}"
            )
        digest = obj.get("digest")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise DecryptionError(f"{where}: private options: 'digest' must be 'sha256:<hex>'")
        opts = (
            _FIELDS.get(obj, "cipheroptions", f"{where}: private options", (dict, type(None)), None)
            or {}
        )
        nonce = public_nonce
        if nonce is None and "nonce" in opts:
            nonce = _b64field(opts, "nonce", f"{where}: private options: cipheroptions")
        if nonce is None or len(nonce) != cipher.NONCE_SIZE:
            raise DecryptionError(
                f"{where}: private options: expected a {cipher.NONCE_SIZE}-byte nonce in cipheroptions"
            )
        return cls(symkey, digest, nonce)


@dataclass(frozen=True, slots=True)
class PublicOptions:
    """``PublicLayerBlockCipherOptions``: the cipher name and HMAC, in the clear."""

    cipher: str
    hmac: bytes
    nonce: bytes | None = None

    def to_bytes(self) -> bytes:
        return go_json({"cipher": self.cipher, "hmac": _b64(self.hmac), "cipheroptions": {}})

    @classmethod
    def parse(cls, b64: str, where: str) -> PublicOptions:
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise DecryptionError(f"{where}: {ANN_PUBOPTS}: not valid base64") from None
        obj = _json_object(raw, f"{where}: {ANN_PUBOPTS}", {"cipher", "hmac", "cipheroptions"})
        name = obj.get("cipher")
        if name != cipher.CIPHER_NAME:
            raise DecryptionError(
                f"{where}: unsupported layer cipher {name!r} (expected {cipher.CIPHER_NAME})"
            )
        if not obj.get("hmac"):
            raise DecryptionError(f"{where}: {ANN_PUBOPTS}: HMAC is not provided")
        mac = _b64field(obj, "hmac", f"{where}: {ANN_PUBOPTS}")
        opts = (
            _FIELDS.get(obj, "cipheroptions", f"{where}: {ANN_PUBOPTS}", (dict, type(None)), None)
            or {}
        )
        nonce = _b64field(opts, "nonce", f"{where}: {ANN_PUBOPTS}") if "nonce" in opts else None
        return cls(name, mac, nonce)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_FIELDS = Fields(DecryptionError)


def _json_object(raw: bytes, where: str, keys: set[str]) -> dict[str, Any]:
    """The options object in ``raw``: JSON with only ``keys``."""
    return _FIELDS.check(jsonio.loads(raw, what=where, error=DecryptionError), where, optional=keys)


def _b64field(obj: dict[str, Any], key: str, where: str) -> bytes:
    val = obj.get(key)
    if not isinstance(val, str):
        raise DecryptionError(f"{where}: {key!r} must be a base64 string")
    try:
        return base64.b64decode(val, validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionError(f"{where}: {key!r}: not valid base64") from None


def _layer_name(image: str, index: int, total: int, layer: Descriptor) -> str:
    return f"{image}: layer {index + 1}/{total} {layer.digest}"


# --- encryption --------------------------------------------------------------------------------


class EncryptLayers:
    """Encrypt the selected layers to the recipients of ``config`` (a copy transform)."""

    requires_oci = True

    def __init__(
        self, config: EncryptConfig, layers: Sequence[int] | None = None, image: str = "image"
    ) -> None:
        if not config:
            raise UsageError("encryption needs at least one --encryption-key")
        self.config = config
        self.layers = tuple(layers) if layers else None
        self.image = image

    def wants(self, index: int, total: int, layer: Descriptor) -> bool:
        if self.layers is not None:
            bad = [n for n in self.layers if not -total <= n < total]
            if bad:
                raise UsageError(
                    f"--encrypt-layer {bad[0]}: {self.image} has {total} layer(s) "
                    f"(valid: 0..{total - 1} or -{total}..-1)"
                )
            if not any(n % total == index for n in self.layers):
                return False
        if mt.is_encrypted(layer.media_type):
            import logging

            logging.getLogger(__name__).warning(
                "%s: already encrypted, copied as is", _layer_name(self.image, index, total, layer)
            )
            return False
        return True

    def apply(
        self, index: int, total: int, layer: Descriptor, chunks: Iterator[bytes]
    ) -> TransformedLayer:
        where = _layer_name(self.image, index, total, layer)
        key, nonce = cipher.new_key(), cipher.new_nonce()
        stream = cipher.encrypt(chunks, key, nonce)

        def descriptor(digest: str, size: int) -> Descriptor:
            private = PrivateOptions(key, layer.digest, nonce).to_bytes()
            public = PublicOptions(cipher.CIPHER_NAME, stream.hmac).to_bytes()
            ann = {k: v for k, v in layer.annotations.items() if not k.startswith(ANN_PREFIX)}
            ann.update(self._wrap_all(private, where))
            ann[ANN_PUBOPTS] = _b64(public)
            return layer.with_(
                media_type=layer.media_type + mt.ENCRYPTED_SUFFIX,
                digest=digest,
                size=size,
                annotations=ann,
            )

        from coco.oci.copy import TransformedLayer

        return TransformedLayer(iter(stream), descriptor)

    def _wrap_all(self, private: bytes, where: str) -> dict[str, str]:
        c = self.config
        out: dict[str, str] = {}
        if c.jwe:
            out[ANN_KEYS + jwe_wrap.SCHEME] = _b64(jwe_wrap.wrap(c.jwe, private))
        if c.pkcs7:
            from coco.ocicrypt.keywrap import pkcs7 as pkcs7_wrap

            out[ANN_KEYS + PKCS7_SCHEME] = _b64(pkcs7_wrap.wrap(c.pkcs7, private))
        for name, params in c.providers.items():
            kp = c.keyproviders[name]
            try:
                out[ANN_KEYS + kp.scheme] = _b64(kp.wrap(params, private))
            except OcicryptError as e:
                raise OcicryptError(f"{where}: {e}") from None
        return out


# --- decryption --------------------------------------------------------------------------------


class DecryptLayers:
    """Decrypt every encrypted layer with the keys of ``config`` (a copy transform)."""

    requires_oci = False

    def __init__(self, config: DecryptConfig, image: str = "image") -> None:
        if not config:
            raise UsageError("decryption needs at least one --decryption-key")
        self.config = config
        self.image = image

    def wants(self, index: int, total: int, layer: Descriptor) -> bool:
        return mt.is_encrypted(layer.media_type)

    def unwrap(self, index: int, total: int, layer: Descriptor) -> PrivateOptions:
        """The layer's private options, unwrapped with the keys given, without touching its data
        (what proves a key for a layer already decrypted once); fails as :meth:`apply` would."""
        where = _layer_name(self.image, index, total, layer)
        public = self._public(layer, where)
        return PrivateOptions.parse(self._unwrap(layer, where), public.nonce, where)

    def apply(
        self,
        index: int,
        total: int,
        layer: Descriptor,
        chunks: Iterator[bytes],
        private: PrivateOptions | None = None,
    ) -> TransformedLayer:
        """Decrypt ``chunks``; ``private`` is what :meth:`unwrap` gave for this layer, if known."""
        where = _layer_name(self.image, index, total, layer)
        public = self._public(layer, where)
        if private is None:
            private = PrivateOptions.parse(self._unwrap(layer, where), public.nonce, where)
        plain = cipher.decrypt(chunks, private.symkey, private.nonce, public.hmac, where)

        def descriptor(digest: str, size: int) -> Descriptor:
            if digest != private.digest:
                raise DecryptionError(
                    f"{where}: decrypted layer digest mismatch: expected {private.digest}, got {digest}"
                )
            ann = {k: v for k, v in layer.annotations.items() if not k.startswith(ANN_PREFIX)}
            return layer.with_(
                media_type=layer.media_type.removesuffix(mt.ENCRYPTED_SUFFIX),
                digest=digest,
                size=size,
                annotations=ann,
            )

        from coco.oci.copy import TransformedLayer

        return TransformedLayer(plain, descriptor)

    @staticmethod
    def _public(layer: Descriptor, where: str) -> PublicOptions:
        pub_b64 = layer.annotations.get(ANN_PUBOPTS)
        if pub_b64 is None:
            raise DecryptionError(f"{where}: encrypted layer without the {ANN_PUBOPTS} annotation")
        return PublicOptions.parse(pub_b64, where)

    def _unwrap(self, layer: Descriptor, where: str) -> bytes:
        c = self.config
        present = [k[len(ANN_KEYS) :] for k in layer.annotations if k.startswith(ANN_KEYS)]
        if not present:
            raise DecryptionError(f"{where}: encrypted layer without any {ANN_KEYS}* annotation")
        failures: list[str] = []
        tried = False
        for scheme in sorted(present, key=_scheme_order):
            attempt = self._unwrapper(scheme)
            if attempt is None:
                continue
            tried = True
            for i, part in enumerate(layer.annotations[ANN_KEYS + scheme].split(",")):
                label = f"{scheme}" + (
                    f"[{i}]" if "," in layer.annotations[ANN_KEYS + scheme] else ""
                )
                try:
                    blob = base64.b64decode(part, validate=True)
                except (binascii.Error, ValueError):
                    failures.append(f"{label}: annotation is not valid base64")
                    continue
                try:
                    return attempt(blob, label)
                except KeyUnwrapError as e:
                    failures.append(str(e))
        if not tried:
            raise DecryptionError(
                f"{where}: no key given for this layer: it is wrapped for "
                f"{', '.join(sorted(present))}; keys given: {c.describe()}"
            )
        raise DecryptionError(
            f"{where}: none of the keys given ({c.describe()}) could unwrap the layer key: "
            + "; ".join(failures)
        )

    def _unwrapper(self, scheme: str) -> Any:
        c = self.config
        if scheme == jwe_wrap.SCHEME:
            keys = c.private_keys
            if not keys:
                return None
            return lambda blob, label: jwe_wrap.unwrap(keys, blob, label)
        if scheme == PKCS7_SCHEME:
            keys = c.private_keys
            if not keys:
                return None
            from coco.ocicrypt.keywrap import pkcs7 as pkcs7_wrap

            return lambda blob, label: pkcs7_wrap.unwrap(keys, c.certs, blob, label)
        if scheme.startswith(PROVIDER_PREFIX):
            name = scheme[len(PROVIDER_PREFIX) :]
            if name not in c.providers:
                return None
            kp = c.keyproviders[name]
            params = c.providers[name]
            return lambda blob, label: kp.unwrap(params, blob)
        return None


def _scheme_order(scheme: str) -> tuple[int, str]:
    return ({"jwe": 0, "pkcs7": 1}.get(scheme, 2), scheme)
