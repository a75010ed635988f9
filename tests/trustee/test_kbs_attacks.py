"""Bad input and attacks against a real KBS: each refused with the upstream error shape, logged."""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk as jw_jwk
from jwcrypto import jwt as jw_jwt

from coco.trustee.admin_client import AdminClient
from tests.trustee.conftest import ALLOW_ALL, KbsProcess, free_port
from tests.trustee.test_kbs_e2e import RawGuest

PREFIX = "https://github.com/confidential-containers/kbs/errors/"


def _refused(r: httpx.Response, variant: str, status: int = 401, detail: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"type", "detail"}
    assert body["type"] == PREFIX + variant, body
    assert detail in body["detail"], body["detail"]


def _raw_get(url: str, path: str, headers: str = "") -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_wrong_version_and_unknown_tee(open_kbs: KbsProcess) -> None:
    g = RawGuest(open_kbs.url)
    _refused(g.auth("0.3.0"), "AttestationError",
             detail="KBS Client Protocol Version Mismatch: expect =0.4.0 while the request is 0.3.0")  # fmt: skip
    _refused(g.auth("not-semver"), "AttestationError", detail="not a semantic version")
    _refused(
        RawGuest(open_kbs.url, tee="martian").auth(),
        "AttestationError",
        detail="unknown TEE 'martian'",
    )
    r = g.http.post(open_kbs.url + "/kbs/v0/auth", content=b"{not json")
    _refused(r, "AttestationError", 400, "invalid JSON")  # unreadable bodies are 400 (ours)
    r = g.http.post(
        open_kbs.url + "/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample", "x": 1}
    )
    _refused(r, "AttestationError", detail="unknown field 'x'")
    assert "Version Mismatch" in open_kbs.logs()


def test_attest_without_cookie_or_with_unknown_session(open_kbs: KbsProcess) -> None:
    g = RawGuest(open_kbs.url)
    _refused(g.attest("bm9uY2U="), "AttestationError", detail="no valid kbs-session-id cookie")
    g.http.cookies.set("kbs-session-id", "0" * 32)
    _refused(g.attest("bm9uY2U="), "AttestationError", detail="not found or expired")


def test_nonce_from_another_session(open_kbs: KbsProcess) -> None:
    a, b = RawGuest(open_kbs.url), RawGuest(open_kbs.url)
    nonce_a = a.auth().json()["nonce"]
    b.auth()
    _refused(b.attest(nonce_a), "AttestationError", detail="not the nonce of this session")


def test_nonce_used_twice(open_kbs: KbsProcess) -> None:
    g = RawGuest(open_kbs.url)
    nonce = g.auth().json()["nonce"]
    assert g.attest(nonce).status_code == 200
    _refused(g.attest(nonce), "AttestationError", detail="already used")


def test_failed_attempt_burns_the_nonce(open_kbs: KbsProcess) -> None:
    g = RawGuest(open_kbs.url)
    nonce = g.auth().json()["nonce"]
    _refused(g.attest("AAAA"), "AttestationError")
    _refused(g.attest(nonce), "AttestationError", detail="not found or expired")


def test_expired_session(open_kbs: KbsProcess) -> None:
    g = RawGuest(open_kbs.url)
    r = g.auth()
    sid = r.cookies["kbs-session-id"]
    with sqlite3.connect(open_kbs.db) as db:  # type: ignore[attr-defined]
        n = db.execute("UPDATE kv SET expires=? WHERE ns='kbs_protocol_session' AND key=?",
                       (time.time() - 1, sid)).rowcount  # fmt: skip
    assert n == 1
    _refused(g.attest(r.json()["nonce"]), "AttestationError", detail="not found or expired")


def test_report_data_must_bind_nonce_and_key(open_kbs: KbsProcess) -> None:
    g = RawGuest(open_kbs.url)
    nonce = g.auth().json()["nonce"]
    other_key = dict(g.pub, x=g.pub["y"], y=g.pub["x"])
    _refused(g.attest(nonce, g.evidence_for(nonce, other_key)), "AttestationError",
             detail="report data mismatch")  # fmt: skip
    g2 = RawGuest(open_kbs.url)
    nonce2 = g2.auth().json()["nonce"]
    _refused(g2.attest(nonce2, g2.evidence_for("c29tZXRoaW5nIGVsc2U=")), "AttestationError",
             detail="report data mismatch")  # fmt: skip
    assert "failed" in open_kbs.logs()


def test_resource_without_token_and_with_forged_tokens(open_kbs: KbsProcess) -> None:
    with AdminClient(open_kbs.url) as a:
        a.set_resource_policy(ALLOW_ALL)
        a.set_resource("default/test/secret", b"x")
    url = open_kbs.url + "/kbs/v0/resource/default/test/secret"
    _refused(httpx.get(url), "TokenNotFound", detail="Attestation Token not found")
    token = RawGuest(open_kbs.url).flow()
    h, p, s = token.split(".")
    # A flipped signature byte.
    sig = bytearray(base64.urlsafe_b64decode(s + "=="))
    sig[5] ^= 1
    bad_sig = f"{h}.{p}." + base64.urlsafe_b64encode(bytes(sig)).rstrip(b"=").decode()
    _refused(httpx.get(url, headers={"authorization": f"Bearer {bad_sig}"}), "TokenVerifierError",
             detail="bad ES256 signature")  # fmt: skip
    # A payload edited to extend exp.
    claims = json.loads(base64.urlsafe_b64decode(p + "=="))
    claims["exp"] += 3600
    p2 = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    _refused(
        httpx.get(url, headers={"authorization": f"Bearer {h}.{p2}.{s}"}), "TokenVerifierError"
    )
    # A token self-signed by an attacker's key carrying its own jwk (no insecure_header_jwk here).
    k = jw_jwk.JWK.generate(kty="EC", crv="P-256")
    pub = json.loads(k.export_public())
    forged = jw_jwt.JWT(header={"alg": "ES256", "typ": "JWT", "jwk": pub}, claims=claims)
    forged.make_signed_token(k)
    _refused(httpx.get(url, headers={"authorization": f"Bearer {forged.serialize()}"}),
             "TokenVerifierError", detail="unknown key")  # fmt: skip
    _refused(httpx.get(url, headers={"authorization": "Bearer not.a.jwt"}), "TokenVerifierError")


@pytest.mark.parametrize(
    "path",
    [
        "/kbs/v0/resource/default/../secret",
        "/kbs/v0/resource/default/./secret",
        "/kbs/v0/resource/default/%2e%2e/secret",
        "/kbs/v0/resource/default/test/.hidden",
        "/kbs/v0/resource/default/test",
        "/kbs/v0/resource/default/test/secret/extra",
        "/kbs/v0/resource/a/b/c%2fd",
    ],
)
def test_resource_path_segments(open_kbs: KbsProcess, path: str) -> None:
    status, body = _raw_get(open_kbs.url, path)
    assert status == 404
    assert json.loads(body)["type"] == PREFIX + "InvalidRequestPath"


def test_unknown_plugin(open_kbs: KbsProcess) -> None:
    _refused(
        httpx.get(open_kbs.url + "/kbs/v0/nebula-ca/x"),
        "PluginNotFound",
        404,
        "Plugin nebula-ca not found",
    )


def test_oversized_body_and_headers(open_kbs: KbsProcess) -> None:
    big = b"x" * (1024 * 1024 + 1)
    r = httpx.post(open_kbs.url + "/kbs/v0/resource/a/b/c", content=big)
    _refused(r, "PayloadTooLarge", 413, "exceeds the limit of 1048576 bytes")
    r = httpx.post(open_kbs.url + "/kbs/v0/auth", content=big)
    assert r.status_code == 413
    status, body = _raw_get(open_kbs.url, "/kbs/v0/resource/a/b/c", f"X-Big: {'y' * 70000}\r\n")
    assert status == 431 and json.loads(body)["type"] == PREFIX + "RequestHeaderFieldsTooLarge"
    # A large header under the limit (a verbose EAR token, say) is accepted by the HTTP layer.
    status, body = _raw_get(
        open_kbs.url, "/kbs/v0/resource/a/b/c", f"Authorization: Bearer {'a' * 50000}\r\n"
    )
    assert status == 401 and json.loads(body)["type"] == PREFIX + "TokenVerifierError"
    with AdminClient(open_kbs.url) as a:  # nothing half-written
        a.set_resource_policy(ALLOW_ALL)
    g = RawGuest(open_kbs.url)
    g.flow()
    assert (
        g.http.get(open_kbs.url + "/kbs/v0/resource/a/b/c").json()["type"]
        == PREFIX + "PluginInternalError"
    )


# ------------------------------------------------------------------------------------- admin


@pytest.fixture(scope="module")
def secured_kbs(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("secured")
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(d / "admin.key")], check=True
    )
    subprocess.run(["openssl", "pkey", "-in", str(d / "admin.key"), "-pubout", "-out", str(d / "admin.pub")],
                   check=True)  # fmt: skip
    signer = ec.generate_private_key(ec.SECP256R1())
    (d / "token.key").write_bytes(signer.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    port = free_port()
    cfg = d / "kbs-config.toml"
    cfg.write_text(f"""
[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true

[attestation_token]

[attestation_service]
type = "coco_as_builtin"

[attestation_service.attestation_token_broker]
duration_min = 5

[attestation_service.attestation_token_broker.signer]
key_path = "{d / "token.key"}"

[admin]
authorization_mode = "AuthenticatedAuthorization"

[admin.authentication.bearer_jwt]
identity_providers = [{{ issuer = "issuer", audience = "kbs", public_key_uri = "{d / "admin.pub"}" }}]

[admin.authorization.regex_acl]
acls = [
  {{ role = "admin", allowed_endpoints = "^/kbs/.+$" }},
  {{ role = "reader", allowed_endpoints = "^/kbs/v0/reference-value/.+$" }},
]

[storage_backend]
storage_type = "Sqlite"

[storage_backend.backends.sqlite]
path = "{d / "kbs.db"}"
""")
    p = KbsProcess(["kbs", "serve", "--config", str(cfg)], f"http://127.0.0.1:{port}", d / "log")
    p.admin_key = jw_jwk.JWK.from_pem((d / "admin.key").read_bytes())  # type: ignore[attr-defined]
    p.signer = signer  # type: ignore[attr-defined]
    yield p.start()
    p.stop()


def _admin_token(key: jw_jwk.JWK, role: str = "admin", exp_in: int = 600, **extra) -> str:
    now = int(time.time())
    claims = {
        "iss": "issuer",
        "aud": ["kbs"],
        "role": role,
        "iat": now,
        "exp": now + exp_in,
        **extra,
    }
    t = jw_jwt.JWT(header={"alg": "EdDSA", "typ": "JWT"}, claims=claims)
    t.make_signed_token(key)
    return t.serialize()


def test_admin_requires_a_valid_token(secured_kbs: KbsProcess) -> None:
    url = secured_kbs.url + "/kbs/v0/resource-policy"
    body = {"policy": base64.urlsafe_b64encode(ALLOW_ALL.encode()).rstrip(b"=").decode()}
    key = secured_kbs.admin_key  # type: ignore[attr-defined]
    _refused(httpx.post(url, json=body), "AdminAuthAccess", detail="no 'Authorization: Bearer")

    def post(tok: str) -> httpx.Response:
        return httpx.post(url, json=body, headers={"authorization": f"Bearer {tok}"})

    _refused(
        post(_admin_token(key, role="reader")),
        "AdminAuthAccess",
        detail="role 'reader' may not access",
    )
    _refused(post(_admin_token(key, exp_in=-3600)), "AdminAuthAccess", detail="expired")
    other = jw_jwk.JWK.generate(kty="OKP", crv="Ed25519")
    _refused(post(_admin_token(other)), "AdminAuthAccess", detail="not signed by any configured")
    no_role = jw_jwt.JWT(
        header={"alg": "EdDSA"},
        claims={"iss": "issuer", "aud": "kbs", "exp": int(time.time()) + 60},
    )
    no_role.make_signed_token(key)
    _refused(post(no_role.serialize()), "AdminAuthAccess", detail="no string 'role'")
    _refused(post(_admin_token(key, iss="evil")), "AdminAuthAccess", detail="issuer")
    assert post(_admin_token(key)).status_code == 200
    # The resource endpoints too; GET by an attested guest stays open to the guest.
    r = httpx.post(secured_kbs.url + "/kbs/v0/resource/a/b/c", content=b"v")
    _refused(r, "AdminAuthAccess")
    with AdminClient(secured_kbs.url, _admin_token(key)) as a:
        a.set_resource("a/b/c", b"v")
        a.register_reference_values({"svn": ["1"]})
    with AdminClient(secured_kbs.url, _admin_token(key, role="reader")) as a:
        assert a.get_reference_value("svn") == ["1"]
    # The CLI: --admin-token-file before or after 'config'.
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jwt") as tf:
        tf.write(_admin_token(key))
        tf.flush()
        base = [sys.executable, "-m", "coco.cli.main", "kbs-client", "--url", secured_kbs.url]
        for args in (
            ["--admin-token-file", tf.name, "config"],
            ["config", "--admin-token-file", tf.name],
        ):
            r = subprocess.run([*base, *args, "set-sample-reference-value", "svn", '["2"]'],
                               capture_output=True, text=True)  # fmt: skip
            assert r.returncode == 0, r.stderr
        r = subprocess.run([*base, "config", "set-sample-reference-value", "svn", '["3"]'],
                           capture_output=True, text=True, env={"HOME": tf.name + ".d"})  # fmt: skip
        assert r.returncode == 1 and "AdminAuthAccess" in r.stderr
    assert "AdminAuthAccess" in secured_kbs.logs()


def test_token_with_trusted_key_but_expired(secured_kbs: KbsProcess) -> None:
    from coco.crypto.jose import public_jwk, sign_jwt

    with AdminClient(secured_kbs.url, _admin_token(secured_kbs.admin_key)) as a:  # type: ignore[attr-defined]
        a.set_resource_policy(ALLOW_ALL)
        a.set_resource("a/b/c", b"v")
    token = RawGuest(secured_kbs.url).flow()
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    signer = secured_kbs.signer  # type: ignore[attr-defined]
    # Signed with the KBS's own signing key (as if issued long ago): refused for exp alone.
    claims["exp"] = int(time.time()) - 120
    old = sign_jwt(claims, signer, "ES256", {"jwk": public_jwk(signer, "ES256")})
    url = secured_kbs.url + "/kbs/v0/resource/a/b/c"
    _refused(
        httpx.get(url, headers={"authorization": f"Bearer {old}"}),
        "TokenVerifierError",
        detail="expired",
    )
    claims["exp"] = int(time.time()) + 120
    fresh = sign_jwt(claims, signer, "ES256", {"jwk": public_jwk(signer, "ES256")})
    assert httpx.get(url, headers={"authorization": f"Bearer {fresh}"}).status_code == 200


def test_deny_all_mode(start_kbs) -> None:
    kbs = start_kbs("--deny-admin")
    r = httpx.post(kbs.url + "/kbs/v0/reference-value", json={})
    _refused(r, "AdminAuthAccess", detail="DenyAll")


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    import sys

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[http_server]\ninsecure_http = true\nbogus_key = 1\n[admin]\nauthorization_mode = "DenyAll"\n'
    )
    r = subprocess.run([sys.executable, "-m", "coco.cli.main", "kbs", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 1
    assert "unknown key 'bogus_key'" in r.stderr and r.stderr.count("\n") == 1


def _raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_http_layer_pipelining_garbage_and_continue(open_kbs: KbsProcess) -> None:
    out = _raw(open_kbs.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /kbs/v0/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # fmt: skip
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    second = out[out.index(b"HTTP/1.1 404") :]
    assert (
        b"connection: close" in second
        and b'"type":"' + PREFIX.encode() + b'PluginNotFound"' in second
    )
    bad = _raw(open_kbs.url, b"NOT HTTP AT ALL\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400") and b"HTTPFailed" in bad
    with AdminClient(open_kbs.url) as a:
        a.set_resource_policy(ALLOW_ALL)
    body = b"z" * 3000
    r = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", "Expect: 100-continue",
         "--data-binary", "@-", open_kbs.url + "/kbs/v0/resource/big/body/ok"],
        input=body, capture_output=True, check=True,
    )  # fmt: skip
    assert r.stdout == b"200"
    g = RawGuest(open_kbs.url)
    g.flow()
    assert g.decrypt(g.http.get(open_kbs.url + "/kbs/v0/resource/big/body/ok").content) == body


def test_half_closed_client_still_gets_its_answer(open_kbs: KbsProcess) -> None:
    host, port = open_kbs.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nContent-Length: 34\r\n\r\n"
                  b'{"version":"0.4.0","tee":"sample"}')  # fmt: skip
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 OK") and b'"nonce"' in out
