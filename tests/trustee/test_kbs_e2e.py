"""End to end through real HTTP on loopback: a raw protocol client written here (not ours),
jwcrypto to decrypt JWE responses and check EAR signatures, and our RCAR client + CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk as jw_jwk
from jwcrypto import jwt as jw_jwt

from coco.protocol.client import KbsClient, KbsRequestError
from coco.tee import get_attester
from coco.trustee.admin_client import AdminClient
from tests.trustee.conftest import ALLOW_ALL, VECTORS, KbsProcess


def _b64u(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


class RawGuest:
    """A minimal protocol-0.4.0 guest written from the spec, independent of coco.protocol."""

    def __init__(self, url: str, tee: str = "sample"):
        self.url = url
        self.http = httpx.Client(timeout=10)
        self.key = ec.generate_private_key(ec.SECP256R1())
        nums = self.key.public_key().public_numbers()
        self.pub = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
                    "x": _b64u(nums.x, 32), "y": _b64u(nums.y, 32)}  # fmt: skip
        self.tee = tee

    def auth(self, version: str = "0.4.0") -> httpx.Response:
        body = {"version": version, "tee": self.tee,
                "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512", "sm3"]}}  # fmt: skip
        return self.http.post(self.url + "/kbs/v0/auth", json=body)

    def evidence_for(self, nonce: str, pub: dict | None = None) -> dict:
        rd = {"additional-evidence": "", "nonce": nonce, "tee-pubkey": pub or self.pub}
        digest = hashlib.sha384(
            json.dumps(rd, sort_keys=True, separators=(",", ":")).encode()
        ).digest()
        return {"svn": "1", "report_data": base64.b64encode(digest).decode()}

    def attest(self, nonce: str, evidence: dict | None = None) -> httpx.Response:
        body = {
            "runtime-data": {"nonce": nonce, "tee-pubkey": self.pub},
            "tee-evidence": {
                "primary_evidence": evidence or self.evidence_for(nonce),
                "additional_evidence": "",
            },
        }
        return self.http.post(self.url + "/kbs/v0/attest", json=body)

    def flow(self) -> str:
        r = self.auth()
        assert r.status_code == 200, r.text
        r2 = self.attest(r.json()["nonce"])
        assert r2.status_code == 200, r2.text
        return r2.json()["token"]

    def decrypt(self, body: bytes) -> bytes:
        from coco.crypto.jose import private_key_jwk

        t = jw_jwe.JWE()
        t.deserialize(body.decode(), key=jw_jwk.JWK(**private_key_jwk(self.key)))
        return t.payload


def _admin(kbs: KbsProcess) -> AdminClient:
    return AdminClient(kbs.url)


def test_auth_challenge_shape_and_cookie(open_kbs: KbsProcess) -> None:
    g = RawGuest(open_kbs.url)
    r = g.auth()
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"nonce", "extra-params"} and body["extra-params"] == ""
    assert len(base64.b64decode(body["nonce"], validate=True)) == 32
    cookie = r.headers["set-cookie"]
    sid = cookie.split(";")[0].split("=", 1)
    assert sid[0] == "kbs-session-id" and len(sid[1]) == 32 and int(sid[1], 16) >= 0
    assert "Expires=" in cookie


def test_full_flow_raw_guest_and_ear_token(open_kbs: KbsProcess) -> None:
    with _admin(open_kbs) as a:
        a.set_resource("default/test/secret", b"shhhhhhh")
        a.set_resource_policy(ALLOW_ALL)
    g = RawGuest(open_kbs.url)
    token = g.flow()
    # EAR: ES256 with the signer's key in the header; check it with jwcrypto.
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == "ES256" and header["jwk"]["crv"] == "P-256"
    verified = jw_jwt.JWT(jwt=token, key=jw_jwk.JWK(**header["jwk"]), algs=["ES256"])
    claims = json.loads(verified.claims)
    assert claims["eat_profile"] == "tag:github.com,2024:confidential-containers/Trustee"
    assert claims["iss"] == "CoCo-Attestation-Service" and claims["exp"] - claims["iat"] == 300
    cpu0 = claims["submods"]["cpu0"]
    ae = cpu0["ear.veraison.annotated-evidence"]
    assert ae["sample"]["svn"] == "1" and "report_data" not in ae["sample"]
    assert ae["runtime_data_claims"]["tee-pubkey"] == g.pub
    assert ae["runtime_data_claims"]["additional-evidence"] == ""
    assert cpu0["ear.appraisal-policy-id"] == "default"
    # The resource, twice on the cookie session, decrypted by jwcrypto.
    for _ in range(2):
        r = g.http.get(open_kbs.url + "/kbs/v0/resource/default/test/secret")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert set(r.json()) == {"protected", "encrypted_key", "iv", "ciphertext", "tag"}
        assert g.decrypt(r.content) == b"shhhhhhh"
    # The same token as a Bearer, from a client without the cookie (as CDH does).
    r = httpx.get(open_kbs.url + "/kbs/v0/resource/default/test/secret",
                  headers={"authorization": f"Bearer {token}"})  # fmt: skip
    assert r.status_code == 200 and g.decrypt(r.content) == b"shhhhhhh"


def test_trust_vector_without_and_with_reference_values(open_kbs: KbsProcess) -> None:
    g = RawGuest(open_kbs.url)
    # A fresh policy id keeps other tests' reference values out of the way: our default_cpu text.
    with _admin(open_kbs) as a:
        from coco.trustee.attestation.service import default_policy_text

        a.set_attestation_policy(default_policy_text("default_cpu") or "")
        a.register_reference_values({"svn": ["7"], "launch_digest": ["zzz"]})
    cpu0 = _claims(g.flow())["submods"]["cpu0"]
    assert cpu0["ear.status"] == "contraindicated"
    assert cpu0["ear.trustworthiness-vector"]["hardware"] == 97
    assert cpu0["ear.trustworthiness-vector"]["executables"] == 33
    assert cpu0["ear.trustworthiness-vector"]["configuration"] == 2
    with _admin(open_kbs) as a:
        a.register_reference_values({"svn": ["1"], "launch_digest": ["abcde"], "major_version": 1,
                                     "minimum_minor_version": 1})  # fmt: skip
        assert a.get_reference_value("svn") == ["1"]
    cpu0 = _claims(RawGuest(open_kbs.url).flow())["submods"]["cpu0"]
    assert cpu0["ear.status"] == "affirming"
    assert cpu0["ear.trustworthiness-vector"] == {
        "instance-identity": 0, "configuration": 2, "executables": 3, "file-system": 0,
        "hardware": 2, "runtime-opaque": 0, "storage-opaque": 0, "sourced-data": 0,
    }  # fmt: skip


def _claims(token: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))


@pytest.mark.parametrize(
    ("as_policy", "kbs_policy", "rvs", "released"),
    [
        ("as_ear_contraindicated_cpu.rego", "kbs_allow_all_integration.rego", {}, True),
        ("as_ear_contraindicated_cpu.rego", "kbs_deny_all_integration.rego", {}, False),
        ("as_ear_contraindicated_cpu.rego", "kbs_check_contraindicated.rego", {}, False),
        ("as_ear_rv_sample_cpu.rego", "kbs_check_contraindicated.rego", {"svn": ["1"]}, True),
    ],
)
def test_upstream_integration_scenarios(
    open_kbs: KbsProcess, as_policy: str, kbs_policy: str, rvs: dict, released: bool
) -> None:
    pol = VECTORS / "policies" / "integration-tests"
    with _admin(open_kbs) as a:
        a.set_attestation_policy((pol / as_policy).read_text())
        a.set_resource_policy((pol / kbs_policy).read_text())
        a.register_reference_values({"svn": ["0"], **rvs})
        a.set_resource("default/test/secret", b"shhhhhhh")
    g = RawGuest(open_kbs.url)
    g.flow()
    r = g.http.get(open_kbs.url + "/kbs/v0/resource/default/test/secret")
    if released:
        assert r.status_code == 200 and g.decrypt(r.content) == b"shhhhhhh"
    else:
        assert r.status_code == 401
        assert r.json()["type"].endswith("/PolicyDeny")


def test_default_resource_policy_refuses_sample(open_kbs: KbsProcess) -> None:
    from coco.trustee.kbs.app import default_resource_policy

    with _admin(open_kbs) as a:
        a.set_resource_policy(default_resource_policy())
        a.set_resource("default/test/secret", b"shhhhhhh")
    g = RawGuest(open_kbs.url)
    g.flow()
    r = g.http.get(open_kbs.url + "/kbs/v0/resource/default/test/secret")
    assert r.status_code == 401
    assert r.json() == {
        "type": "https://github.com/confidential-containers/kbs/errors/PolicyDeny",
        "detail": "Access denied by policy: resource default/test/secret: refused by the KBS "
        "resource policy: the token was issued for the INSECURE sample TEE (upload a resource "
        "policy that allows it, for tests only)",
    }


@pytest.mark.parametrize("alg", ["ec-p256", "ec-p521", "rsa-oaep-256", "rsa1_5"])
def test_our_client_all_key_algorithms(open_kbs: KbsProcess, alg: str) -> None:
    with _admin(open_kbs) as a:
        a.set_resource_policy(ALLOW_ALL)
        a.set_resource("repo/key/k1", bytes(range(256)))
    with KbsClient(open_kbs.url, get_attester("sample"), key_algorithm=alg) as c:
        assert c.get_resource("repo/key/k1") == bytes(range(256))
        assert c.get_resource("kbs:///repo/key/k1") == bytes(range(256))


def test_missing_resource_and_delete(open_kbs: KbsProcess) -> None:
    with _admin(open_kbs) as a:
        a.set_resource_policy(ALLOW_ALL)
        a.set_resource("repo/key/gone", b"x")
        a.delete_resource("repo/key/gone")
        with pytest.raises(KbsRequestError, match="PluginInternalError"):
            a.delete_resource("repo/key/gone")
    with KbsClient(open_kbs.url, get_attester("sample")) as c:
        with pytest.raises(KbsRequestError, match=r"resource not found: repo/key/gone") as ei:
            c.get_resource("repo/key/gone")
        assert (
            ei.value.status == 401
            and ei.value.info
            and ei.value.info.variant == "PluginInternalError"
        )


def test_cli_kbs_client_round_trip(open_kbs: KbsProcess, tmp_path) -> None:
    secret = tmp_path / "s"
    secret.write_bytes(b"cli-secret\n")
    pol = tmp_path / "p.rego"
    pol.write_text(ALLOW_ALL)
    base = [sys.executable, "-m", "coco.cli.main", "kbs-client", "--url", open_kbs.url]
    subprocess.run(
        [*base, "config", "set-resource", "--path", "a/b/c", "--resource-file", str(secret)],
        check=True,
    )
    subprocess.run([*base, "config", "set-resource-policy", "--policy-file", str(pol)], check=True)
    subprocess.run([*base, "config", "set-sample-reference-value", "svn", '["1"]'], check=True)
    out = subprocess.run([*base, "get-resource", "--path", "a/b/c", "--tee", "sample"],
                         check=True, capture_output=True, text=True)  # fmt: skip
    assert base64.b64decode(out.stdout.strip()) == b"cli-secret\n"
    bad = subprocess.run(
        [*base, "get-resource", "--path", "a/../c"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "--path 'a/../c': type '..': expected letters" in bad.stderr
    assert bad.stderr.count("\n") == 1


def test_healthz_and_metrics(open_kbs: KbsProcess) -> None:
    assert httpx.get(open_kbs.url + "/healthz").status_code == 200
    RawGuest(open_kbs.url).flow()
    text = httpx.get(open_kbs.url + "/metrics").text
    for name in ("kbs_http_requests_total", "kbs_http_request_duration_seconds_bucket",
                 "kbs_auth_requests_total", "kbs_attestation_successes_total{tee_type=\"sample\"}",
                 "kbs_build_info", "kbs_policy_evaluations_total"):  # fmt: skip
        assert name in text, name
    assert httpx.post(open_kbs.url + "/metrics").status_code == 405


def test_resources_survive_restart(start_kbs, tmp_path) -> None:
    kbs = start_kbs()
    with AdminClient(kbs.url) as a:
        a.set_resource("keep/me/please", b"durable")
        a.set_resource_policy(ALLOW_ALL)
    kbs.stop()
    kbs.start()
    with KbsClient(kbs.url, get_attester("sample")) as c:
        assert c.get_resource("keep/me/please") == b"durable"


def test_attestation_verify_cli(tmp_path) -> None:
    ev = tmp_path / "ev.json"
    digest = bytes(range(48))
    ev.write_text(json.dumps({"svn": "1", "report_data": base64.b64encode(digest).decode()}))
    base = [
        sys.executable,
        "-m",
        "coco.cli.main",
        "attestation",
        "verify",
        "--tee",
        "sample",
        str(ev),
    ]
    ok = subprocess.run(
        [*base, "--expected-report-data", digest.hex()], capture_output=True, text=True
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["svn"] == "1"
    bad = subprocess.run(
        [*base, "--expected-report-data", "00" * 48], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "report data mismatch" in bad.stderr
    unk = subprocess.run([sys.executable, "-m", "coco.cli.main", "attestation", "verify", "--tee",
                          "nope", str(ev)], capture_output=True, text=True)  # fmt: skip
    assert unk.returncode == 1 and "unknown TEE 'nope'" in unk.stderr


def test_prefork_workers_share_sqlite(start_kbs) -> None:
    import os
    from pathlib import Path

    kbs = start_kbs("--workers", "2")
    children = Path(f"/proc/{kbs.proc.pid}/task/{kbs.proc.pid}/children").read_text().split()
    assert len(children) == 2
    with AdminClient(kbs.url) as a:
        a.set_resource_policy(ALLOW_ALL)
        a.set_resource("pre/fork/key", b"shared")
    for _ in range(12):  # fresh connections land on either worker; sessions live in the file
        g = RawGuest(kbs.url)
        nonce = g.auth().json()["nonce"]
        g.http.close()
        g.http = httpx.Client(timeout=10, cookies=g.http.cookies)
        assert g.attest(nonce).status_code == 200
        g.http.close()
        g.http = httpx.Client(timeout=10, cookies=g.http.cookies)
        r = g.http.get(kbs.url + "/kbs/v0/resource/pre/fork/key")
        assert r.status_code == 200 and g.decrypt(r.content) == b"shared"
    kbs.stop()
    for pid in children:
        assert (
            not os.path.exists(f"/proc/{pid}")
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )
