"""Which keys to encrypt to and decrypt with: skopeo-style key strings and ocicrypt_config.json.

:func:`encrypt_config` turns ``--encryption-key`` values (``jwe:PUBKEY``, ``pkcs7:CERT``,
``provider:NAME[:VALUE]``) into an :class:`EncryptConfig`; :func:`decrypt_config` turns
``--decryption-key`` values (``KEYFILE[:PASSWORD]``, ``KEYFILE:pass=…``, ``KEYFILE:file=…``,
``KEYFILE:fd=N``, ``CERTFILE``, ``provider:NAME[:VALUE]``) into a :class:`DecryptConfig`.
:func:`load_keyproviders` reads the file named by ``OCICRYPT_KEYPROVIDER_CONFIG`` (not set: no
providers; the file missing: ignored, as containers/ocicrypt does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwk as _jwk

from coco.errors import OcicryptError
from coco.ocicrypt.keywrap.keyprovider import GrpcTls, KeyProvider

ENV_KEYPROVIDER_CONFIG = "OCICRYPT_KEYPROVIDER_CONFIG"

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class KeyConfigError(OcicryptError):
    """A key string, key file or ocicrypt config that cannot be used."""


@dataclass(frozen=True, slots=True)
class EncryptConfig:
    """Recipients of newly encrypted layers, by scheme."""

    jwe: tuple[PublicKey, ...] = ()
    pkcs7: tuple[x509.Certificate, ...] = ()
    providers: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict)
    keyproviders: Mapping[str, KeyProvider] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.jwe or self.pkcs7 or self.providers)


@dataclass(frozen=True, slots=True)
class DecryptConfig:
    """Keys to open encrypted layers with; ``given`` describes them for error messages."""

    private_keys: tuple[PrivateKey, ...] = ()
    certs: tuple[x509.Certificate, ...] = ()
    providers: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict)
    keyproviders: Mapping[str, KeyProvider] = field(default_factory=dict)
    given: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.private_keys or self.certs or self.providers)

    def describe(self) -> str:
        return ", ".join(self.given) or "none"


# --- ocicrypt_config.json ----------------------------------------------------------------------

_PROVIDER_KEYS = frozenset({"cmd", "grpc", "grpc-tls", "ttrpc", "native"})
_TLS_KEYS = frozenset(
    {"root-ca-file", "cert-file", "key-file", "server-name", "insecure-skip-verify"}
)


def load_keyproviders(path: str | os.PathLike[str] | None = None) -> dict[str, KeyProvider]:
    """Key providers from ``path`` (default: ``$OCICRYPT_KEYPROVIDER_CONFIG``)."""
    if path is None:
        env = os.environ.get(ENV_KEYPROVIDER_CONFIG)
        if not env:
            return {}
        path = env
        if not Path(path).exists():
            return {}
    where = f"ocicrypt config {path}"
    try:
        obj = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise KeyConfigError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KeyConfigError(f"{where}: not readable JSON: {e}") from None
    if not isinstance(obj, dict):
        raise KeyConfigError(f"{where}: expected a JSON object")
    extra = sorted(set(obj) - {"key-providers"})
    if extra:
        raise KeyConfigError(f"{where}: unknown key {extra[0]!r} (expected 'key-providers')")
    kps = obj.get("key-providers") or {}
    if not isinstance(kps, dict):
        raise KeyConfigError(f"{where}: 'key-providers' must be an object")
    return {
        name: _provider(name, attrs, f"{where}: key-providers.{name}")
        for name, attrs in kps.items()
    }


def _provider(name: str, attrs: Any, where: str) -> KeyProvider:
    if not isinstance(attrs, dict):
        raise KeyConfigError(f"{where}: expected an object")
    extra = sorted(set(attrs) - _PROVIDER_KEYS)
    if extra:
        raise KeyConfigError(
            f"{where}: unknown key {extra[0]!r} (expected one of {', '.join(sorted(_PROVIDER_KEYS))})"
        )
    path, args = "", ()
    cmd = attrs.get("cmd")
    if cmd is not None:
        if not isinstance(cmd, dict) or set(cmd) - {"path", "args"}:
            raise KeyConfigError(f"{where}.cmd: expected {{'path': ..., 'args': [...]}}")
        path = cmd.get("path")
        if not isinstance(path, str) or not path:
            raise KeyConfigError(f"{where}.cmd.path: expected a non-empty string")
        raw_args = cmd.get("args") or []
        if not isinstance(raw_args, list) or not all(isinstance(a, str) for a in raw_args):
            raise KeyConfigError(f"{where}.cmd.args: expected an array of strings")
        args = tuple(raw_args)
    grpc = attrs.get("grpc", "")
    if not isinstance(grpc, str):
        raise KeyConfigError(f"{where}.grpc: expected a 'host:port' string")
    tls = None
    if attrs.get("grpc-tls") is not None:
        t = attrs["grpc-tls"]
        if not isinstance(t, dict) or set(t) - _TLS_KEYS:
            raise KeyConfigError(f"{where}.grpc-tls: expected an object with {sorted(_TLS_KEYS)}")
        if t.get("insecure-skip-verify"):
            raise KeyConfigError(f"{where}.grpc-tls: insecure-skip-verify is not supported")
        tls = GrpcTls(
            t.get("root-ca-file", ""),
            t.get("cert-file", ""),
            t.get("key-file", ""),
            t.get("server-name", ""),
        )
    extra_attrs = {k: attrs[k] for k in ("ttrpc", "native") if k in attrs}
    return KeyProvider(name, path, args, grpc, tls, extra_attrs)


# --- key strings -------------------------------------------------------------------------------


def _read_file(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyConfigError(f"{flag} {path}: file not found") from None
    except OSError as e:
        raise KeyConfigError(f"{flag} {path}: cannot read: {e.strerror}") from None


def _load_public_key(data: bytes, where: str) -> PublicKey:
    key: object = None
    for loader in (serialization.load_pem_public_key, serialization.load_der_public_key):
        try:
            key = loader(data)
            break
        except (ValueError, TypeError):
            continue
    if key is None:
        try:
            j = _jwk.JWK.from_json(data.decode())
            key = j.get_op_key("wrapKey") if not j.has_private else None
            if key is None:
                raise KeyConfigError(f"{where}: a private JWK; give the public key")
        except KeyConfigError:
            raise
        except Exception:
            key = None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        found = "an unsupported key type" if key is not None else "no public key"
        raise KeyConfigError(
            f"{where}: expected an RSA or EC public key (PEM, DER or JWK), found {found}"
        )
    return key


def _load_cert(data: bytes, where: str) -> x509.Certificate:
    for loader in (x509.load_pem_x509_certificate, x509.load_der_x509_certificate):
        try:
            return loader(data)
        except ValueError:
            continue
    raise KeyConfigError(f"{where}: expected an X.509 certificate (PEM or DER)")


def _split_provider(value: str, flag: str) -> tuple[str, bytes]:
    rest = value[len("provider:") :]
    name, sep, param = rest.partition(":")
    if not name:
        raise KeyConfigError(f"{flag} {value!r}: expected provider:NAME[:VALUE]")
    return name, (param.encode() if sep else b"Enabled")


def encrypt_config(
    keys: Sequence[str], keyproviders: Mapping[str, KeyProvider] | None = None
) -> EncryptConfig:
    """Parse ``--encryption-key`` values; files are read now, providers looked up now."""
    flag = "--encryption-key"
    jwe: list[PublicKey] = []
    certs: list[x509.Certificate] = []
    providers: dict[str, list[bytes]] = {}
    kps = dict(keyproviders) if keyproviders is not None else None
    for value in keys:
        scheme, sep, rest = value.partition(":")
        if not sep or not rest:
            raise KeyConfigError(
                f"{flag} {value!r}: expected jwe:PUBKEY, pkcs7:CERT or provider:NAME[:VALUE]"
            )
        if scheme == "jwe":
            jwe.append(_load_public_key(_read_file(rest, flag), f"{flag} jwe:{rest}"))
        elif scheme == "pkcs7":
            certs.append(_load_cert(_read_file(rest, flag), f"{flag} pkcs7:{rest}"))
        elif scheme == "provider":
            name, param = _split_provider(value, flag)
            if kps is None:
                kps = load_keyproviders()
            _require_provider(kps, name, f"{flag} {value!r}")
            providers.setdefault(name, []).append(param)
        elif scheme in ("pgp", "pkcs11"):
            raise KeyConfigError(f"{flag} {value!r}: the {scheme} scheme is not supported")
        else:
            raise KeyConfigError(
                f"{flag} {value!r}: unknown scheme {scheme!r} (expected jwe, pkcs7 or provider)"
            )
    return EncryptConfig(
        tuple(jwe),
        tuple(certs),
        {k: tuple(v) for k, v in providers.items()},
        kps or {},
    )


def _require_provider(kps: Mapping[str, KeyProvider], name: str, where: str) -> None:
    kp = kps.get(name)
    if kp is None:
        env = os.environ.get(ENV_KEYPROVIDER_CONFIG)
        src = f"{ENV_KEYPROVIDER_CONFIG}={env}" if env else f"{ENV_KEYPROVIDER_CONFIG} not set"
        raise KeyConfigError(f"{where}: no key provider named {name!r} configured ({src})")
    if not kp.usable:
        raise KeyConfigError(
            f"{where}: key provider {name!r} has none of 'cmd', 'grpc', 'ttrpc' or 'native'"
        )


def _password(spec: str, where: str) -> bytes:
    if spec.startswith("pass="):
        return spec[5:].encode()
    if spec.startswith("file="):
        data = _read_file(spec[5:], where)
        return data.split(b"\n", 1)[0].rstrip(b"\r")
    if spec.startswith("fd="):
        try:
            fd = int(spec[3:])
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read().split(b"\n", 1)[0].rstrip(b"\r")
        except (ValueError, OSError) as e:
            raise KeyConfigError(f"{where}: cannot read the password from {spec!r}: {e}") from None
    return spec.encode()


def _load_private(data: bytes, password: bytes | None, where: str) -> PrivateKey | x509.Certificate:
    if b"CERTIFICATE-----" in data:
        return _load_cert(data, where)
    errors: list[str] = []
    for loader in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            key = loader(data, password)
        except TypeError as e:  # password missing or given for an unencrypted key
            msg = str(e)
            if "encrypted" in msg and password is None:
                raise KeyConfigError(
                    f"{where}: the private key is encrypted: give FILE:PASSWORD"
                ) from None
            errors.append(msg)
            continue
        except ValueError as e:
            if "Bad decrypt" in str(e) or "incorrect password" in str(e).lower():
                raise KeyConfigError(f"{where}: wrong password for the private key") from None
            errors.append(str(e))
            continue
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise KeyConfigError(
                f"{where}: expected an RSA or EC private key, found {type(key).__name__}"
            )
        return key
    try:
        j = _jwk.JWK.from_json(data.decode())
        if j.has_private:
            key = j.get_op_key("unwrapKey")
            if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                return key
    except Exception:
        pass
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        pass
    raise KeyConfigError(
        f"{where}: expected a private key (PEM, DER or JWK) or an X.509 certificate, found neither"
    )


def decrypt_config(
    keys: Sequence[str], keyproviders: Mapping[str, KeyProvider] | None = None
) -> DecryptConfig:
    """Parse ``--decryption-key`` values."""
    flag = "--decryption-key"
    privs: list[PrivateKey] = []
    certs: list[x509.Certificate] = []
    providers: dict[str, list[bytes]] = {}
    given: list[str] = []
    kps = dict(keyproviders) if keyproviders is not None else None
    for value in keys:
        if value.startswith("provider:"):
            name, param = _split_provider(value, flag)
            if kps is None:
                kps = load_keyproviders()
            _require_provider(kps, name, f"{flag} {value!r}")
            providers.setdefault(name, []).append(param)
            given.append(f"provider:{name}")
            continue
        if os.path.exists(value):
            path, pw = value, None
        else:
            path, sep, spec = value.partition(":")
            pw = _password(spec, f"{flag} {path}") if sep else None
        where = f"{flag} {path}"
        obj = _load_private(_read_file(path, flag), pw, where)
        if isinstance(obj, x509.Certificate):
            certs.append(obj)
            given.append(f"certificate {Path(path).name}")
        else:
            privs.append(obj)
            kind = "RSA" if isinstance(obj, rsa.RSAPrivateKey) else "EC"
            given.append(f"{kind} private key {Path(path).name}")
    return DecryptConfig(
        tuple(privs),
        tuple(certs),
        {k: tuple(v) for k, v in providers.items()},
        kps or {},
        tuple(given),
    )
