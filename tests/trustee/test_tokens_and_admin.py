"""Token endorsement (upstream x5c vectors), EAR signer JWK (upstream fixture), admin JWT checks
with tokens minted by jwcrypto, config parsing of upstream files, EAR trust tiers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from jwcrypto import jwk as jw_jwk
from jwcrypto import jwt as jw_jwt

from coco.errors import KbsError
from coco.trustee.attestation.ear import TokenSigner, ear_status
from coco.trustee.config import ConfigError, KbsConfig
from coco.trustee.kbs.admin import Acl, AdminAuth, AdminAuthError, IdentityProvider
from coco.trustee.kbs.token import TokenVerifierError, verify_x5c
from tests.trustee.conftest import VECTORS

JWK_DIR = VECTORS / "jwk" / "kbs-token-endorsement"


@pytest.mark.parametrize(
    ("scenario", "ok"),
    [
        ("01", True),
        ("02", False),
        ("03", False),
        ("04", False),
        ("05", True),
        ("06", True),
        ("07", True),
    ],
)
def test_x5c_endorsement_vectors(scenario: str, ok: bool) -> None:
    from coco.crypto.jose import public_key_from_jwk
    from coco.trustee.kbs.token import _same_key

    jwk = json.loads((JWK_DIR / f"scenario{scenario}-jwk.json").read_text())
    roots = x509.load_pem_x509_certificates(
        (JWK_DIR / f"scenario{scenario}-trust.pem").read_bytes()
    )

    def check() -> None:
        leaf = verify_x5c(jwk.get("x5c"), roots)
        if not _same_key(leaf.public_key(), public_key_from_jwk(jwk)):
            raise TokenVerifierError("leaf key differs")

    if ok:
        check()
    else:
        with pytest.raises(TokenVerifierError):
            check()


def test_signer_jwk_matches_upstream_fixture() -> None:
    d = VECTORS / "jwk" / "as-signer"
    signer = TokenSigner.from_files(str(d / "signing-key.pem"), str(d / "cert-chain.pem"))
    expected = json.loads((d / "expected-jwks.json").read_text())["keys"][0]
    assert signer.jwk == expected


def test_ear_token_with_x5c_is_trusted_through_roots(tmp_path: Path) -> None:
    from coco.trustee.kbs.token import TokenVerifier

    d = VECTORS / "jwk" / "as-signer"
    signer = TokenSigner.from_files(str(d / "signing-key.pem"), str(d / "cert-chain.pem"))
    token = signer.sign({"exp": int(time.time()) + 60, "submods": {}})
    assert (
        TokenVerifier(trusted_certs_paths=[str(d / "cert-chain.pem")]).verify(token)["submods"]
        == {}
    )
    other = JWK_DIR / "scenario01-trust.pem"
    with pytest.raises(TokenVerifierError, match="does not lead to a trusted certificate"):
        TokenVerifier(trusted_certs_paths=[str(other)]).verify(token)
    with pytest.raises(TokenVerifierError, match="unknown key"):
        TokenVerifier().verify(token)


@pytest.mark.parametrize(
    ("vector", "status"),
    [({"a": 0}, "none"), ({"hardware": 2}, "affirming"), ({"x": 2, "y": 33}, "warning"),
     ({"x": 2, "y": 97}, "contraindicated"), ({"x": -1}, "none"), ({"x": -40}, "warning")],
)  # fmt: skip
def test_ear_status_tiers(vector: dict, status: str) -> None:
    assert ear_status(vector) == status


def _key_files(tmp_path: Path, kty: str, **kw: str) -> tuple[jw_jwk.JWK, Path]:
    k = jw_jwk.JWK.generate(kty=kty, **kw)
    pub = tmp_path / f"{kty}.pub"
    pub.write_bytes(k.export_to_pem())
    return k, pub


@pytest.mark.parametrize(
    ("kty", "kw", "alg"),
    [
        ("OKP", {"crv": "Ed25519"}, "EdDSA"),
        ("EC", {"crv": "P-256"}, "ES256"),
        ("RSA", {"size": 2048}, "RS256"),
    ],
)
def test_admin_jwt_algorithms_and_acl(tmp_path: Path, kty: str, kw: dict, alg: str) -> None:
    key, pub = _key_files(tmp_path, kty, **kw)
    auth = AdminAuth(
        "AuthenticatedAuthorization",
        [IdentityProvider(issuer="TrusteeInDocker", audience="KBS", public_key_uri=str(pub))],
        [Acl("admin", "^/kbs/.+$"), Acl("rv", "^/kbs/v0/reference-value$")],
    )

    def tok(**claims: object) -> str:
        base = {
            "iss": "TrusteeInDocker",
            "aud": ["KBS"],
            "role": "admin",
            "exp": int(time.time()) + 60,
        }
        t = jw_jwt.JWT(header={"alg": alg, "typ": "JWT"}, claims={**base, **claims})
        t.make_signed_token(key)
        return "Bearer " + t.serialize()

    assert auth.check(tok(), "/kbs/v0/resource/a/b/c") == "admin"
    assert auth.check(tok(role="rv"), "/kbs/v0/reference-value") == "rv"
    with pytest.raises(AdminAuthError, match="may not access"):
        auth.check(tok(role="rv"), "/kbs/v0/reference-value?x=1")
    with pytest.raises(AdminAuthError, match="audience"):
        auth.check(tok(aud="other"), "/kbs/v0/resource/a/b/c")
    assert auth.check(tok(exp=int(time.time()) - 30), "/kbs/v0/x") == "admin"  # within 60 s leeway
    with pytest.raises(AdminAuthError, match="expired"):
        auth.check(tok(exp=int(time.time()) - 120), "/kbs/v0/x")
    with pytest.raises(AdminAuthError, match="no numeric 'exp'"):
        auth.check(tok(exp="soon"), "/kbs/v0/x")


def test_admin_acl_regex_must_be_anchored() -> None:
    with pytest.raises(KbsError, match="must start with"):
        Acl("admin", "/kbs/.*")


def test_upstream_configs_parse() -> None:
    c = KbsConfig.load(str(VECTORS / "configs" / "kbs-config.e2e-test.toml"))
    assert c.admin_mode == "AuthenticatedAuthorization"
    assert c.admin_acls == [("admin", "^/kbs/.+$")]
    assert c.admin_idps[0].issuer == "issuer" and c.admin_idps[0].audience == "kbs"
    assert c.signer_key_path == "./work/token.key" and c.trusted_certs_paths == [
        "./work/ca-cert.pem"
    ]
    assert c.storage_url.startswith("localfs:///") and c.storage_url.endswith("/work/storage")
    assert not c.http_server.insecure_http
    d = KbsConfig.load(str(VECTORS / "configs" / "kbs-config.default.toml"))
    assert (
        d.insecure_header_jwk and d.http_server.insecure_http and d.admin_mode == "InsecureAllowAll"
    )
    with pytest.raises(ConfigError, match="only 'coco_as_builtin'"):
        KbsConfig.load(str(VECTORS / "configs" / "kbs-config-grpc.toml"))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"admin": {"authorization_mode": "DenyAll"}, "http_server": {"insecure_http": True, "nope": 1}},
         "http_server: unknown key 'nope'"),
        ({"http_server": {"insecure_http": True}}, "[admin] is required"),
        ({"admin": {"authorization_mode": "DenyAll"}, "http_server": {"insecure_http": True},
          "storage_backend": {"storage_type": "Redis"}}, "expected Sqlite, Postgres"),
        ({"admin": {"authorization_mode": "DenyAll"}, "http_server": {}}, "HTTPS needs private_key"),
        ({"admin": {"authorization_mode": "DenyAll"}, "http_server": {"insecure_http": "yes"}},
         "http_server.insecure_http: expected a boolean"),
        ({"admin": {"type": "Simple"}, "http_server": {"insecure_http": True}}, "admin: unknown key 'type'"),
    ],
)  # fmt: skip
def test_config_refusals_name_the_key(doc: dict, message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        KbsConfig.from_dict(doc)
    assert message in str(ei.value)


def test_postgres_config_url() -> None:
    c = KbsConfig.from_dict({
        "admin": {"authorization_mode": "DenyAll"}, "http_server": {"insecure_http": True},
        "storage_backend": {"storage_type": "Postgres", "backends": {"postgres": {
            "host": "127.0.0.1", "port": 5433, "db": "kbs", "username": "u", "password": "p@ss"}}},
    })  # fmt: skip
    assert c.storage_url == "postgresql://u:p%40ss@127.0.0.1:5433/kbs"


def test_admin_jwks_identity_provider(tmp_path: Path) -> None:
    k1 = jw_jwk.JWK.generate(kty="EC", crv="P-256", kid="k1")
    k2 = jw_jwk.JWK.generate(kty="RSA", size=2048, kid="k2")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(
        json.dumps({"keys": [json.loads(k1.export_public()), json.loads(k2.export_public())]})
    )
    auth = AdminAuth("AuthenticatedAuthorization",
                     [IdentityProvider(issuer="idp", jwk_set_uri=f"file://{jwks}")],
                     [Acl("admin", "^/kbs/.+$")])  # fmt: skip
    for key, alg in ((k1, "ES256"), (k2, "RS256")):
        t = jw_jwt.JWT(header={"alg": alg, "kid": key.get("kid")},
                       claims={"iss": "idp", "role": "admin", "exp": int(time.time()) + 60})  # fmt: skip
        t.make_signed_token(key)
        assert auth.check("Bearer " + t.serialize(), "/kbs/v0/resource/a/b/c") == "admin"
    stranger = jw_jwk.JWK.generate(kty="EC", crv="P-256", kid="k1")
    t = jw_jwt.JWT(header={"alg": "ES256", "kid": "k1"},
                   claims={"iss": "idp", "role": "admin", "exp": int(time.time()) + 60})  # fmt: skip
    t.make_signed_token(stranger)
    with pytest.raises(AdminAuthError, match="not signed by any configured identity provider"):
        auth.check("Bearer " + t.serialize(), "/kbs/v0/resource/a/b/c")


def test_attestation_token_from_trusted_jwk_set(tmp_path: Path) -> None:
    from coco.trustee.kbs.token import TokenVerifier

    key = jw_jwk.JWK.generate(kty="RSA", size=2048, kid="ita-1")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [json.loads(key.export_public())]}))
    verifier = TokenVerifier(trusted_jwk_sets=[str(jwks)])
    claims = {
        "tdx": {"attester_runtime_data": {"tee-pubkey": {"kty": "EC"}}},
        "exp": int(time.time()) + 60,
    }
    t = jw_jwt.JWT(header={"alg": "RS256", "kid": "ita-1"}, claims=claims)
    t.make_signed_token(key)
    assert verifier.verify(t.serialize())["tdx"]["attester_runtime_data"]["tee-pubkey"] == {
        "kty": "EC"
    }
    t2 = jw_jwt.JWT(header={"alg": "RS256", "kid": "other"}, claims=claims)
    t2.make_signed_token(key)
    with pytest.raises(TokenVerifierError, match="neither a jwk nor a kid"):
        verifier.verify(t2.serialize())
    expired = jw_jwt.JWT(header={"alg": "RS256", "kid": "ita-1"}, claims={**claims, "exp": 1000})
    expired.make_signed_token(key)
    with pytest.raises(TokenVerifierError, match="expired"):
        verifier.verify(expired.serialize())


def test_admin_refuses_alg_none_and_hmac_confusion(tmp_path: Path) -> None:
    import base64 as b64
    import hashlib
    import hmac

    _, pub = _key_files(tmp_path, "EC", crv="P-256")
    auth = AdminAuth("AuthenticatedAuthorization", [IdentityProvider(public_key_uri=str(pub))],
                     [Acl("admin", "^/kbs/.+$")])  # fmt: skip

    def enc(obj: dict) -> str:
        return b64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims = enc({"role": "admin", "exp": int(time.time()) + 60})
    with pytest.raises(AdminAuthError, match="not signed by any configured"):
        auth.check(f"Bearer {enc({'alg': 'none'})}.{claims}.", "/kbs/v0/x")
    signing_input = f"{enc({'alg': 'HS256'})}.{claims}"
    mac = hmac.new(pub.read_bytes(), signing_input.encode(), hashlib.sha256).digest()
    forged = signing_input + "." + b64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    with pytest.raises(AdminAuthError, match="unsupported alg 'HS256'"):
        auth.check(f"Bearer {forged}", "/kbs/v0/x")
