"""The fast paths of key handling keep every check: the direct RSA-OAEP + AES-GCM unwrap opens
exactly what jwcrypto opens and refuses what it refuses, a private key is loaded once per process,
and an RSA key is checked by cryptography until its exact bytes passed that check once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk

from coco.ocicrypt import config as ocicrypt_config
from coco.ocicrypt import decrypt_config
from coco.ocicrypt.config import KeyConfigError
from coco.ocicrypt.keywrap import KeyUnwrapError
from coco.ocicrypt.keywrap import jwe as jwe_wrap

from .conftest import Keys

SECRET = b'{"symkey":"c2VjcmV0","digest":"sha256:00"}'


def _priv(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), None)


def _jwcrypto_jwe(pub: Path, alg: str, extra: dict | None = None) -> bytes:
    key = jwk.JWK.from_pem(pub.read_bytes())
    token = jwcrypto_jwe.JWE(SECRET, protected={"alg": alg, "enc": "A256GCM", **(extra or {})})
    token.add_recipient(key)
    return token.serialize().encode()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ocicrypt_config, "_LOADED", {})
    return tmp_path / "cache" / "coco" / "checked-keys"


@pytest.mark.parametrize("alg", ["RSA-OAEP", "RSA-OAEP-256"])
def test_direct_unwrap_opens_what_jwcrypto_wrote(keys: Keys, alg: str) -> None:
    blob = _jwcrypto_jwe(keys.rsa_pub, alg)
    assert jwe_wrap._direct_parts(json.loads(blob)) is not None  # the direct path applies
    assert jwe_wrap.unwrap([_priv(keys.rsa)], blob) == SECRET
    # a recipient among several keys given, and none of them
    assert jwe_wrap.unwrap([_priv(keys.rsa2), _priv(keys.rsa)], blob) == SECRET
    with pytest.raises(KeyUnwrapError, match="none of the 1 private key"):
        jwe_wrap.unwrap([_priv(keys.rsa2)], blob)


def test_direct_unwrap_opens_our_own_and_general_form(keys: Keys) -> None:
    pubs = [
        serialization.load_pem_public_key(p.read_bytes()) for p in (keys.rsa2_pub, keys.rsa_pub)
    ]
    for blob in (jwe_wrap.wrap(pubs[1:], SECRET), jwe_wrap.wrap(pubs, SECRET)):
        assert jwe_wrap._direct_parts(json.loads(blob)) is not None
        assert jwe_wrap.unwrap([_priv(keys.rsa)], blob) == SECRET


@pytest.mark.parametrize("member", ["tag", "ciphertext", "iv", "protected", "encrypted_key"])
def test_direct_unwrap_refuses_tampering(keys: Keys, member: str) -> None:
    obj = json.loads(_jwcrypto_jwe(keys.rsa_pub, "RSA-OAEP"))
    text = obj[member]
    obj[member] = ("A" if text[0] != "A" else "B") + text[1:]
    if member == "protected":  # still the same header, but other bytes under the GCM tag
        obj[member] = text + "IA"  # base64url of the header plus a trailing space
    with pytest.raises(KeyUnwrapError):
        jwe_wrap.unwrap([_priv(keys.rsa)], json.dumps(obj).encode())


def test_other_headers_go_through_jwcrypto(keys: Keys) -> None:
    blob = _jwcrypto_jwe(keys.rsa_pub, "RSA-OAEP", {"kid": "k1"})
    assert jwe_wrap._direct_parts(json.loads(blob)) is None
    assert jwe_wrap.unwrap([_priv(keys.rsa)], blob) == SECRET


def test_unwrap_loads_no_jwcrypto(keys: Keys) -> None:
    """The direct path is what a pull of a skopeo-encrypted image takes: no jwcrypto import, no
    certificate code."""
    blob = _jwcrypto_jwe(keys.rsa_pub, "RSA-OAEP")
    code = (
        "import sys\n"
        "from coco.ocicrypt import decrypt_config\n"
        "from coco.ocicrypt.keywrap import jwe\n"
        f"cfg = decrypt_config([{str(keys.rsa)!r}])\n"
        f"assert jwe.unwrap(cfg.private_keys, {blob!r}) == {SECRET!r}\n"
        "print(sorted(m for m in sys.modules if m.startswith(('jwcrypto', 'cryptography.x509'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"


def test_private_key_loaded_once_per_process(keys: Keys, cache: Path) -> None:
    a = decrypt_config([str(keys.rsa)]).private_keys[0]
    b = decrypt_config([str(keys.rsa)]).private_keys[0]
    assert a is b
    other = decrypt_config([f"{keys.rsa_enc}:{keys.password}"]).private_keys[0]
    assert other is not a  # another file's bytes: its own load


def test_rsa_check_remembered_by_exact_bytes(
    keys: Keys, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    skipped: list[bool] = []
    real = ocicrypt_config._PRIVATE_LOADERS

    def spy(loader):
        def load(data, password, *, unsafe_skip_rsa_key_validation=False):
            skipped.append(unsafe_skip_rsa_key_validation)
            return loader(
                data, password, unsafe_skip_rsa_key_validation=unsafe_skip_rsa_key_validation
            )

        return load

    monkeypatch.setattr(ocicrypt_config, "_PRIVATE_LOADERS", tuple(spy(x) for x in real))
    decrypt_config([str(keys.rsa)])
    assert skipped == [False]  # checked the first time
    assert len(list(cache.iterdir())) == 1
    monkeypatch.setattr(ocicrypt_config, "_LOADED", {})  # as a new process
    decrypt_config([str(keys.rsa)])
    assert skipped == [False, True]


def test_invalid_rsa_key_refused_every_time(tmp_path: Path, keys: Keys, cache: Path) -> None:
    good = _priv(keys.rsa).private_numbers()
    bad = rsa.RSAPrivateNumbers(
        good.p, good.q, good.d + 2, good.dmp1, good.dmq1, good.iqmp, good.public_numbers
    ).private_key(unsafe_skip_rsa_key_validation=True)
    path = tmp_path / "bad.pem"
    path.write_bytes(
        bad.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for _ in range(2):
        with pytest.raises(KeyConfigError, match="expected a private key"):
            decrypt_config([str(path)])
    assert not cache.exists() or not list(cache.iterdir())
