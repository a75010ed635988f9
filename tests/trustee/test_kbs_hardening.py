"""Abuse a real KBS as an attacker or a careless admin would: it must stay up, small and clear.

Each test here failed on the KBS before issue 9 was fixed: /auth floods, runaway and recursive
policies, deep JSON, odd init-data and resource names, h2c upgrades, bad serve flags, the default
policy's contraindicated tokens, and the client repeating attestations after a final refusal.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coco.trustee.admin_client import AdminClient
from tests.trustee.conftest import ALLOW_ALL, KbsProcess, free_port
from tests.trustee.test_kbs_e2e import RawGuest

PREFIX = "https://github.com/confidential-containers/kbs/errors/"
RUNAWAY = "package policy\n\nallow if { count([x | some x in numbers.range(1, 100000000)]) > 0 }\n"
# Slow but small: 4e8 steps in a few bytes of memory.
SLOW = (
    "package policy\n\nallow if { some i in numbers.range(1, 20000); "
    "some j in numbers.range(1, 20000); i * j == -1 }\n"
)


def _refused(r: httpx.Response, variant: str, status: int, detail: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == PREFIX + variant, body
    assert detail in body["detail"], body["detail"]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out |= {int(c) for c in f.read().split()}
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _b64u(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


# ------------------------------------------------------------------------------ /auth flood


def test_auth_flood_keeps_server_memory_bounded(start_kbs) -> None:
    kbs = start_kbs()
    pid = kbs.proc.pid
    with httpx.Client(timeout=30) as http:
        # Warm up the allocator and the code paths before the baseline.
        for _ in range(20):
            http.post(kbs.url + "/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample"})
        before = _rss_kib(pid)
        # 1500 sessions, each asked for with 60 KiB of extra-params (under the bound): the old
        # KBS kept every request whole (~90 MB); a session needs only a nonce and a TEE.
        body = json.dumps(
            {"version": "0.4.0", "tee": "sample", "extra-params": {"pad": "p" * 60 * 1024}}
        ).encode()
        for _ in range(1500):
            r = http.post(kbs.url + "/kbs/v0/auth", content=body)
            assert r.status_code == 200, r.text
        grown_mib = (_rss_kib(pid) - before) / 1024
        assert grown_mib < 40, f"KBS grew by {grown_mib:.0f} MiB"
        # extra-params over the bound (the old KBS stored 2 MiB each).
        big = json.dumps(
            {"version": "0.4.0", "tee": "sample", "extra-params": "x" * (2 * 1024 * 1024 - 100)}
        ).encode()
        for _ in range(20):
            _refused(
                http.post(kbs.url + "/kbs/v0/auth", content=big),
                "AttestationError",
                401,
                "Request.extra-params: expected at most 65536 bytes of JSON, found",
            )
        grown_mib = (_rss_kib(pid) - before) / 1024
    assert grown_mib < 60, f"KBS grew by {grown_mib:.0f} MiB"


def test_pending_sessions_are_capped_and_freed_by_attest(start_kbs) -> None:
    kbs = start_kbs("--max-pending-sessions", "5")
    guests = [RawGuest(kbs.url) for _ in range(5)]
    nonces = [g.auth().json()["nonce"] for g in guests]
    r = RawGuest(kbs.url).auth()
    _refused(r, "AttestationError", 503, "attestation_service.max_pending_sessions = 5")
    assert "5 sessions waiting for /attest" in r.json()["detail"]
    assert guests[0].attest(nonces[0]).status_code == 200  # one slot free again
    assert RawGuest(kbs.url).auth().status_code == 200
    _refused(RawGuest(kbs.url).auth(), "AttestationError", 503)
    assert "max_pending_sessions" in kbs.logs()


def test_config_max_pending_sessions_and_policy_limits(tmp_path: Path) -> None:
    from coco.trustee.config import ConfigError, KbsConfig

    base = '[http_server]\ninsecure_http = true\n[admin]\nauthorization_mode = "DenyAll"\n'
    cfg = KbsConfig.from_dict(
        __import__("tomllib").loads(
            base + "[attestation_service]\nmax_pending_sessions = 7\n"
            "[policy_engine]\ntimeout_sec = 0.5\nmemory_limit_mb = 300\nworkers = 3\n"
        )
    )
    assert cfg.max_pending_sessions == 7
    assert (cfg.policy_limits.timeout_sec, cfg.policy_limits.memory_limit_mb) == (0.5, 300)
    assert cfg.policy_limits.workers == 3
    assert KbsConfig().max_pending_sessions == 10000
    for extra, where in [
        ("[attestation_service]\nmax_pending_sessions = 0\n", "max_pending_sessions"),
        ("[policy_engine]\ntimeout_sec = -1\n", "policy_engine.timeout_sec"),
        ("[attestation_service]\ntimeout = 0\n", "attestation_service.timeout"),
    ]:
        with pytest.raises(ConfigError, match=f"{where}: expected a number > 0"):
            KbsConfig.from_dict(__import__("tomllib").loads(base + extra))


# ---------------------------------------------------------------------------- policies


def _get_resource_in_thread(kbs: KbsProcess, out: dict) -> threading.Thread:
    g = RawGuest(kbs.url)
    g.flow()

    def run() -> None:
        out["response"] = g.http.get(kbs.url + "/kbs/v0/resource/a/b/c", timeout=60)

    t = threading.Thread(target=run)
    t.start()
    return t


def _health_while(t: threading.Thread, kbs: KbsProcess) -> int:
    """How many /healthz checks answered while ``t`` (a runaway request) was still running."""
    answered = 0
    while t.is_alive():
        r = httpx.get(kbs.url + "/healthz", timeout=5)
        assert r.status_code == 200
        if t.is_alive():
            answered += 1
    return answered


@pytest.mark.parametrize(
    ("policy", "flags", "limit"),
    [
        (RUNAWAY, ("--policy-memory-mb", "256"), "memory limit of 256 MiB"),
        (SLOW, ("--policy-timeout", "1.5"), "longer than the limit of 1.5 s"),
    ],
    ids=["memory", "time"],
)
def test_runaway_policy_is_stopped_and_others_are_served(
    start_kbs, policy: str, flags: tuple[str, ...], limit: str
) -> None:
    kbs = start_kbs(*flags)
    with AdminClient(kbs.url) as a:
        a.set_resource("a/b/c", b"v")
        a.set_resource_policy(policy)
    out: dict = {}
    t = _get_resource_in_thread(kbs, out)
    assert _health_while(t, kbs) > 0  # the event loop kept serving during the evaluation
    t.join()
    _refused(out["response"], "PolicyEngineError", 401, "resource policy: evaluation stopped")
    assert limit in out["response"].json()["detail"]
    # Another client is served, and a sane policy works again (a fresh worker).
    with AdminClient(kbs.url) as a:
        a.set_resource_policy(ALLOW_ALL)
    g = RawGuest(kbs.url)
    g.flow()
    assert g.decrypt(g.http.get(kbs.url + "/kbs/v0/resource/a/b/c").content) == b"v"
    assert "Traceback" not in kbs.logs()


def test_sigterm_stops_the_kbs_during_a_runaway_policy(start_kbs) -> None:
    kbs = start_kbs("--policy-timeout", "120", "--policy-memory-mb", "100000")
    with AdminClient(kbs.url) as a:
        a.set_resource("a/b/c", b"v")
        a.set_resource_policy(SLOW)
    out: dict = {}
    t = _get_resource_in_thread(kbs, out)
    assert _health_while_first(t, kbs)
    workers = _children(kbs.proc.pid)
    assert workers, "expected a policy worker process"
    kbs.proc.send_signal(signal.SIGTERM)
    assert kbs.proc.wait(30) == 0  # the old KBS ignored SIGTERM while evaluating
    t.join()
    assert not [w for w in workers if _alive(w)], "policy workers outlived the KBS"


def _health_while_first(t: threading.Thread, kbs: KbsProcess) -> bool:
    """One /healthz answered while ``t`` is still waiting for its answer."""
    r = httpx.get(kbs.url + "/healthz", timeout=5)
    return r.status_code == 200 and t.is_alive()


RECURSIVE = [
    "package policy\n\nx := y\ny := x\nallow := true\n",
    "package policy\n\nf(a) := f(a)\nallow if f(1)\n",
    "package policy\n\nr contains a if { some a in r }\nallow := true\n",
]


@pytest.mark.parametrize("text", RECURSIVE, ids=["rules", "function", "partial-set"])
def test_recursive_policies_are_refused_at_upload(open_kbs: KbsProcess, text: str) -> None:
    url = open_kbs.url + "/kbs/v0/"
    r = httpx.post(url + "resource-policy", json={"policy": _b64u(text)})
    _refused(r, "PolicyEngineError", 400, "resource policy: expected rules that do not depend")
    assert "found the recursion policy." in r.json()["detail"]
    att = text.replace("allow", "trust_claims")
    r = httpx.post(
        url + "attestation-policy",
        json={"type": "rego", "policy_id": "rec", "policy": _b64u(att)},
    )
    _refused(r, "PolicyEngineError", 400, "attestation policy rec: expected rules")


def test_policy_engine_limits_outside_the_kbs() -> None:
    from coco.rego import RegoPolicy
    from coco.trustee.policy_engine import PolicyEngine, PolicyLimitError, PolicyLimits

    engine = PolicyEngine(PolicyLimits(timeout_sec=1, memory_limit_mb=200, workers=1))
    try:
        ok = RegoPolicy(
            "package policy\n\nallow if input.a == data.b\n", "p", package="policy", rules=["allow"]
        )
        assert engine.evaluate(ok, {"a": 1}, {"b": 1}) == {"allow": True}
        assert engine.evaluate(ok, {"a": 2}, {"b": 1}) == {}
        bad = RegoPolicy(RUNAWAY, "runaway", package="policy", rules=["allow"])
        with pytest.raises(PolicyLimitError, match=r"runaway: evaluation stopped: .* 200 MiB"):
            engine.evaluate(bad, {})
        slow = RegoPolicy(SLOW, "slow", package="policy", rules=["allow"])
        with pytest.raises(PolicyLimitError, match=r"slow: .*longer than the limit of 1 s"):
            engine.evaluate(slow, {})
        conflict = RegoPolicy(
            "package policy\n\nallow := true if input.a\nallow := false if input.b\n",
            "conflict",
            package="policy",
            rules=["allow"],
        )
        with pytest.raises(Exception, match="conflict: rule allow: evaluation failed"):
            engine.evaluate(conflict, {"a": 1, "b": 1})
        assert engine.evaluate(ok, {"a": 1}, {"b": 1}) == {"allow": True}
    finally:
        engine.close()


# ---------------------------------------------------------------------------- bad input


def test_deep_json_in_any_body_is_400(open_kbs: KbsProcess) -> None:
    deep = b"[" * 100000
    url = open_kbs.url + "/kbs/v0/"
    g = RawGuest(open_kbs.url)
    g.auth()  # a session cookie, so /attest reads its body
    cases = [
        (httpx.post, "auth", "AttestationError"),
        (g.http.post, "attest", "AttestationError"),
        (httpx.post, "resource-policy", "SerdeError"),
        (httpx.post, "attestation-policy", "SerdeError"),
        (httpx.post, "reference-value", "RvpsError"),
    ]
    for post, path, variant in cases:
        _refused(post(url + path, content=deep), variant, 400, "nested more than")
    # In a bearer token (a header, read by the token verifier).
    token = f"{_b64u('[' * 40000)}.{_b64u('{}')}.AAAA"  # under this KBS's 64 KiB of headers
    r = httpx.get(url + "resource/a/b/c", headers={"authorization": f"Bearer {token}"})
    assert r.status_code in (400, 401) and r.json()["type"].startswith(PREFIX), r.text
    # Deep JSON inside the RVPS payload and the additional evidence, too.
    payload = base64.b64encode(b"[" * 100000).decode()
    r = httpx.post(url + "reference-value", json={"version": "0.1.0", "type": "sample",
                                                  "payload": payload})  # fmt: skip
    _refused(r, "RvpsError", 401, "nested more than")
    logs = open_kbs.logs()
    assert "RecursionError" not in logs and "Traceback" not in logs


def test_init_data_algorithm_not_a_string_is_400(open_kbs: KbsProcess) -> None:
    for toml in ['algorithm = ["sha256"]\nversion = "0.1.0"\n[data]\n',
                 'version = "0.1.0"\nalgorithm = {a = 1}\n[data]\n']:  # fmt: skip
        g = RawGuest(open_kbs.url)
        nonce = g.auth().json()["nonce"]
        body = {
            "runtime-data": {"nonce": nonce, "tee-pubkey": g.pub},
            "tee-evidence": {"primary_evidence": g.evidence_for(nonce), "additional_evidence": ""},
            "init-data": {"format": "toml", "body": toml},
        }
        r = g.http.post(open_kbs.url + "/kbs/v0/attest", json=body)
        _refused(r, "AttestationError", 400, "init-data: algorithm: expected one of sha256, sha384")
    assert "Traceback" not in open_kbs.logs()


def test_resource_names_too_long_or_with_a_newline(open_kbs: KbsProcess) -> None:
    url = open_kbs.url + "/kbs/v0/resource/"
    long = "/".join(["r" * 200] * 3)
    for method in ("POST", "GET", "DELETE"):
        r = httpx.request(method, url + long, content=b"v")
        _refused(r, "InvalidRequestPath", 400, "expected at most 512 bytes")
    with AdminClient(open_kbs.url) as a:
        a.set_resource("/".join(["r" * 170] * 3), b"fits")  # 512 bytes exactly
    for name in ("a/b/c%0A", "a%0A/b/c", "a/b%0A/c"):
        _refused(httpx.post(url + name, content=b"v"), "InvalidRequestPath", 404)
        _refused(httpx.get(url + name), "InvalidRequestPath", 404)
    assert "Traceback" not in open_kbs.logs()


# ---------------------------------------------------------------------------- HTTP layer


def test_h2c_upgrade_is_answered_in_http11(open_kbs: KbsProcess) -> None:
    r = subprocess.run(
        ["curl", "-sS", "--http2", "-w", "\n%{http_version} %{http_code}",
         open_kbs.url + "/kbs/v0/resource-policy"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    body, _, status = r.stdout.rpartition("\n")
    assert status == "1.1 200" and isinstance(json.loads(body), list)
    r = subprocess.run(
        ["curl", "-sS", "--http2", "-w", "\n%{http_code}", "-H", "content-type: application/json",
         "--data-binary", '{"version":"0.4.0","tee":"sample"}', open_kbs.url + "/kbs/v0/auth"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.endswith("\n200") and '"nonce"' in r.stdout, r
    # Raw: an upgrade request with a body, followed on the same connection by another request.
    body = b'{"version":"0.4.0","tee":"sample"}'
    host, port = open_kbs.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
            b"Content-Length: %d\r\n\r\n"
            % len(body)
            + body
            + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 OK") and b'"nonce"' in out
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b"101" not in out.split(b"\r\n")[0]


# ---------------------------------------------------------------------------- kbs serve


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "kbs", "serve", *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--workers", "0"),
        ("--session-timeout", "0"),
        ("--max-header-kb", "-1"),
        ("--max-body-mb", "0"),
        ("--max-pending-sessions", "0"),
        ("--policy-timeout", "0"),
        ("--policy-timeout", "nan"),
        ("--listen", "127.0.0.1:0"),
        ("--listen", "127.0.0.1:65536"),
    ],
)
def test_serve_refuses_bad_numbers_and_creates_nothing(
    tmp_path: Path, flag: str, value: str
) -> None:
    args = {"--listen": f"127.0.0.1:{free_port()}", flag: value}
    flat = [x for kv in args.items() for x in kv]
    r = _serve(tmp_path, *flat, "--insecure-http", "--storage", f"sqlite://{tmp_path}/kbs.db")
    assert r.returncode != 0
    assert value in r.stderr and "expected" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_serve_on_a_busy_port_creates_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = _serve(tmp_path, "--listen", f"127.0.0.1:{port}", "--insecure-http",
                   "--storage", f"sqlite://{tmp_path}/kbs.db")  # fmt: skip
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and r.stderr.count("error:") == 1
    assert sorted(os.listdir(tmp_path)) == []  # no database, so no signing key either
    # A failure after the storage opened (an admin key that is not PEM) leaves nothing either.
    (tmp_path / "admin.pub").write_text("not a key")
    r = _serve(tmp_path, "--listen", f"127.0.0.1:{free_port()}", "--insecure-http",
               "--storage", f"sqlite://{tmp_path}/kbs.db", "--admin-public-key", "admin.pub")  # fmt: skip
    assert r.returncode == 1 and "not a PEM public key" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["admin.pub"]


# ---------------------------------------------------------------------- default policy


@pytest.fixture
def signed_kbs(tmp_path: Path, start_kbs):
    """A KBS (default resource policy) whose token-signing key the test holds."""
    signer = ec.generate_private_key(ec.SECP256R1())
    key = tmp_path / "token.key"
    key.write_bytes(
        signer.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    port = free_port()
    cfg = tmp_path / "kbs-config.toml"
    cfg.write_text(f"""
[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true

[attestation_service.attestation_token_broker.signer]
key_path = "{key}"

[admin]
authorization_mode = "InsecureAllowAll"

[storage_backend]
storage_type = "Sqlite"

[storage_backend.backends.sqlite]
path = "{tmp_path / "kbs.db"}"
""")
    kbs = start_kbs(config=cfg, port=port)
    kbs.signer = signer  # type: ignore[attr-defined]
    return kbs


def test_default_policy_refuses_contraindicated_tokens(signed_kbs: KbsProcess) -> None:
    from coco.crypto.jose import public_jwk, sign_jwt

    kbs = signed_kbs
    with AdminClient(kbs.url) as a:
        a.set_resource("a/b/c", b"v")
    g = RawGuest(kbs.url)
    claims = json.loads(base64.urlsafe_b64decode(g.flow().split(".")[1] + "=="))
    cpu0 = claims["submods"]["cpu0"]
    ae = cpu0["ear.veraison.annotated-evidence"]
    ae["snp"] = ae.pop("sample")  # as if from hardware: the sample rule does not apply
    signer = kbs.signer  # type: ignore[attr-defined]

    def get(status: str) -> httpx.Response:
        cpu0["ear.status"] = status
        tok = sign_jwt(claims, signer, "ES256", {"jwk": public_jwk(signer, "ES256")})
        return httpx.get(kbs.url + "/kbs/v0/resource/a/b/c",
                         headers={"authorization": f"Bearer {tok}"})  # fmt: skip

    r = get("contraindicated")
    _refused(r, "PolicyDeny", 401, "refused by the KBS resource policy")
    assert "EAR status is contraindicated for cpu0" in r.json()["detail"]
    assert g.decrypt(get("affirming").content) == b"v"
    assert g.decrypt(get("warning").content) == b"v"
    # Upstream's exact default policy can still be uploaded: it releases to such a token.
    upstream = (
        "package policy\n\ndefault allow = false\n\nallow if {\n"
        '    not input["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["sample"]\n}\n'
    )
    with AdminClient(kbs.url) as a:
        a.set_resource_policy(upstream)
    assert g.decrypt(get("contraindicated").content) == b"v"


# ---------------------------------------------------------------------------- the client


def test_get_resource_does_not_repeat_attestation_after_policy_deny(start_kbs) -> None:
    kbs = start_kbs()  # default resource policy: refuses the sample TEE
    with AdminClient(kbs.url) as a:
        a.set_resource("a/b/c", b"v")
    r = subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "kbs-client", "--url", kbs.url,
         "get-resource", "--path", "a/b/c"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("error:") == 1, r.stderr
    assert "PolicyDeny" in r.stderr and "sample TEE" in r.stderr
    assert "the KBS resource policy refused this request" in r.stderr
    assert "config set-resource-policy --policy-file FILE" in r.stderr
    metrics = httpx.get(kbs.url + "/metrics").text
    assert "kbs_auth_requests_total 1.0" in metrics or "kbs_auth_requests_total 1\n" in metrics, [
        line for line in metrics.splitlines() if "kbs_auth_requests_total" in line
    ]
