"""Registries as skopeo and containers/image reach them: the default auth files, credential
helpers, a private CA from --cert-dir or certs.d, retries with backoff, and a 401 that says how
to log in."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coco.oci import registry as registry_mod
from coco.oci.copy import CopyOptions, copy_image
from tests.conftest import Registry, start_registry
from tests.imagekit import image_blobs, tar_layer, write_image
from tests.oci.fakeregistry import reply, serve
from tests.oci.test_cli import coco

OCI = "application/vnd.oci.image.manifest.v1+json"


def _coco_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coco.cli.main", *args],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in
           ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG")}  # fmt: skip
    return {**env, "HOME": str(home), **extra}


@pytest.fixture(scope="module")
def pushed(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    img = write_image(tmp_path_factory.mktemp("img"), [tar_layer({"a": b"1"})], tag="v1")
    dst = registry.url("habits/app", "v1")
    p = coco("image", "copy", "-q", "--dest-creds", registry.creds, "--dest-tls-verify=false",
             img.ref, dst)  # fmt: skip
    assert p.returncode == 0, p.stderr
    return dst


def test_containers_auth_json_in_the_config_home_is_read(
    registry: Registry, pushed: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    (home / ".config" / "containers").mkdir(parents=True)
    env = _clean_env(home)
    args = ("image", "inspect", "--tls-verify=false", "--no-tags", pushed)
    r = _coco_env(env, *args)
    assert r.returncode == 1 and "authentication required" in r.stderr  # no file yet
    assert "--creds" in r.stderr and "--authfile" in r.stderr  # and it says how to log in
    (home / ".config" / "containers" / "auth.json").write_bytes(registry.authfile.read_bytes())
    r = _coco_env(env, *args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["Name"] == pushed.removeprefix("docker://").rsplit(":", 1)[0]


def _helper(bin_dir: Path, name: str, log: Path, answer: str, status: int = 0) -> None:
    """A docker-credential-NAME of the test's own: logs its argv and stdin, prints ``answer``."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s %s\\n" "$1" "$(cat)" >> {log}\n'
        f"printf '%s' '{answer}'\n"
        f"exit {status}\n"
    )
    script.chmod(0o755)


@pytest.mark.parametrize("key", ["credHelpers", "credsStore"])
def test_credential_helpers_are_called_as_containers_image_does(
    registry: Registry, pushed: str, tmp_path: Path, key: str
) -> None:
    bin_dir, log = tmp_path / "bin", tmp_path / "helper.log"
    good = json.dumps({"ServerURL": registry.host, "Username": "alice",
                       "Secret": registry.password})  # fmt: skip
    _helper(bin_dir, "cocotest", log, good)
    auth = tmp_path / "auth.json"
    doc = {"credHelpers": {registry.host: "cocotest"}} if key == "credHelpers" else {
        "credsStore": "cocotest"}  # fmt: skip
    auth.write_text(json.dumps(doc))
    env = _clean_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    args = ("image", "inspect", "--tls-verify=false", "--no-tags", "--authfile", str(auth), pushed)
    r = _coco_env(env, *args)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines()[0] == f"get {registry.host}"
    bad = json.dumps({"Username": "alice", "Secret": "wrong"})
    _helper(bin_dir, "cocotest", log, bad)
    r = _coco_env(env, *args)
    assert r.returncode == 1 and "credentials for user 'alice' refused" in r.stderr
    _helper(bin_dir, "cocotest", log, "credentials not found in native keychain", status=1)
    r = _coco_env(env, *args)
    assert r.returncode == 1 and "authentication required" in r.stderr
    _helper(bin_dir, "cocotest", log, "keychain locked", status=3)
    r = _coco_env(env, *args)
    assert r.returncode == 1
    assert "credential helper docker-credential-cocotest" in r.stderr
    assert "exit status 3: keychain locked" in r.stderr


def _cert(name: str, key, issuer, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        b = b.add_extension(san, critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def private_ca_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """docker-registry over TLS with a certificate from a CA of the test's own; yields the host
    and the CA certificate."""
    base = tmp_path_factory.mktemp("registry-ca")
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coco test CA")])
    ca = _cert("coco test CA", ca_key, ca_name, ca_key, ca=True)
    leaf = _cert("127.0.0.1", key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (base / "ca.pem").write_bytes(ca.public_bytes(pem))
    (base / "cert.pem").write_bytes(leaf.public_bytes(pem))
    (base / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    tls = ["tls:", f"  certificate: {base / 'cert.pem'}", f"  key: {base / 'key.pem'}"]
    with start_registry(base / "registry", http=tls) as reg:
        yield reg.host, base / "ca.pem"


def test_private_ca_from_cert_dir_and_certs_d(
    private_ca_registry: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, ca = private_ca_registry
    img = write_image(tmp_path / "src", [tar_layer({"ca": b"private"})], tag="v1")
    dst = f"docker://{host}/private/app:v1"
    p = coco("image", "copy", "-q", img.ref, dst)
    assert p.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in p.stderr  # verified, refused
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(ca.read_bytes())
    p = coco("image", "copy", "-q", "--dest-cert-dir", str(certs), img.ref, dst)
    assert p.returncode == 0, p.stderr
    p = coco("image", "inspect", "--cert-dir", str(certs), dst)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["Digest"] == img.manifest_digest
    # no flag: /etc/containers/certs.d/HOST:PORT/ (here a stand-in directory)
    certs_d = tmp_path / "certs.d"
    (certs_d / host).mkdir(parents=True)
    (certs_d / host / "ca.crt").write_bytes(ca.read_bytes())
    monkeypatch.setattr(registry_mod, "CERTS_D", (certs_d,))
    p = coco("image", "inspect", "--no-tags", dst)
    assert p.returncode == 0, p.stderr


def test_retry_times_rides_out_5xx_and_429(tmp_path: Path) -> None:
    manifest, config, layers, _ = image_blobs([tar_layer({"r": b"x" * 1000})], compression="none")
    import hashlib

    blobs = {"sha256:" + hashlib.sha256(b).hexdigest(): b for b in (config, *layers)}
    failures = {"manifest": [503, 429], "blob": [502]}
    seen: list[int] = []

    def routes(h: BaseHTTPRequestHandler) -> None:
        kind = "manifest" if "/manifests/" in h.path else "blob" if "/blobs/" in h.path else ""
        if h.path == "/v2/":
            return reply(h, 200, b"{}")
        if failures.get(kind):
            status = failures[kind].pop(0)
            seen.append(status)
            return reply(h, status, b"busy", {"Retry-After": "0"})
        if kind == "manifest":
            return reply(h, 200, manifest, {"Content-Type": OCI})
        digest = h.path.rsplit("/", 1)[1]
        return reply(h, 200, blobs[digest]) if digest in blobs else reply(h, 404)

    with serve(routes) as host:
        src = f"docker://{host}/x/y:1"
        with pytest.raises(Exception, match="503"):
            copy_image(src, f"oci:{tmp_path / 'no'}:1", options=CopyOptions(src_tls_verify=False))
        assert seen == [503] and not (tmp_path / "no").exists()
        failures["manifest"] = [503, 429]
        options = CopyOptions(src_tls_verify=False, retry_times=2)
        res = copy_image(src, f"oci:{tmp_path / 'out'}:1", options=options)
        assert seen == [503, 503, 429, 502]
        assert res.layers[0].action == "copied"
