"""Mutual TLS between the CAA's agent proxy and the forwarder in each pod VM (automatic mode).

As upstream: the CAA has a self-signed client certificate (CN ``cloud-api-adaptor``) and a CA
(CN ``agent-protocol-forwarder``) that issues each pod VM a server certificate for its instance
name; the VM receives its key, its certificate and the client certificate (as the CA it trusts
for clients) in userdata. Unlike upstream the CA and the client key are kept on disk (0600, under
the pods directory), so a restarted CAA still reaches the VMs it made.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coco.files import atomic_write
from coco.host.peerpods.provider import PeerPodError

CLIENT_CN = "cloud-api-adaptor"
CA_CN = "agent-protocol-forwarder"
VALIDITY = datetime.timedelta(days=3650)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    san: str | None = None,
    client: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    usage = x509.oid.ExtendedKeyUsageOID
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san is not None:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    if not ca:
        eku = [usage.CLIENT_AUTH] if client else [usage.SERVER_AUTH]
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class ServerCert:
    key_pem: bytes
    cert_pem: bytes


class Certs:
    """The CAA's CA and client certificate; :meth:`load_or_create` keeps them in ``directory``."""

    def __init__(self, ca_key, ca_cert, client_key, client_cert) -> None:  # type: ignore[no-untyped-def]
        self.ca_key: ec.EllipticCurvePrivateKey = ca_key
        self.ca_cert: x509.Certificate = ca_cert
        self.client_key: ec.EllipticCurvePrivateKey = client_key
        self.client_cert: x509.Certificate = client_cert
        self.directory: Path | None = None

    @classmethod
    def load_or_create(cls, directory: Path) -> Certs:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = {n: directory / n for n in ("ca.key", "ca.crt", "client.key", "client.crt")}
        if all(p.exists() for p in files.values()):
            try:
                certs = cls(
                    serialization.load_pem_private_key(files["ca.key"].read_bytes(), None),
                    x509.load_pem_x509_certificate(files["ca.crt"].read_bytes()),
                    serialization.load_pem_private_key(files["client.key"].read_bytes(), None),
                    x509.load_pem_x509_certificate(files["client.crt"].read_bytes()),
                )
            except (ValueError, TypeError) as e:
                raise PeerPodError(
                    f"TLS state {directory}: expected PEM keys and certificates: {e} (remove the "
                    "directory to start over: running pod VMs then become unreachable)"
                ) from None
            certs.directory = directory
            return certs
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _cert(CA_CN, ca_key, None, ca_key, ca=True)
        client_key = ec.generate_private_key(ec.SECP256R1())
        client_cert = _cert(CLIENT_CN, client_key, None, client_key, ca=False, client=True)
        for name, data in (
            ("ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
            ("client.crt", client_cert.public_bytes(serialization.Encoding.PEM)),
            ("ca.key", _pem_key(ca_key)),
            ("client.key", _pem_key(client_key)),
        ):
            atomic_write(files[name], data, 0o600)
        certs = cls(ca_key, ca_cert, client_key, client_cert)
        certs.directory = directory
        return certs

    @property
    def client_cert_pem(self) -> bytes:
        return self.client_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def ca_cert_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def issue_server(self, name: str) -> ServerCert:
        """A server key and certificate for the pod VM ``name`` (its SAN)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, self.ca_cert, self.ca_key, ca=False, san=name)
        return ServerCert(_pem_key(key), cert.public_bytes(serialization.Encoding.PEM))

    def client_context(self, min_version: str = "TLSv1.2") -> ssl.SSLContext:
        """What the proxy dials with: our client certificate, only our CA's server certs."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = tls_version(min_version)
        ctx.load_verify_locations(cadata=self.ca_cert_pem.decode())
        if self.directory is None:
            raise PeerPodError("TLS: the client key is not on disk")
        ctx.load_cert_chain(self.directory / "client.crt", self.directory / "client.key")
        return ctx


def tls_version(name: str) -> ssl.TLSVersion:
    versions = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
    if name not in versions:
        raise PeerPodError(
            f"TLS minimum version: expected one of {', '.join(versions)}, found {name!r}"
        )
    return versions[name]
