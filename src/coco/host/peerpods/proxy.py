"""The per-sandbox agent proxy: the shim's agent ttRPC socket, relayed to the VM's forwarder.

The shim dials ``<pods-dir>/<sandbox>/agent.ttrpc`` as if the agent were there; each call is
re-issued over one TCP connection (mutual TLS unless disabled) to the forwarder at
``<vm-ip>:15150``, which passes it to the agent. The connection is made again when it breaks.
:meth:`AgentProxy.wait_ready` dials with backoff (at most 5 s between tries) until the forwarder
answers or the proxy timeout passes: that is when StartVM returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from pathlib import Path

from coco.host.peerpods.provider import PeerPodError
from coco.rpc import services
from coco.rpc.client import Client
from coco.rpc.protos import health_pb2
from coco.rpc.relay import relay_handlers
from coco.rpc.server import Server
from coco.rpc.status import Code, RpcError, UnavailableError

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.ttrpc"
DIAL_TRY = 2.0  # seconds for one connection + TLS handshake while waiting for the VM
MAX_BACKOFF = 1.0  # a try is one TCP connect: cheap next to the seconds a late retry costs


class AgentProxy:
    def __init__(
        self,
        socket_path: Path,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str,
    ) -> None:
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self._server: Server | None = None
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen on the sandbox's agent socket (a stale socket there is replaced)."""
        server = Server()
        server.register(services.AGENT, relay_handlers(services.AGENT, self._upstream))
        server.register(services.HEALTH, relay_handlers(services.HEALTH, self._upstream))
        await server.listen(f"unix://{self.socket_path}")
        self._server = server

    async def _dial(self, timeout: float) -> Client:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.server_hostname if self.ssl_context else None,
                ),
                timeout=timeout,
            )
        except ssl.SSLError as e:
            raise UnavailableError(
                f"agent proxy: TLS with the forwarder at {self.target} failed: {e.reason or e}"
            ) from None
        except (OSError, TimeoutError) as e:
            raise UnavailableError(
                f"agent proxy: cannot reach the forwarder at {self.target}: "
                f"{getattr(e, 'strerror', None) or e or 'timed out'}"
            ) from None
        return Client(reader, writer, address=f"tcp://{self.target}")

    async def _upstream(self, timeout: float = 10.0) -> Client:
        async with self._lock:
            if self._client is None or self._client._closed is not None:
                if self._client is not None:
                    with contextlib.suppress(Exception):
                        await self._client.close()
                self._client = await self._dial(timeout)
            return self._client

    async def _drop(self) -> None:
        async with self._lock:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    await self._client.close()
                self._client = None

    async def wait_ready(self, timeout: float) -> None:
        """Dial until the forwarder answers a health check; :class:`PeerPodError` after
        ``timeout`` seconds with the last reason."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            try:
                # a VM still booting may take the connection (user networking does) and never
                # answer it: give each try a short handshake, then try again
                client = await self._upstream(timeout=DIAL_TRY)
                await client.call(
                    services.HEALTH.name,
                    "Check",
                    health_pb2.CheckRequest(),
                    health_pb2.HealthCheckResponse,
                    timeout=DIAL_TRY * 2,
                )
                return
            except RpcError as e:
                if e.code not in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED):
                    log.debug("agent proxy %s: health check answered %s", self.target, e)
                    return  # the agent answered: the path through the VM works
                reason = e.message.removeprefix("agent proxy: ")
                await self._drop()
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerPodError(
                    f"agent proxy: the forwarder at {self.target} did not answer within "
                    f"{timeout:g} s: {reason}"
                )
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, MAX_BACKOFF)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None
        if self._client is not None:
            await self._client.close()
            self._client = None
