"""JWK sets loaded once (coco.crypto.jose.load_jwk_set), for the admin API and token verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coco.crypto.jose import JoseError, load_jwk_set, public_jwk


def _key(kid: str | None = None) -> dict:
    jwk = public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    return {**jwk, "kid": kid} if kid else jwk


def test_keys_in_order_and_by_kid_and_discovery(tmp_path: Path) -> None:
    a, b = _key("a"), _key()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [a, b]}))
    got = load_jwk_set(f"file://{jwks}", "set")
    assert len(got.keys) == 2 and set(got.by_kid) == {"a"}
    assert public_jwk(got.by_kid["a"])["x"] == a["x"]
    discovery = tmp_path / "openid-configuration"
    discovery.write_text(json.dumps({"issuer": "x", "jwks_uri": str(jwks)}))
    assert len(load_jwk_set(str(discovery), "idp").keys) == 2


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"keys": []}, "no keys in the JWK set"),
        ({"nokeys": 1}, 'expected a JWK set {"keys": \\[...\\]}'),
        ({"keys": [{"kty": "EC"}]}, "key 0"),
        ("[" * 5000, "nested more than"),
    ],
)
def test_refusals_name_the_source(tmp_path: Path, doc: object, why: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(JoseError, match=f"^set: .*{why}|^set key 0|^set: {why}"):
        load_jwk_set(str(path), "set")


def test_require_kid_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_key("a"), _key()]}))
    with pytest.raises(JoseError, match="set: key 1 has no 'kid'"):
        load_jwk_set(str(path), "set", require_kid=True)
    with pytest.raises(JoseError, match=r"set: .*No such file"):
        load_jwk_set(str(tmp_path / "absent"), "set")
