"""The server against raw frames and our client: dispatch, upstream status codes and texts,
concurrency on one connection, deadlines, the size limit, and bad peers that must not hurt others."""

from __future__ import annotations

import asyncio
import socket

import pytest

from coco.rpc import Client, Code, RpcError, Server, Stub, UnavailableError, frames
from coco.rpc.protos import attestation_agent_pb2 as aa
from coco.rpc.services import ATTESTATION_AGENT, GET_RESOURCE

from .conftest import RawConn, arun, connected, serving

AA = ATTESTATION_AGENT.name


class Echo:
    """GetEvidence echoes RuntimeData; GetTeeType answers "sample"; others are not implemented."""

    def __init__(self) -> None:
        self.calls = 0

    async def GetEvidence(self, request, ctx):
        self.calls += 1
        return aa.GetEvidenceResponse(Evidence=request.RuntimeData)

    def GetTeeType(self, request, ctx):
        return aa.GetTeeTypeResponse(tee="sample")


def call_status(tmp_path, impl, send) -> list[tuple[int, int, str]]:
    """Serve AA with ``impl``, let ``send(raw)`` write frames, return (sid, code, message) of the
    answers it expects (``send`` returns how many)."""

    async def main():
        async with serving(tmp_path, {ATTESTATION_AGENT: impl}) as address:
            raw = await RawConn.open(address.removeprefix("unix://"))
            n = send(raw)
            out = []
            for _ in range(n):
                sid, resp = await raw.response()
                out.append((sid, resp.status.code, resp.status.message))
            await raw.close()
            return out

    return arun(main())


def test_unknown_service_and_method_answer_go_codes_and_texts(tmp_path) -> None:
    def send(raw: RawConn) -> int:
        raw.request(1, "attestation_agent.Nope", "GetTeeType")
        raw.request(3, AA, "Nope")
        raw.request(5, AA, "BindInitData")  # declared in the proto, not implemented by Echo
        return 3

    assert call_status(tmp_path, Echo(), send) == [
        (1, Code.UNIMPLEMENTED, "service attestation_agent.Nope"),
        (3, Code.UNIMPLEMENTED, "method Nope"),
        (5, Code.NOT_FOUND, f"/{AA}/BindInitData is not supported"),
    ]


def test_stream_id_rules_and_frame_types(tmp_path) -> None:
    def send(raw: RawConn) -> int:
        raw.request(2, AA, "GetTeeType")  # even
        raw.request(7, AA, "GetTeeType")
        raw.request(5, AA, "GetTeeType")  # lower than the last one
        raw.request(7, AA, "GetTeeType")  # reused
        raw.send(9, frames.MessageType.DATA, b"")  # no stream to take data
        raw.send(11, 0x42, b"future message type")  # ignored: no answer at all
        raw.send(11, frames.MessageType.RESPONSE, b"")  # a server never gets responses: ignored
        raw.request(13, AA, "GetTeeType")
        return 6

    answers = call_status(tmp_path, Echo(), send)
    # the answers to bad frames are sent at once, so only the set per stream is fixed
    assert sorted(answers) == sorted(
        [
            (2, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"),
            (7, Code.OK, ""),
            (5, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"),
            (7, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"),
            (9, Code.INVALID_ARGUMENT, "StreamID is no longer active"),
            (13, Code.OK, ""),
        ]
    )


def test_bad_envelope_and_bad_payload(tmp_path) -> None:
    impl = Echo()

    def send(raw: RawConn) -> int:
        raw.send(1, frames.MessageType.REQUEST, b"\x0a\xff")  # truncated string field
        raw.request(3, AA, "GetEvidence", b"\x0a\x10short")  # RuntimeData cut short
        raw.request(5, AA, "GetEvidence", b"\x0a\x02ok")
        return 3

    answers = call_status(tmp_path, impl, send)
    assert answers[0][:2] == (1, Code.INVALID_ARGUMENT)
    assert answers[0][2].startswith("unmarshal request error: ")
    assert answers[1][:2] == (3, Code.INTERNAL)
    assert answers[1][2].startswith("ttrpc: error unmarshalling payload: ")
    assert answers[2] == (5, Code.OK, "")
    assert impl.calls == 1


def test_handler_errors_map_to_status_and_the_server_keeps_serving(tmp_path, caplog) -> None:
    class Failing(Echo):
        async def GetToken(self, request, ctx):
            if request.TokenType == "kbs":
                raise RpcError(Code.PERMISSION_DENIED, "policy says no")
            raise ValueError(f"unknown token type {request.TokenType!r}")

        def GetTeeType(self, request, ctx):
            return aa.GetEvidenceResponse()  # the wrong reply type

    async def main():
        async with connected(tmp_path, {ATTESTATION_AGENT: Failing()}) as client:
            stub = Stub(client, ATTESTATION_AGENT)
            errors = []
            for call in (
                stub.GetToken(aa.GetTokenRequest(TokenType="kbs")),
                stub.GetToken(aa.GetTokenRequest(TokenType="x")),
                stub.GetTeeType(),
            ):
                with pytest.raises(RpcError) as err:
                    await call
                errors.append((err.value.code, err.value.message))
            evidence = await stub.GetEvidence(aa.GetEvidenceRequest(RuntimeData=b"still here"))
            return errors, evidence.Evidence

    errors, evidence = arun(main())
    assert errors[0] == (Code.PERMISSION_DENIED, "policy says no")
    assert errors[1] == (Code.UNKNOWN, "unknown token type 'x'")
    assert errors[2][0] == Code.INTERNAL
    assert "GetEvidenceResponse" in errors[2][1] and "GetTeeTypeResponse" in errors[2][1]
    assert evidence == b"still here"
    assert "unknown token type" in caplog.text  # the unexpected exception is logged


def test_many_calls_in_flight_answered_out_of_order(tmp_path) -> None:
    n = 24
    finished: list[int] = []

    class Gate(Echo):
        def __init__(self) -> None:
            super().__init__()
            self.arrived = 0
            self.all_in = asyncio.Event()
            self.release = {i: asyncio.Event() for i in range(n)}

        async def GetEvidence(self, request, ctx):
            i = int(request.RuntimeData)
            self.arrived += 1
            if self.arrived == n:
                self.all_in.set()
            await self.release[i].wait()
            finished.append(i)
            return aa.GetEvidenceResponse(Evidence=b"evidence-%d" % i)

    async def main():
        gate = Gate()
        async with connected(tmp_path, {ATTESTATION_AGENT: gate}) as client:
            stub = Stub(client, ATTESTATION_AGENT)
            calls = [
                asyncio.create_task(stub.GetEvidence(aa.GetEvidenceRequest(RuntimeData=b"%d" % i)))
                for i in range(n)
            ]
            await gate.all_in.wait()  # every call is in the server at the same time
            for i in reversed(range(n)):
                gate.release[i].set()
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            return [(await c).Evidence for c in calls]

    replies = arun(main())
    assert replies == [b"evidence-%d" % i for i in range(n)]
    assert finished == list(reversed(range(n)))


def test_deadline_stops_the_handler(tmp_path) -> None:
    stopped = []

    class Slow(Echo):
        async def GetEvidence(self, request, ctx):
            try:
                await asyncio.Event().wait()
            finally:
                stopped.append(ctx.timeout)

    def send(raw: RawConn) -> int:
        raw.request(1, AA, "GetEvidence", timeout_nano=200_000_000)
        return 1

    assert call_status(tmp_path, Slow(), send) == [
        (1, Code.DEADLINE_EXCEEDED, "context deadline exceeded")
    ]
    assert stopped == [0.2]


def test_client_deadline(tmp_path) -> None:
    class Slow(Echo):
        async def GetEvidence(self, request, ctx):
            await asyncio.Event().wait()

    async def main():
        async with connected(tmp_path, {ATTESTATION_AGENT: Slow()}) as client:
            with pytest.raises(RpcError) as err:
                await Stub(client, ATTESTATION_AGENT).GetEvidence(timeout=0.2)
            return err.value.code

    assert arun(main()) == Code.DEADLINE_EXCEEDED


def test_oversized_frame_is_skipped_and_answered_on_its_stream(tmp_path) -> None:
    def send(raw: RawConn) -> int:
        raw.send(1, frames.MessageType.REQUEST, bytes(frames.MAX_MESSAGE + 1))
        raw.request(3, AA, "GetTeeType")  # the connection goes on
        return 2

    assert call_status(tmp_path, Echo(), send) == [
        (
            1,
            Code.RESOURCE_EXHAUSTED,
            "message length 4194305 exceed maximum message size of 4194304",
        ),
        (3, Code.OK, ""),
    ]


def test_a_request_of_exactly_4_mib_is_served(tmp_path) -> None:
    def request_of(size: int) -> bytes:
        from coco.rpc.protos import ttrpc_pb2

        data = bytes(size)
        body = ttrpc_pb2.Request(
            service=AA,
            method="GetEvidence",
            payload=aa.GetEvidenceRequest(RuntimeData=data).SerializeToString(),
        ).SerializeToString()
        return body

    n = frames.MAX_MESSAGE - 100
    while len(request_of(n)) < frames.MAX_MESSAGE:
        n += 1
    body = request_of(n)
    assert len(body) == frames.MAX_MESSAGE

    async def main():
        async with serving(tmp_path, {ATTESTATION_AGENT: Echo()}) as address:
            raw = await RawConn.open(address.removeprefix("unix://"))
            raw.send(1, frames.MessageType.REQUEST, body)
            sid, resp = await raw.response()
            await raw.close()
            return sid, resp

    sid, resp = arun(main())
    assert sid == 1 and not resp.HasField("status")
    assert aa.GetEvidenceResponse.FromString(resp.payload).Evidence == bytes(n)


def test_oversized_reply_is_refused_with_resource_exhausted(tmp_path) -> None:
    class Big(Echo):
        def GetEvidence(self, request, ctx):
            return aa.GetEvidenceResponse(Evidence=bytes(frames.MAX_MESSAGE))

    async def main():
        async with connected(tmp_path, {ATTESTATION_AGENT: Big()}) as client:
            stub = Stub(client, ATTESTATION_AGENT)
            with pytest.raises(RpcError) as err:
                await stub.GetEvidence()
            return err.value, (await stub.GetTeeType()).tee

    err, tee = arun(main())
    assert err.code == Code.RESOURCE_EXHAUSTED
    assert err.message.startswith("message length 41943") and err.message.endswith("of 4194304")
    assert tee == "sample"


def test_client_refuses_to_send_an_oversized_request(tmp_path) -> None:
    impl = Echo()

    async def main():
        async with connected(tmp_path, {ATTESTATION_AGENT: impl}) as client:
            stub = Stub(client, ATTESTATION_AGENT)
            with pytest.raises(frames.OversizedMessageError) as err:
                await stub.GetEvidence(aa.GetEvidenceRequest(RuntimeData=bytes(4 << 20)))
            ok = await stub.GetEvidence(aa.GetEvidenceRequest(RuntimeData=b"small"))
            return err.value, ok.Evidence, client._next_id

    err, evidence, next_id = arun(main())
    assert err.code == Code.RESOURCE_EXHAUSTED and "exceed maximum message size of 4194304" in str(
        err
    )
    assert evidence == b"small" and impl.calls == 1
    assert next_id == 3  # the refused call took no stream id


def test_a_broken_connection_does_not_disturb_others(tmp_path) -> None:
    async def main():
        async with serving(tmp_path, {ATTESTATION_AGENT: Echo()}) as address:
            path = address.removeprefix("unix://")
            async with await Client.connect(address) as good:
                stub = Stub(good, ATTESTATION_AGENT)
                assert (await stub.GetTeeType()).tee == "sample"
                bad = await RawConn.open(path)
                # a header promising 100 bytes, 10 of them, then the end of the stream
                bad.writer.write(frames.HEADER.pack(100, 1, 1, 0) + b"0123456789")
                bad.writer.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
                closed_by_server = await bad.reader.read() == b""
                await bad.close()
                garbage = await RawConn.open(path)
                garbage.writer.write(b"\x00" * 7)
                await garbage.close()
                return closed_by_server, (await stub.GetTeeType()).tee

    closed, tee = arun(main())
    assert closed
    assert tee == "sample"


def test_closed_connection_fails_every_pending_call_at_once(tmp_path) -> None:
    async def main():
        got = asyncio.Event()
        count = 0

        async def swallow(reader, writer):
            nonlocal count
            for _ in range(5):
                length = frames.decode_header(await reader.readexactly(10))[0]
                await reader.readexactly(length)
                count += 1
            got.set()
            writer.close()

        server = await asyncio.start_unix_server(swallow, path=str(tmp_path / "s.sock"))
        async with server:
            client = await Client.connect(f"unix://{tmp_path}/s.sock")
            stub = Stub(client, GET_RESOURCE)
            calls = [asyncio.create_task(stub.GetResource()) for _ in range(5)]
            await got.wait()
            results = await asyncio.gather(*calls, return_exceptions=True)
            with pytest.raises(UnavailableError):
                await stub.GetResource()
            await client.close()
            return results

    results = arun(main())
    assert all(isinstance(r, UnavailableError) for r in results), results
    assert all(r.code == Code.UNAVAILABLE and "closed by the server" in r.message for r in results)


def test_metadata_reaches_the_handler(tmp_path) -> None:
    seen = {}

    class Meta(Echo):
        def GetTeeType(self, request, ctx):
            seen.update(ctx.metadata)
            return aa.GetTeeTypeResponse(tee="sample")

    async def main():
        async with connected(tmp_path, {ATTESTATION_AGENT: Meta()}) as client:
            await Stub(client, ATTESTATION_AGENT).GetTeeType(
                metadata={"containerd-namespace-ttrpc": "k8s.io", "multi": ["a", "b"]}
            )

    arun(main())
    assert seen == {"containerd-namespace-ttrpc": ["k8s.io"], "multi": ["a", "b"]}


def test_inflight_cap_applies_back_pressure(tmp_path) -> None:
    class Capped(Echo):
        def __init__(self) -> None:
            super().__init__()
            self.active = self.peak = 0
            self.arrivals: asyncio.Queue[asyncio.Event] = asyncio.Queue()

        async def GetEvidence(self, request, ctx):
            self.active += 1
            self.peak = max(self.peak, self.active)
            release = asyncio.Event()
            await self.arrivals.put(release)
            await release.wait()
            self.active -= 1
            return aa.GetEvidenceResponse(Evidence=request.RuntimeData)

    async def main():

        impl = Capped()
        server = Server(max_inflight=2)
        server.register(ATTESTATION_AGENT, impl)
        address = await server.listen(f"unix://{tmp_path}/capped.sock")
        try:
            async with await Client.connect(address) as client:
                stub = Stub(client, ATTESTATION_AGENT)
                calls = [
                    asyncio.create_task(
                        stub.GetEvidence(aa.GetEvidenceRequest(RuntimeData=b"%d" % i))
                    )
                    for i in range(6)
                ]
                for _ in range(6):
                    release = await impl.arrivals.get()
                    await asyncio.sleep(0.01)  # room for more arrivals, were there no cap
                    release.set()
                replies = [(await c).Evidence for c in calls]
        finally:
            await server.stop()
        return impl.peak, replies

    peak, replies = arun(main())
    assert peak == 2
    assert replies == [b"%d" % i for i in range(6)]


def test_stop_lets_calls_in_flight_finish_then_refuses_new_ones(tmp_path) -> None:
    class Slowish(Echo):
        def __init__(self) -> None:
            super().__init__()
            self.entered = asyncio.Event()
            self.go_on = asyncio.Event()

        async def GetEvidence(self, request, ctx):
            self.entered.set()
            await self.go_on.wait()
            return aa.GetEvidenceResponse(Evidence=b"finished")

    async def main():

        impl = Slowish()
        server = Server()
        server.register(ATTESTATION_AGENT, impl)
        address = await server.listen(f"unix://{tmp_path}/aa.sock")
        client = await Client.connect(address)
        call = asyncio.create_task(Stub(client, ATTESTATION_AGENT).GetEvidence())
        await impl.entered.wait()
        stopping = asyncio.create_task(server.stop(grace=30))
        await asyncio.sleep(0)
        impl.go_on.set()
        reply = await call
        await stopping
        await client.close()
        with pytest.raises(UnavailableError):
            await Client.connect(address)
        return reply.Evidence

    assert arun(main()) == b"finished"
    assert not (tmp_path / "aa.sock").exists()


def test_stop_cancels_what_outlives_the_grace(tmp_path) -> None:
    cancelled = []

    class Stuck(Echo):
        async def GetEvidence(self, request, ctx):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

    async def main():

        server = Server()
        server.register(ATTESTATION_AGENT, Stuck())
        address = await server.listen(f"unix://{tmp_path}/aa.sock")
        async with await Client.connect(address) as client:
            call = asyncio.create_task(Stub(client, ATTESTATION_AGENT).GetEvidence())
            while not server._connections or not next(iter(server._connections)).tasks:
                await asyncio.sleep(0.01)
            await server.stop(grace=0.1)
            with pytest.raises(UnavailableError) as err:
                await call
            return err.value.message

    message = arun(main())
    assert cancelled == [True]
    assert "closed by the server" in message
