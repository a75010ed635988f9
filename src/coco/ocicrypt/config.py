"""Which keys to encrypt to and decrypt with: skopeo-style key strings and ocicrypt_config.json.

:func:`encrypt_config` turns ``--encryption-key`` values (``jwe:PUBKEY``, ``pkcs7:CERT``,
``provider:NAME[:VALUE]``) into an :class:`EncryptConfig`; :func:`decrypt_config` turns
``--decryption-key`` values (``KEYFILE[:PASSWORD]``, ``KEYFILE:pass=…``, ``KEYFILE:file=…``,
``KEYFILE:fd=N``, ``CERTFILE``, ``provider:NAME[:VALUE]``) into a :class:`DecryptConfig`.
:func:`load_keyproviders` reads the file named by ``OCICRYPT_KEYPROVIDER_CONFIG`` (not set: no
providers; the file missing: ignored, as containers/ocicrypt does).

Private keys are cached in the process by the digest of their file's bytes (and password), so a
long-running puller loads each key once. ``cryptography`` checks an RSA private key when it loads
it (primality and consistency, 50-80 ms for 2048 bits); a key whose exact bytes passed that check
once is remembered in ``$XDG_CACHE_HOME/coco/checked-keys`` (by a digest of the bytes, never the
key) and later processes load those same bytes without repeating it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from coco.files import cache_dir
from coco.ocicrypt.keyspec import KeyConfigError, password, read_key_file, split_key

ENV_KEYPROVIDER_CONFIG = "OCICRYPT_KEYPROVIDER_CONFIG"

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

try:  # the loaders themselves: the serialization package would also load its SSH code (~10 ms)
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    _PRIVATE_LOADERS = (
        _rust_openssl.keys.load_pem_private_key,
        _rust_openssl.keys.load_der_private_key,
    )
except (ImportError, AttributeError):  # another cryptography layout: the public names
    from cryptography.hazmat.primitives import serialization as _serialization

    _PRIVATE_LOADERS = (_serialization.load_pem_private_key, _serialization.load_der_private_key)

if TYPE_CHECKING:  # x509, jwcrypto and key providers load only when used
    from cryptography import x509

    from coco.ocicrypt.keywrap.keyprovider import KeyProvider


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
    from coco.ocicrypt.keywrap.keyprovider import GrpcTls, KeyProvider

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


def _load_public_key(data: bytes, where: str) -> PublicKey:
    from cryptography.hazmat.primitives import serialization

    key: object = None
    for loader in (serialization.load_pem_public_key, serialization.load_der_public_key):
        try:
            key = loader(data)
            break
        except (ValueError, TypeError):
            continue
    if key is None:
        from jwcrypto import jwk as _jwk

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
    from cryptography import x509

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
            jwe.append(_load_public_key(read_key_file(rest, flag), f"{flag} jwe:{rest}"))
        elif scheme == "pkcs7":
            certs.append(_load_cert(read_key_file(rest, flag), f"{flag} pkcs7:{rest}"))
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


_LOADED: dict[bytes, PrivateKey | x509.Certificate] = {}  # by _key_id (at most _MAX_LOADED)
_MAX_LOADED = 32
_LOADED_LOCK = threading.Lock()


def _key_id(data: bytes, password: bytes | None) -> bytes:
    h = hashlib.sha256(b"coco checked private key v1\0")
    h.update(len(data).to_bytes(8, "big") + data)
    if password is not None:
        h.update(b"\1" + password)
    return h.digest()


def _checked_dir() -> Path:
    return cache_dir("checked-keys")


def _was_checked(key_id: bytes) -> bool:
    try:
        return (_checked_dir() / key_id.hex()).is_file()
    except OSError:
        return False


def _remember_checked(key_id: bytes) -> None:
    """Best effort: a cache that cannot be written only means the next load checks again."""
    d = _checked_dir()
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(d / key_id.hex(), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
    except OSError:
        pass


def _load_private(data: bytes, password: bytes | None, where: str) -> PrivateKey | x509.Certificate:
    """The key or certificate in ``data``; the same bytes give the same object, loaded once."""
    key_id = _key_id(data, password)
    with _LOADED_LOCK:
        found = _LOADED.get(key_id)
    if found is not None:
        return found
    obj = _parse_private(data, password, where, key_id)
    with _LOADED_LOCK:
        if len(_LOADED) >= _MAX_LOADED:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key_id] = obj
    return obj


def _parse_private(
    data: bytes, password: bytes | None, where: str, key_id: bytes
) -> PrivateKey | x509.Certificate:
    if b"CERTIFICATE-----" in data:
        return _load_cert(data, where)
    errors: list[str] = []
    checked = _was_checked(key_id)
    for loader in _PRIVATE_LOADERS:
        try:
            # the RSA key check runs unless these very bytes passed it before
            key = loader(data, password, unsafe_skip_rsa_key_validation=checked)
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
        if isinstance(key, rsa.RSAPrivateKey) and not checked:
            _remember_checked(key_id)
        return key
    from jwcrypto import jwk as _jwk

    try:
        j = _jwk.JWK.from_json(data.decode())
        if j.has_private:
            key = j.get_op_key("unwrapKey")
            if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                return key
    except Exception:
        pass
    from cryptography import x509

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
        path, spec = split_key(value)
        pw = None if spec is None else password(spec, f"{flag} {path}")
        where = f"{flag} {path}"
        obj = _load_private(read_key_file(path, flag), pw, where)
        if not isinstance(obj, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
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
