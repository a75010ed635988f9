"""The synchronous client (for the CLI) against a server running in another thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from coco.rpc import Code, RpcError, Server, Stub, SyncClient, UnavailableError
from coco.rpc.protos import attestation_agent_pb2 as aa
from coco.rpc.services import ATTESTATION_AGENT


class Tee:
    def GetTeeType(self, request, ctx):
        return aa.GetTeeTypeResponse(tee="sample")

    def GetToken(self, request, ctx):
        raise RpcError(Code.INTERNAL, "[ERROR:attestation-agent] AA-KBC get token failed")


class ServerThread:
    """A coco.rpc server on its own loop in a thread; ``stop()`` ends both."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = Server()
        self.server.register(ATTESTATION_AGENT, Tee())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.address = asyncio.run_coroutine_threadsafe(
            self.server.listen(address), self.loop
        ).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=1), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_sync_client(tmp_path) -> None:
    server = ServerThread(f"unix://{tmp_path}/aa.sock")
    try:
        with SyncClient(server.address) as client:
            stub = Stub(client, ATTESTATION_AGENT, timeout=50)
            assert stub.GetTeeType().tee == "sample"
            with pytest.raises(RpcError) as err:
                stub.GetToken(aa.GetTokenRequest(TokenType="kbs"))
            assert err.value.code == Code.INTERNAL
            assert str(err.value) == "INTERNAL: [ERROR:attestation-agent] AA-KBC get token failed"
            server.stop()
            with pytest.raises(UnavailableError, match=f"unix://{tmp_path}/aa.sock"):
                stub.GetTeeType()
    finally:
        if server.thread.is_alive():
            server.stop()


def test_sync_client_cannot_connect(tmp_path) -> None:
    with pytest.raises(UnavailableError, match=f"cannot connect to unix://{tmp_path}/none.sock"):
        SyncClient(f"unix://{tmp_path}/none.sock")
