"""A docker-registry serving HTTPS with a self-signed certificate: verification on refuses it,
``tls_verify=False`` talks HTTPS without checks (no fallback to HTTP needed), also when the
scheme memory says the port spoke plain HTTP before."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coco.errors import RegistryError
from coco.oci.copy import CopyOptions, copy_image
from coco.oci.registry import RegistryClient
from tests.conftest import start_registry
from tests.imagekit import tar_layer, write_image
from tests.oci.fakeregistry import relay


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("registry-tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (base / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (base / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    tls = ["tls:", f"  certificate: {base / 'cert.pem'}", f"  key: {base / 'key.pem'}"]
    with start_registry(base / "registry", http=tls) as reg:
        yield reg.host


def test_self_signed_https(tls_registry: str, tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"tls": b"yes"})], tag="v1")
    dst = f"docker://{tls_registry}/secure/app:v1"
    with pytest.raises(RegistryError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        copy_image(img.ref, dst)
    r = copy_image(img.ref, dst, options=CopyOptions(dest_tls_verify=False))
    assert r.manifest_digest == img.manifest_digest
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", dst], check=True, capture_output=True
    ).stdout
    assert raw == img.manifest
    client = RegistryClient(tls_registry, tls_verify=False)
    client.ping()
    assert client._base == f"https://{tls_registry}"  # HTTPS was used, not the HTTP fallback
    client.close()


def test_stale_plain_http_memory_of_a_registry_that_speaks_tls(
    tls_registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with relay(tls_registry) as r:
        mark = tmp_path / "coco" / "http-registries" / r.host
        mark.parent.mkdir(parents=True)
        mark.write_bytes(b"")  # as if the port spoke plain HTTP the last time
        client = RegistryClient(r.host, tls_verify=False)
        client.ping()
        client.close()
        assert client._base == f"https://{r.host}"
        assert r.starts[0].startswith(b"GET /v2/")  # the memory was used: HTTP first ...
        assert (r.tls_attempts(), r.plain_requests()) == (1, 1)  # ... then HTTPS
        assert not mark.exists()  # and forgotten
        r.starts.clear()
        client = RegistryClient(r.host, tls_verify=False)
        client.ping()
        client.close()
        assert (r.tls_attempts(), r.plain_requests()) == (1, 0)
