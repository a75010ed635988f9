"""Upstream-shaped command lines against a real ``coco kbs serve``: kbs-client's defaults and verbs,
the KBS's ``--config-file``, LocalFs files, logs, ``/readyz`` and the quick form's storage."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.trustee.conftest import ALLOW_ALL, KbsProcess, free_port

COCO = [sys.executable, "-m", "coco.cli.main"]


def client(url: str, *args: str, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run([*COCO, "kbs-client", "--url", url, *args],
                          capture_output=True, text=True, timeout=120, **kw)  # fmt: skip


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_url_defaults_to_upstreams_and_config_help_needs_no_url(tmp_path: Path) -> None:
    port = 8080
    with socketless(port):
        kbs = KbsProcess(["kbs", "serve", "--listen", f"127.0.0.1:{port}", "--insecure-http"],
                         f"http://127.0.0.1:{port}", tmp_path / "log").start()  # fmt: skip
        try:
            secret = tmp_path / "s"
            secret.write_bytes(b"default-url")
            r = subprocess.run([*COCO, "kbs-client", "config", "set-resource", "--path", "d/u/k",
                                "--resource-file", str(secret)], capture_output=True, text=True)  # fmt: skip
            ok(r)
            r = subprocess.run([*COCO, "kbs-client", "config", "set-resource-policy",
                                "--allow-all"], capture_output=True, text=True)  # fmt: skip
            ok(r)
            r = subprocess.run([*COCO, "kbs-client", "get-resource", "--path", "d/u/k"],
                               capture_output=True, text=True)  # fmt: skip
            assert base64.b64decode(ok(r)) == b"default-url"
        finally:
            kbs.stop()
    r = subprocess.run([*COCO, "kbs-client", "config", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "set-resource-policy" in r.stdout, r.stderr


class socketless:
    """Skip when something else already listens on the port upstream's default names."""

    def __init__(self, port: int) -> None:
        self.port = port

    def __enter__(self) -> None:
        import socket

        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", self.port)) == 0:
                pytest.skip(f"127.0.0.1:{self.port} is in use")

    def __exit__(self, *exc: object) -> None:
        pass


def test_attest_then_get_resource_with_the_token_and_the_key(
    open_kbs: KbsProcess, tmp_path: Path
) -> None:
    url = open_kbs.url
    secret = tmp_path / "s"
    secret.write_bytes(b"token-secret")
    ok(
        client(
            url, "config", "set-resource", "--path", "tok/en/one", "--resource-file", str(secret)
        )
    )
    ok(client(url, "config", "set-resource-policy", "--allow-all"))
    key = tmp_path / "tee.pem"
    token = ok(client(url, "attest", "--tee-key-file", str(key))).strip()
    assert token.count(".") == 2 and key.stat().st_mode & 0o777 == 0o600
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert "submods" in payload
    (tmp_path / "token").write_text(token)
    out = client(url, "get-resource", "--path", "tok/en/one", "--tee-key-file", str(key),
                 "--attestation-token", str(tmp_path / "token"))  # fmt: skip
    assert base64.b64decode(ok(out)) == b"token-secret"
    # Another key cannot read what the token's key was given.
    other = tmp_path / "other.pem"
    ok(client(url, "attest", "--tee-key-file", str(other)))
    r = client(url, "get-resource", "--path", "tok/en/one", "--tee-key-file", str(other),
               "--attestation-token", str(tmp_path / "token"))  # fmt: skip
    assert r.returncode == 1 and "cannot decrypt" in r.stderr and r.stderr.count("\n") == 1
    # A token without its key is a usage error, not a silent fresh key.
    r = client(url, "get-resource", "--path", "tok/en/one", "--attestation-token",
               str(tmp_path / "token"))  # fmt: skip
    assert r.returncode != 0 and "--tee-key-file" in r.stderr


def test_failed_attest_leaves_no_key_file(tmp_path: Path) -> None:
    key = tmp_path / "tee.pem"
    r = client(f"http://127.0.0.1:{free_port()}", "attest", "--tee-key-file", str(key))
    assert r.returncode == 1 and "request failed" in r.stderr
    assert not key.exists()


@pytest.mark.parametrize(
    ("flag", "sample_allowed"),
    [("--allow-all", True), ("--deny-all", False), ("--affirming", False), ("--default", False)],
)
def test_builtin_resource_policies(
    open_kbs: KbsProcess, tmp_path: Path, flag: str, sample_allowed: bool
) -> None:
    url = open_kbs.url
    secret = tmp_path / "s"
    secret.write_bytes(b"p")
    ok(client(url, "config", "set-resource", "--path", "pol/icy/x", "--resource-file", str(secret)))
    ok(client(url, "config", "set-resource-policy", flag))
    r = client(url, "get-resource", "--path", "pol/icy/x")
    if sample_allowed:
        assert base64.b64decode(ok(r)) == b"p"
    else:  # the sample TEE's token is never affirming, and the default refuses it by name
        assert r.returncode == 1 and "PolicyDeny" in r.stderr, r.stderr
    r = client(url, "config", "set-resource-policy", "--allow-all", "--deny-all")
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_get_reference_value_by_id(open_kbs: KbsProcess) -> None:
    url = open_kbs.url
    ok(client(url, "config", "set-sample-reference-value", "rv-id", '["7"]'))
    assert json.loads(ok(client(url, "config", "get-reference-value", "--id", "rv-id")))
    assert ok(client(url, "config", "get-reference-value", "rv-id")) == ok(
        client(url, "config", "get-reference-value", "--id", "rv-id")
    )
    r = client(url, "config", "get-reference-value")
    assert r.returncode == 1 and "--id" in r.stderr


def test_admin_token_is_accepted_by_a_kbs_trusting_its_key(start_kbs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "admin.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    (tmp_path / "admin.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    kbs = start_kbs("--admin-public-key", str(tmp_path / "admin.pub"))
    r = subprocess.run([*COCO, "kbs-client", "admin-token", "--key", str(tmp_path / "admin.key")],
                       capture_output=True, text=True)  # fmt: skip
    (tmp_path / "admin.jwt").write_text(ok(r))
    pol = tmp_path / "p.rego"
    pol.write_text(ALLOW_ALL)
    r = client(kbs.url, "config", "set-resource-policy", "--policy-file", str(pol))
    assert r.returncode == 1 and "AdminAuthAccess" in r.stderr
    ok(client(kbs.url, "config", "--admin-token-file", str(tmp_path / "admin.jwt"),
              "set-resource-policy", "--policy-file", str(pol)))  # fmt: skip
    r = subprocess.run([*COCO, "kbs-client", "admin-token", "--key", str(pol)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1 and "expected an unencrypted PEM private key" in r.stderr


def _config(tmp_path: Path, port: int, storage: str) -> Path:
    cfg = tmp_path / "kbs-config.toml"
    cfg.write_text(
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\n'
        '[admin]\nauthorization_mode = "InsecureAllowAll"\n' + storage
    )
    return cfg


def _localfs_kbs(tmp_path: Path, store: Path, flag: str) -> KbsProcess:
    """A KBS started from a config file (``flag``: how it is named) with LocalFs storage."""
    port = free_port()
    cfg = _config(tmp_path, port, '[storage_backend]\nstorage_type = "LocalFs"\n'
                  f'[storage_backend.backends.local_fs]\ndir_path = "{store}"\n')  # fmt: skip
    return KbsProcess(["kbs", "serve", flag, str(cfg)], f"http://127.0.0.1:{port}",
                      tmp_path / "log").start()  # fmt: skip


def test_config_file_and_localfs_files_are_served(tmp_path: Path) -> None:
    store = tmp_path / "repository"
    (store / "default" / "key").mkdir(parents=True)
    (store / "default" / "key" / "provisioned").write_bytes(b"from a file")
    kbs = _localfs_kbs(tmp_path, store, "--config-file")
    try:
        url = kbs.url
        ok(client(url, "config", "set-resource-policy", "--allow-all"))
        assert base64.b64decode(ok(client(url, "get-resource", "--path",
                                          "default/key/provisioned"))) == b"from a file"  # fmt: skip
        new = tmp_path / "n"
        new.write_bytes(b"through the API")
        ok(client(url, "config", "set-resource", "--path", "r2/t2/g2", "--resource-file", str(new)))
        assert (store / "r2" / "t2" / "g2").read_bytes() == b"through the API"
        ok(client(url, "config", "delete-resource", "--path", "r2/t2/g2"))
        assert not (store / "r2" / "t2" / "g2").exists()
        assert httpx.get(url + "/readyz").status_code == 200
    finally:
        kbs.stop()


def test_quick_form_writes_nothing_in_the_working_directory_and_logs(tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    port = free_port()
    log = tmp_path / "log"
    proc = subprocess.Popen([*COCO, "kbs", "serve", "--listen", f"127.0.0.1:{port}",
                             "--insecure-http", "--log-format", "json"], cwd=work,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    kbs = KbsProcess([], f"http://127.0.0.1:{port}", log)
    kbs.proc = proc
    kbs.logf = open(os.devnull, "wb")  # noqa: SIM115
    try:
        import time

        for _ in range(200):
            try:
                if httpx.get(kbs.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.get(kbs.url + "/readyz").text == "ready\n"
        assert httpx.get(kbs.url + "/kbs/v0/nope").status_code == 404
    finally:
        kbs.stop()
    assert os.listdir(work) == []
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    assert any("memory://" in x["message"] and x["level"] == "WARNING" for x in lines)
    access = [x for x in lines if x["logger"] == "coco.kbs.access"]
    assert {(x["method"], x["path"], x["status"]) for x in access} >= {
        ("GET", "/readyz", 200), ("GET", "/kbs/v0/nope", 404)}  # fmt: skip
    assert all(isinstance(x["ms"], float | int) and x["time"].endswith("Z") for x in access)


def test_text_logs_carry_timestamps_and_access_lines(open_kbs: KbsProcess) -> None:
    httpx.get(open_kbs.url + "/healthz")
    lines = [x for x in open_kbs.logs().splitlines() if "coco.kbs.access" in x]
    assert any(" GET /healthz 200 " in x for x in lines), lines[-5:]
    stamp = lines[-1].split(" ", 1)[0]
    assert len(stamp) == 24 and stamp[4] == "-" and stamp[10] == "T" and stamp.endswith("Z")


def test_readyz_is_503_when_the_storage_does_not_answer(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    kbs = _localfs_kbs(tmp_path, store, "-c")
    try:
        assert httpx.get(kbs.url + "/readyz").status_code == 200
        os.chmod(store, 0)
        if os.access(store, os.R_OK):  # root reads anything: take the directory away instead
            os.chmod(store, 0o700)
            os.rename(store, tmp_path / "gone")
        r = httpx.get(kbs.url + "/readyz")
        assert r.status_code == 503 and "storage not ready" in r.json()["detail"]
        assert httpx.get(kbs.url + "/healthz").status_code == 200
    finally:
        kbs.stop()
