"""Frames and envelopes byte for byte: the worked examples of the spec (guest-components §1.4),
both as our client writes them and as our server answers them, and the 4 MiB limit."""

from __future__ import annotations

import asyncio

import pytest

from coco.rpc import Client, Code, RpcError, Server, Stub, frames
from coco.rpc.protos import attestation_agent_pb2 as aa
from coco.rpc.services import ATTESTATION_AGENT

from .conftest import RawConn, arun

SERVICE = b"attestation_agent.AttestationAgentService"
# Request GetTeeType, stream 1, timeout 50 s
REQUEST = (
    bytes.fromhex("0000003e 00000001 01 00")
    + b"\x0a\x29"
    + SERVICE
    + b"\x12\x0aGetTeeType"
    + bytes.fromhex("20 80e8eda1ba01")
)
# its answer GetTeeTypeResponse{tee="sample"}
RESPONSE = bytes.fromhex("0000000a 00000001 02 00 12 08 0a06 73616d706c65")
TOKEN_ERROR = "[ERROR:attestation-agent] AA-KBC get token failed"
ERROR_BODY = b"\x0a\x35\x08\x0d\x12\x31" + TOKEN_ERROR.encode()


def test_header_encode_decode() -> None:
    frame = frames.encode(7, frames.MessageType.DATA, b"xyz", flags=frames.Flag.REMOTE_CLOSED)
    assert frame == bytes.fromhex("00000003 00000007 03 01") + b"xyz"
    assert frames.decode_header(frame[:10]) == (3, 7, 3, 1)
    with pytest.raises(ValueError, match="expected 10 bytes, got 9"):
        frames.decode_header(frame[:9])


def test_limit_is_4_mib_inclusive() -> None:
    assert frames.MAX_MESSAGE == 4194304
    assert len(frames.encode(1, 1, bytes(frames.MAX_MESSAGE))) == frames.MAX_MESSAGE + 10
    with pytest.raises(frames.OversizedMessageError) as err:
        frames.encode(1, 1, bytes(frames.MAX_MESSAGE + 1))
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    assert err.value.message == "message length 4194305 exceed maximum message size of 4194304"


def test_client_writes_the_worked_request_and_reads_the_worked_response(tmp_path) -> None:
    seen: list[bytes] = []

    async def fake_aa(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readexactly(len(REQUEST)))
        writer.write(RESPONSE)
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    async def main() -> str:
        server = await asyncio.start_unix_server(fake_aa, path=str(tmp_path / "aa.sock"))
        async with server:
            async with await Client.connect(f"unix://{tmp_path}/aa.sock") as client:
                reply = await Stub(client, ATTESTATION_AGENT).GetTeeType(timeout=50)
            return reply.tee

    assert arun(main()) == "sample"
    assert seen == [REQUEST]


def test_server_answers_the_worked_response_and_error_bytes(tmp_path) -> None:
    class AA:
        def GetTeeType(self, request, ctx):
            assert ctx.timeout == 50.0
            return aa.GetTeeTypeResponse(tee="sample")

        async def GetToken(self, request, ctx):
            raise RpcError(Code.INTERNAL, TOKEN_ERROR)

    async def main() -> tuple[bytes, bytes]:
        server = Server()
        server.register(ATTESTATION_AGENT, AA())
        await server.listen(f"unix://{tmp_path}/aa.sock")
        try:
            raw = await RawConn.open(str(tmp_path / "aa.sock"))
            raw.writer.write(REQUEST)
            ok = await raw.reader.readexactly(len(RESPONSE))
            raw.request(
                3,
                SERVICE.decode(),
                "GetToken",
                aa.GetTokenRequest(TokenType="kbs").SerializeToString(),
            )
            _, _, _, err = await raw.frame()
            await raw.close()
            return ok, err
        finally:
            await server.stop()

    ok, err = arun(main())
    assert ok == RESPONSE
    assert err == ERROR_BODY
