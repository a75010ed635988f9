"""Bearer-token auth against a real docker-registry configured with ``auth: token``.

The test runs its own token endpoint: it checks basic credentials and answers a JWT (RS256,
``x5c`` header) signed by a self-signed certificate that the registry trusts (rootcertbundle).
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from coco.errors import AuthError
from coco.oci.auth import Credentials
from coco.oci.copy import CopyOptions, copy_image
from coco.oci.layout import OciLayout
from coco.oci.registry import RegistryClient
from tests.conftest import start_registry
from tests.imagekit import tar_layer, write_image
from tests.oci.fakeregistry import reply, serve

USER, PASSWORD = "bob", "t0ken-pw"
SERVICE, ISSUER = "coco-registry", "coco-test-issuer"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    def __init__(self, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.der = cert.public_bytes(serialization.Encoding.DER)
        self.requests: list[dict[str, list[str]]] = []

    def __call__(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlparse(h.path)
        q = urllib.parse.parse_qs(url.query)
        self.requests.append(q)
        want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if url.path != "/token" or h.headers.get("Authorization") != want:
            reply(h, 401, b'{"details":"bad credentials"}')
            return
        access = []
        for scope in q.get("scope", []):
            typ, name, actions = scope.split(":")
            access.append({"type": typ, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": USER,
            "aud": SERVICE,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": b64url(os.urandom(8)),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.der).decode()]}
        signing = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        sig = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = f"{signing}.{b64url(sig)}"
        reply(
            h,
            200,
            json.dumps({"token": token, "expires_in": 600}).encode(),
            {"Content-Type": "application/json"},
        )


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TokenServer]]:
    base = tmp_path_factory.mktemp("registry-token")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coco token signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (base / "bundle.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    server = TokenServer(key, cert)
    with serve(server) as token_host:
        token = [
            "token:",
            f"  realm: http://{token_host}/token",
            f"  service: {SERVICE}",
            f"  issuer: {ISSUER}",
            f"  rootcertbundle: {base / 'bundle.pem'}",
        ]
        with start_registry(base / "registry", auth=token) as reg:
            yield reg.host, server


def test_bearer_token_push_and_pull(token_registry, tmp_path: Path) -> None:
    host, server = token_registry
    img = write_image(tmp_path / "src", [tar_layer({"t": b"token auth"})], tag="v1")
    creds = Credentials(USER, PASSWORD)
    o = CopyOptions(
        src_credentials=creds, dest_credentials=creds, src_tls_verify=False, dest_tls_verify=False
    )
    dst = f"docker://{host}/team/app:v1"
    r = copy_image(img.ref, dst, options=o)
    assert r.manifest_digest == img.manifest_digest
    scopes = [s for q in server.requests for s in q.get("scope", [])]
    assert "repository:team/app:pull,push" in scopes
    assert all(q.get("service") == [SERVICE] for q in server.requests)
    # skopeo (an independent client of the same token flow) sees our manifest
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}", dst],
        check=True,
        capture_output=True,
    ).stdout
    assert raw == img.manifest
    # mount into another repository with a token carrying both scopes, then pull back
    r = copy_image(dst, f"docker://{host}/team/other:v1", options=o)
    assert [layer.action for layer in r.layers] == ["mounted"]
    copy_image(f"docker://{host}/team/other:v1", f"oci:{tmp_path / 'back'}:v1", options=o)
    assert OciLayout.open(tmp_path / "back").resolve("v1").digest == img.manifest_digest


def test_bearer_wrong_password(token_registry, tmp_path: Path) -> None:
    host, _ = token_registry
    img = write_image(tmp_path / "src", [tar_layer({"t": b"x"})])
    o = CopyOptions(dest_credentials=Credentials(USER, "nope"), dest_tls_verify=False)
    with pytest.raises(AuthError, match=r"token endpoint .* refused the credentials: 401"):
        copy_image(img.ref, f"docker://{host}/team/app:bad", options=o)


def test_stale_token_is_refreshed(token_registry, tmp_path: Path) -> None:
    host, server = token_registry
    img = write_image(tmp_path / "src", [tar_layer({"t": b"stale"})], tag="v1")
    creds = Credentials(USER, PASSWORD)
    copy_image(
        img.ref,
        f"docker://{host}/team/stale:v1",
        options=CopyOptions(dest_credentials=creds, dest_tls_verify=False),
    )
    client = RegistryClient(host, credentials=creds, tls_verify=False)
    client.ping()
    client._tokens["repository:team/stale:pull"] = "expired.token.value"
    before = len(server.requests)
    raw, _ = client.get_manifest("team/stale", "v1", "docker://team/stale:v1")
    assert raw == img.manifest
    assert len(server.requests) == before + 1  # exactly one fresh token was fetched
    client.close()
