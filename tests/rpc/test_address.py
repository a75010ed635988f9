"""Addresses and transports: parsing, the stale-socket rule, abstract sockets, TCP, vsock and a
character device (a pty standing in for a virtio-serial port)."""

from __future__ import annotations

import asyncio
import os
import socket
import tty

import pytest

from coco.rpc import AddressError, Client, Server, Stub, address
from coco.rpc.protos import attestation_agent_pb2 as aa
from coco.rpc.services import ATTESTATION_AGENT

from .conftest import arun, serving


class Tee:
    def GetTeeType(self, request, ctx):
        return aa.GetTeeTypeResponse(tee="sample")


async def tee_of(addr: str) -> str:
    async with await Client.connect(addr) as client:
        return (await Stub(client, ATTESTATION_AGENT).GetTeeType()).tee


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("unix:///run/x.sock", address.Address("unix", path="/run/x.sock")),
        ("unix://@coco-abstract", address.Address("unix", path="@coco-abstract")),
        ("tcp://127.0.0.1:15150", address.Address("tcp", host="127.0.0.1", port=15150)),
        ("tcp://[::1]:80", address.Address("tcp", host="::1", port=80)),
        ("vsock://-1:1024", address.Address("vsock", cid=address.VMADDR_CID_ANY, port=1024)),
        ("vsock://3:1024", address.Address("vsock", cid=3, port=1024)),
        (
            "serial:///dev/virtio-ports/agent.0",
            address.Address("serial", path="/dev/virtio-ports/agent.0"),
        ),
    ],
)
def test_parse_round_trip(text, parsed) -> None:
    assert address.parse(text) == parsed
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("/run/x.sock", "expected unix:///ABS/PATH"),
        (
            "unix://relative/x.sock",
            "expected unix:///ABS/PATH or unix://@NAME, got 'relative/x.sock'",
        ),
        ("tcp://127.0.0.1", "expected tcp://HOST:PORT"),
        ("tcp://127.0.0.1:99999", "expected a port 0-65535, got '99999'"),
        ("vsock://host:1024", "expected a numeric vsock CID, got 'host'"),
        ("http://x:1", "unknown scheme 'http'"),
    ],
)
def test_parse_errors_say_what_was_expected(text, words) -> None:
    with pytest.raises(AddressError) as err:
        address.parse(text)
    assert words in str(err.value) and repr(text) in str(err.value)


def test_stale_socket_is_replaced_and_parent_dir_created(tmp_path) -> None:
    path = tmp_path / "run" / "aa" / "aa.sock"
    path.parent.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody accepts on it
    assert arun(_serve_and_ask(tmp_path, f"unix://{path}")) == "sample"
    assert not path.exists()  # stop removed our socket

    fresh = tmp_path / "new" / "dir" / "cdh.sock"
    assert arun(_serve_and_ask(tmp_path, f"unix://{fresh}")) == "sample"


async def _serve_and_ask(tmp_path, addr: str) -> str:
    async with serving(tmp_path, {ATTESTATION_AGENT: Tee()}, addr) as bound:
        return await tee_of(bound)


def test_regular_file_at_the_socket_path_is_refused_and_kept(tmp_path) -> None:
    path = tmp_path / "aa.sock"
    path.write_text("not a socket")
    with pytest.raises(AddressError, match="exists and is not a socket; refusing to replace it"):
        arun(_serve_and_ask(tmp_path, f"unix://{path}"))
    assert path.read_text() == "not a socket"


def test_live_socket_is_not_taken_over(tmp_path) -> None:
    path = tmp_path / "aa.sock"

    async def main():
        async with serving(tmp_path, {ATTESTATION_AGENT: Tee()}, f"unix://{path}"):
            second = Server()
            with pytest.raises(AddressError, match="another server is listening"):
                await second.listen(f"unix://{path}")
            return await tee_of(f"unix://{path}")  # the first server is untouched

    assert arun(main()) == "sample"


def test_abstract_socket(tmp_path) -> None:
    name = f"unix://@coco-rpc-test-{os.getpid()}-{id(tmp_path)}"
    assert arun(_serve_and_ask(tmp_path, name)) == "sample"


def test_tcp_port_zero_reports_the_port(tmp_path) -> None:
    async def main():
        async with serving(tmp_path, {ATTESTATION_AGENT: Tee()}, "tcp://127.0.0.1:0") as bound:
            assert bound.startswith("tcp://127.0.0.1:") and not bound.endswith(":0")
            return await tee_of(bound)

    assert arun(main()) == "sample"


def test_vsock_listens_or_says_why(tmp_path, monkeypatch) -> None:
    port = 20000 + os.getpid() % 20000

    async def listen() -> str:
        server = Server()
        try:
            return await server.listen(f"vsock://-1:{port}")
        finally:
            await server.stop()

    if hasattr(socket, "AF_VSOCK"):
        try:
            bound = arun(listen())
        except AddressError as e:
            assert "vsock" in str(e)
        else:
            assert bound == f"vsock://-1:{port}"
    monkeypatch.delattr(socket, "AF_VSOCK", raising=False)
    with pytest.raises(AddressError, match="no AF_VSOCK"):
        arun(listen())


def test_connect_to_nothing_is_unavailable(tmp_path) -> None:
    from coco.rpc import Code, UnavailableError

    with pytest.raises(UnavailableError) as err:
        arun(Client.connect(f"unix://{tmp_path}/nobody.sock"))
    assert err.value.code == Code.UNAVAILABLE
    assert f"cannot connect to unix://{tmp_path}/nobody.sock" in err.value.message


def test_serial_device(tmp_path) -> None:
    """The server on a pty's slave side, as the agent on a virtio-serial port; the client on the
    master side, as the host on the other end of the port."""
    master, slave = os.openpty()
    slave_path = os.ttyname(slave)
    tty.setraw(master)

    async def main():
        server = Server()
        server.register(ATTESTATION_AGENT, Tee())
        await server.listen(f"serial://{slave_path}")
        try:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(master), "rb", 0)
            )
            wt, wp = await loop.connect_write_pipe(
                lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
                os.fdopen(os.dup(master), "wb", 0),
            )
            client = Client(reader, asyncio.StreamWriter(wt, wp, reader, loop), address="pty")
            stub = Stub(client, ATTESTATION_AGENT)
            tees = await asyncio.gather(*(stub.GetTeeType() for _ in range(3)))
            await client.close()
            return [t.tee for t in tees]
        finally:
            await server.stop()

    try:
        assert arun(main()) == ["sample"] * 3
    finally:
        os.close(master)
        os.close(slave)


def test_serial_path_that_is_not_a_device(tmp_path) -> None:
    path = tmp_path / "file"
    path.write_text("")

    async def main():
        await Server().listen(f"serial://{path}")

    with pytest.raises(
        AddressError, match=f"cannot open serial://{path}: .*not a character device"
    ):
        arun(main())
