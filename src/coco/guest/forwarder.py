"""``coco forwarder serve``: the agent-protocol-forwarder in a peer-pod VM.

It serves ``grpc.AgentService`` and ``grpc.Health`` on ``0.0.0.0:15150`` over mutual TLS (the
server key and certificate and the CA for clients come from ``/run/peerpod/apf.json``, which
``coco process-user-data`` wrote from the userdata) and relays every call to the kata agent on
``unix:///run/kata-containers/agent.sock``. A client without a certificate from that CA is
refused in the handshake. As upstream's forwarder it changes two requests on the way:

* CreateContainer gets ``{Type: "network", Path: <pod namespace>}`` appended to its OCI spec's
  namespaces (the shim removed the network namespace; the pod's network lives in the VM);
* CreateSandbox's ``dns`` is cleared (the VM's resolver is used).

At start the pod network namespace (``/run/netns/podns``) is created if missing, with ``lo`` up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from coco import jsonio
from coco.errors import CocoError
from coco.rpc import services
from coco.rpc.client import Client
from coco.rpc.relay import relay_handlers
from coco.rpc.server import Server

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "0.0.0.0:15150"
DEFAULT_CONFIG = Path("/run/peerpod/apf.json")
DEFAULT_AGENT = "unix:///run/kata-containers/agent.sock"
DEFAULT_POD_NAMESPACE = "/run/netns/podns"


class ForwarderError(CocoError):
    """The forwarder's configuration or listener is unusable."""


@dataclass(frozen=True)
class ForwarderConfig:
    pod_name: str = ""
    pod_namespace: str = ""
    server_key: str = ""
    server_cert: str = ""
    client_ca: str = ""
    tls_min_version: str = ""

    @classmethod
    def load(cls, path: Path) -> ForwarderConfig:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ForwarderError(f"forwarder config {path}: {e.strerror or e}") from None
        doc = jsonio.loads(raw, what=f"forwarder config {path}", error=ForwarderError)
        if not isinstance(doc, dict):
            raise ForwarderError(f"forwarder config {path}: expected a JSON object")
        keys = {
            "pod-name": "pod_name", "pod-namespace": "pod_namespace",
            "tls-server-key": "server_key", "tls-server-cert": "server_cert",
            "tls-client-ca": "client_ca", "tls-min-version": "tls_min_version",
        }  # fmt: skip
        values = {}
        for key, attr in keys.items():
            value = doc.get(key, "")
            if not isinstance(value, str):
                raise ForwarderError(
                    f"forwarder config {path}: {key}: expected a string, found "
                    f"{type(value).__name__}"
                )
            values[attr] = value
        return cls(**values)

    def ssl_context(self, where: str, baked: TlsFiles | None = None) -> ssl.SSLContext:
        """Server side of mutual TLS: our key and certificate, clients only from the CA. The
        keys come from the config (automatic mode); when it has none, from ``baked``, the files
        of the image (manual mode: ``/etc/certificates``)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = (
            ssl.TLSVersion.TLSv1_3 if self.tls_min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
        )
        ctx.verify_mode = ssl.CERT_REQUIRED
        given = [bool(v) for v in (self.server_key, self.server_cert, self.client_ca)]
        if not any(given) and baked is not None and baked.present():
            try:
                ctx.load_verify_locations(baked.ca)
                ctx.load_cert_chain(baked.cert, baked.key)
            except (OSError, ssl.SSLError) as e:
                raise ForwarderError(
                    f"TLS files {baked.cert}, {baked.key}, {baked.ca}: {e}"
                ) from None
            return ctx
        missing = [
            k for k, v in (("tls-server-key", self.server_key), ("tls-server-cert",
                           self.server_cert), ("tls-client-ca", self.client_ca)) if not v
        ]  # fmt: skip
        if missing:
            raise ForwarderError(
                f"{where}: expected {', '.join(missing)} for TLS (or the image's certificate "
                "files, or --disable-tls, insecure)"
            )
        try:
            ctx.load_verify_locations(cadata=self.client_ca)
            with tempfile.TemporaryDirectory(prefix="coco-apf-") as tmp:
                cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
                cert.write_text(self.server_cert)
                key.touch(mode=0o600)
                key.write_text(self.server_key)
                ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, ValueError) as e:
            raise ForwarderError(f"{where}: TLS keys: expected PEM: {e}") from None
        return ctx


@dataclass(frozen=True)
class TlsFiles:
    """Manual mode: certificates baked into the pod VM image (upstream's /etc/certificates)."""

    cert: Path = Path("/etc/certificates/tls.crt")
    key: Path = Path("/etc/certificates/tls.key")
    ca: Path = Path("/etc/certificates/ca.crt")

    def present(self) -> bool:
        return self.cert.exists() and self.key.exists() and self.ca.exists()


def add_network_namespace(pod_namespace: str):
    def rewrite(req: Message) -> None:
        if pod_namespace:
            req.OCI.Linux.Namespaces.add(Type="network", Path=pod_namespace)

    return rewrite


def clear_dns(req: Message) -> None:
    del req.dns[:]


def ensure_netns(path: str) -> None:
    """Create ``/run/netns/<name>`` with ``ip netns add`` if it is missing, ``lo`` up."""
    p = Path(path)
    if not path or p.exists():
        return
    if p.parent != Path("/run/netns") or shutil.which("ip") is None:
        raise ForwarderError(
            f"pod network namespace {path}: missing, and only /run/netns/<name> can be made"
        )
    for cmd in (["ip", "netns", "add", p.name], ["ip", "-n", p.name, "link", "set", "lo", "up"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ForwarderError(
                f"pod network namespace {path}: {' '.join(cmd)}: {proc.stderr.strip()}"
            )


class Forwarder:
    def __init__(
        self,
        agent: str,
        ssl_context: ssl.SSLContext | None,
        pod_namespace: str = DEFAULT_POD_NAMESPACE,
    ) -> None:
        self.agent = agent
        self.ssl_context = ssl_context
        self.pod_namespace = pod_namespace
        self._client: Client | None = None
        self._lock = asyncio.Lock()
        self._rpc = Server()
        rewrite = {
            "CreateContainer": add_network_namespace(pod_namespace),
            "CreateSandbox": clear_dns,
        }
        self._rpc.register(services.AGENT, relay_handlers(services.AGENT, self._agent, rewrite))
        self._rpc.register(services.HEALTH, relay_handlers(services.HEALTH, self._agent))
        self._listener: asyncio.Server | None = None

    async def _agent(self) -> Client:
        async with self._lock:
            if self._client is None or self._client._closed is not None:
                self._client = await Client.connect(self.agent, timeout=10)
            return self._client

    async def listen(self, address: str) -> tuple[str, int]:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ForwarderError(f"listen address: expected HOST:PORT, found {address!r}")

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._rpc.serve_stream(
                reader, writer, peer=str(writer.get_extra_info("peername"))
            )

        try:
            self._listener = await asyncio.start_server(
                handle, host, int(port), ssl=self.ssl_context, reuse_address=True
            )
        except OSError as e:
            raise ForwarderError(
                f"forwarder: cannot listen on {address}: {e.strerror or e}"
            ) from None
        bound = self._listener.sockets[0].getsockname()
        log.info("forwarder: serving %s:%d -> %s (TLS %s)", bound[0], bound[1], self.agent,
                 "on" if self.ssl_context else "OFF")  # fmt: skip
        return bound[0], bound[1]

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._rpc.stop(grace=1.0)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
