"""coco forwarder serve: mutual TLS on its port, relaying to a real ttRPC agent socket, with the
CreateContainer / CreateSandbox rewrites upstream's forwarder makes; the CAA's agent proxy in
front of it (the whole host -> VM path on loopback)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty

from coco.guest.forwarder import Forwarder, ForwarderConfig, ForwarderError
from coco.host.peerpods.cloudconfig import apf_config
from coco.host.peerpods.provider import PeerPodError
from coco.host.peerpods.proxy import AgentProxy
from coco.host.peerpods.tls import Certs
from coco.rpc import Client, Code, RpcError
from coco.rpc.protos import agent_pb2, health_pb2
from coco.rpc.server import Server
from coco.rpc.services import AGENT, HEALTH
from tests.rpc.conftest import arun

NAME = "podvm-web-0123abcd"


class StubAgent:
    """A real ttRPC server on a unix socket answering a few agent calls and keeping requests."""

    def __init__(self) -> None:
        self.requests: list = []

    async def CreateContainer(self, req, ctx):
        self.requests.append(req)
        return Empty()

    async def CreateSandbox(self, req, ctx):
        self.requests.append(req)
        return Empty()

    async def StatsContainer(self, req, ctx):
        raise RpcError(Code.NOT_FOUND, f"container {req.container_id} not found")


async def _agent(tmp_path: Path, stub: StubAgent) -> tuple[Server, str]:
    server = Server()
    server.register(AGENT, stub)
    server.register(HEALTH, {"Check": lambda req, ctx: health_pb2.HealthCheckResponse(status=1)})
    return server, await server.listen(f"unix://{tmp_path}/agent.sock")


def _forwarder_ctx(tmp_path: Path, certs: Certs) -> ssl.SSLContext:
    cert = certs.issue_server(NAME)
    apf = tmp_path / "apf.json"
    apf.write_text(
        apf_config(
            "web",
            "default",
            server_key=cert.key_pem,
            server_cert=cert.cert_pem,
            client_ca=certs.client_cert_pem,
        )
    )
    return ForwarderConfig.load(apf).ssl_context(str(apf))


def test_proxy_forwarder_agent_path_with_rewrites(tmp_path: Path) -> None:
    certs = Certs.load_or_create(tmp_path / "tls")
    stub = StubAgent()

    async def main() -> None:
        agent, agent_addr = await _agent(tmp_path, stub)
        fwd = Forwarder(agent_addr, _forwarder_ctx(tmp_path, certs), "/run/netns/podns")
        _, port = await fwd.listen("127.0.0.1:0")
        proxy = AgentProxy(tmp_path / "agent.ttrpc", "127.0.0.1", port,
                           certs.client_context(), NAME)  # fmt: skip
        await proxy.start()
        try:
            await proxy.wait_ready(10)
            async with await Client.connect(f"unix://{tmp_path}/agent.ttrpc") as shim:
                req = agent_pb2.CreateContainerRequest(container_id="c1")
                req.OCI.Linux.Namespaces.add(Type="pid", Path="")
                await shim.call(AGENT.name, "CreateContainer", req, Empty)
                sb = agent_pb2.CreateSandboxRequest(hostname="web", dns=["10.0.0.10"])
                await shim.call(AGENT.name, "CreateSandbox", sb, Empty)
                with pytest.raises(RpcError) as err:
                    await shim.call(AGENT.name, "StatsContainer",
                                    agent_pb2.StatsContainerRequest(container_id="nope"),
                                    agent_pb2.StatsContainerResponse)  # fmt: skip
                assert err.value.code == Code.NOT_FOUND
                assert "container nope not found" in err.value.message
        finally:
            await proxy.stop()
            await fwd.stop()
            await agent.stop(grace=1)

    arun(main())
    created, sandbox = stub.requests
    namespaces = [(n.Type, n.Path) for n in created.OCI.Linux.Namespaces]
    assert namespaces == [("pid", ""), ("network", "/run/netns/podns")]
    assert sandbox.hostname == "web" and list(sandbox.dns) == []


def test_forwarder_refuses_a_client_certificate_of_another_ca(tmp_path: Path) -> None:
    certs = Certs.load_or_create(tmp_path / "tls")
    stranger = Certs.load_or_create(tmp_path / "other")
    stub = StubAgent()

    async def main() -> tuple[str, str]:
        agent, agent_addr = await _agent(tmp_path, stub)
        fwd = Forwarder(agent_addr, _forwarder_ctx(tmp_path, certs))
        _, port = await fwd.listen("127.0.0.1:0")
        try:
            # a client certificate the forwarder's CA did not issue (trusting the right server)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cadata=certs.ca_cert_pem.decode())
            ctx.load_cert_chain(tmp_path / "other/client.crt", tmp_path / "other/client.key")
            proxy = AgentProxy(tmp_path / "a1.sock", "127.0.0.1", port, ctx, NAME)
            with pytest.raises(PeerPodError) as wrong_client:
                await proxy.wait_ready(1.5)
            # the right client, but a server certificate from another CA: the proxy refuses
            proxy2 = AgentProxy(tmp_path / "a2.sock", "127.0.0.1", port,
                                stranger.client_context(), NAME)  # fmt: skip
            with pytest.raises(PeerPodError) as wrong_server:
                await proxy2.wait_ready(1.5)
            # no client certificate at all
            bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            bare.load_verify_locations(cadata=certs.ca_cert_pem.decode())
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=bare, server_hostname=NAME
            )
            assert await reader.read() == b""  # the server closes after the failed handshake
            writer.close()
            return str(wrong_client.value), str(wrong_server.value)
        finally:
            await fwd.stop()
            await agent.stop(grace=1)

    client_err, server_err = arun(main())
    assert "did not answer within 1.5 s" in client_err
    assert client_err.endswith("closed by the server")  # the forwarder refused the certificate
    assert "did not answer within 1.5 s" in server_err
    assert server_err.endswith("failed: CERTIFICATE_VERIFY_FAILED")


def test_forwarder_config_errors(tmp_path: Path) -> None:
    apf = tmp_path / "apf.json"
    apf.write_text('{"pod-name": "web"}')
    with pytest.raises(
        ForwarderError, match="expected tls-server-key, tls-server-cert, tls-client-ca"
    ):
        ForwarderConfig.load(apf).ssl_context(str(apf))
    apf.write_text('{"tls-server-key": 3}')
    with pytest.raises(ForwarderError, match="tls-server-key: expected a string, found int"):
        ForwarderConfig.load(apf)
    apf.write_text("[" * 100000)
    with pytest.raises(ForwarderError, match="forwarder config"):
        ForwarderConfig.load(apf)
    with pytest.raises(ForwarderError, match="No such file"):
        ForwarderConfig.load(tmp_path / "missing.json")


def test_manual_tls_with_certificates_baked_into_the_image(tmp_path: Path) -> None:
    from coco.guest.forwarder import TlsFiles
    from coco.host.peerpods.caa import Caa, CaaConfig

    pki = Certs.load_or_create(tmp_path / "pki")
    baked = tmp_path / "etc-certificates"
    baked.mkdir()
    server = pki.issue_server("podvm-server")
    (baked / "tls.crt").write_bytes(server.cert_pem)
    (baked / "tls.key").write_bytes(server.key_pem)
    (baked / "ca.crt").write_bytes(pki.client_cert_pem)  # the CAA's client certificate
    apf = tmp_path / "apf.json"
    apf.write_text(apf_config("web", "default", server_key=None, server_cert=None, client_ca=None))
    files = TlsFiles(baked / "tls.crt", baked / "tls.key", baked / "ca.crt")
    server_ctx = ForwarderConfig.load(apf).ssl_context(str(apf), files)

    def caa_ctx(**kw) -> ssl.SSLContext:
        config = CaaConfig(cert_file=tmp_path / "pki/client.crt",
                           cert_key=tmp_path / "pki/client.key", **kw)  # fmt: skip
        return Caa(config, None)._manual_context()  # type: ignore[arg-type]

    Certs.load_or_create(tmp_path / "other")  # another CA
    stub = StubAgent()

    async def main() -> tuple[bool, str]:
        agent, agent_addr = await _agent(tmp_path, stub)
        fwd = Forwarder(agent_addr, server_ctx)
        _, port = await fwd.listen("127.0.0.1:0")
        try:
            good = AgentProxy(tmp_path / "p1.sock", "127.0.0.1", port,
                              caa_ctx(ca_cert_file=tmp_path / "pki/ca.crt"), "podvm-server")  # fmt: skip
            await good.wait_ready(10)
            wrong_ca = AgentProxy(tmp_path / "p2.sock", "127.0.0.1", port,
                                  caa_ctx(ca_cert_file=tmp_path / "other/ca.crt"), "podvm-server")  # fmt: skip
            with pytest.raises(PeerPodError) as err:
                await wrong_ca.wait_ready(1.5)
            skip = AgentProxy(tmp_path / "p3.sock", "127.0.0.1", port,
                              caa_ctx(ca_cert_file=tmp_path / "other/ca.crt", tls_skip_verify=True),
                              "podvm-server")  # fmt: skip
            await skip.wait_ready(10)  # insecure: accepted without checking the server
            return True, str(err.value)
        finally:
            await fwd.stop()
            await agent.stop(grace=1)

    ok, refused = arun(main())
    assert ok and refused.endswith("CERTIFICATE_VERIFY_FAILED")
    with pytest.raises(PeerPodError, match="manual TLS: cannot load"):
        caa_ctx(ca_cert_file=tmp_path / "missing.crt")
