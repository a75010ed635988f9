"""``coco api-server serve``: upstream's api-server-rest, the guest's REST face of the AA and the CDH.

Workloads in the pod reach the guest components over plain HTTP on loopback (default
``127.0.0.1:8006``); every answer comes from a ttRPC call to the Attestation Agent or the
Confidential Data Hub (50 s timeout, one cached connection per peer that is re-dialled when the
peer went away). The routes, statuses, content types and texts are upstream's:

=========================================  =============================================  ========
``GET /info``                              ``{"version","tee","additional_tees","feature"}``  JSON
``GET /aa/token?token_type=kbs``           the AA's ``GetToken`` bytes                        octets
``GET /aa/evidence?runtime_data=..``       ``GetEvidence``; ``&encoding=base64``: URL-safe    octets
``GET /aa/additional-evidence?..``         ``GetAdditionalEvidence`` (same parameters)        octets
``POST /aa/aael`` ``{"domain","operation","content"}``  ``{"success":"true"}`` or why not     JSON
``GET /cdh/resource/<repo>/<type>/<tag>``  ``GetResource("kbs:///<repo>/<type>/<tag>")``      octets
=========================================  =============================================  ========

A peer that is not on loopback gets 403 ``Forbidden`` whatever it asks (so binding 0.0.0.0 does
not open the secrets to the network); a missing parameter or a bad ``encoding`` 400 ``BAD
REQUEST``; an unknown path, or a wrong method under ``/aa``, 404 ``URL NOT FOUND``; a non-GET
``/info`` 405 ``Method Not Allowed``; a feature that is off 404 ``Attestation Feature Not
Enabled`` / ``Resource Feature Not Enabled``; a failed call 500 with the error's text.

Where this differs from upstream, on purpose: a 500's text carries the peer's error after
upstream's prefix (upstream sends only ``ttrpc request error``); the AA and the CDH are dialled
when first needed, so the server starts before them (upstream refuses to start without them);
an IPv4-mapped loopback peer (``::ffff:127.0.0.1``, on a dual-stack bind) counts as loopback.

HTTP/1.1 with keep-alive through ``h11``; headers are limited to 16 KiB and a request body to
1 MiB (413), idle connections close after 30 s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
from google.protobuf.message import Message

from coco import jsonio
from coco.errors import CocoError
from coco.rpc import Client, Service, UnavailableError
from coco.rpc.services import AA_SOCKET, ATTESTATION_AGENT, CDH_SOCKET, GET_RESOURCE

log = logging.getLogger(__name__)

DEFAULT_BIND = "127.0.0.1:8006"
FEATURES = ("resource", "attestation", "all")
DEFAULT_FEATURES = "resource"
TTRPC_TIMEOUT = 50.0
MAX_HEADERS = 16 * 1024
MAX_BODY = 1024 * 1024
IDLE_TIMEOUT = 30.0

OCTETS = "application/octet-stream"
JSON = "application/json"
# ExtendRuntimeMeasurement's Result -> upstream's answer text (byte for byte, spaces included)
AAEL_ANSWERS = {
    0: b'{"success":"true"}',
    1: b'{"success":"false","message": "The platform does not support runtime measurement"}',
    2: b'{"success":"false","message": "Attestation Agent does not enable eventlog recording"}',
}
AAEL_UNKNOWN = b'{"success":"false","message": "Unknown runtime measurement result"}'
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class ApiServerError(CocoError):
    """The REST API server could not start, or a call behind a route failed."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str | None = None


FORBIDDEN = Reply(403, b"Forbidden")
NOT_FOUND = Reply(404, b"URL NOT FOUND")
BAD_REQUEST = Reply(400, b"BAD REQUEST")
NOT_ALLOWED = Reply(405, b"Method Not Allowed")


class CachedClient:
    """One ttRPC connection to ``address``, dialled on first use and again after it ended.

    A call on a connection the peer closed is sent again on a fresh one (upstream's retry after
    ``LocalClosed``); a call that was lost on the way is retried only when ``idempotent``.
    """

    def __init__(self, address: str, name: str, *, timeout: float = TTRPC_TIMEOUT) -> None:
        self.address = address
        self.name = name
        self.timeout = timeout
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> Client:
        async with self._lock:
            if self._client is not None and self._client.closed:
                await self._drop()
            if self._client is None:
                try:
                    self._client = await Client.connect(self.address)
                except CocoError as e:
                    raise ApiServerError(
                        f"ttrpc connect to {self.name} addr: {self.address} failed: {e}"
                    ) from None
            return self._client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def call(
        self, service: Service, method: str, request: Message, *, idempotent: bool = True
    ) -> Any:
        spec = service.methods[method]
        for attempt in (1, 2):
            await asyncio.sleep(0)  # let a pending end of the connection be seen first
            client = await self._connected()
            try:
                return await client.call(
                    service.name, method, request, spec.response, timeout=self.timeout
                )
            except UnavailableError as e:
                async with self._lock:
                    if self._client is client:
                        await self._drop()
                if attempt == 2 or not idempotent:
                    raise ApiServerError(f"ttrpc request error: {e}") from None
                log.info("%s at %s: %s; dialling again", self.name, self.address, e)
            except CocoError as e:
                raise ApiServerError(f"ttrpc request error: {e}") from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


def decode_runtime_data(value: str, encoding: str | None) -> bytes | None:
    """``runtime_data`` as bytes: its UTF-8 without ``encoding``, URL-safe unpadded base64 with
    ``encoding=base64``; None when that does not decode or the encoding is another."""
    if encoding is None:
        return value.encode()
    if encoding != "base64" or not _B64URL.fullmatch(value) or len(value) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None
    # canonical only, as Rust's base64 decoder: no stray bits in the last character
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode() != value:
        return None
    return data


def split_nth_slash(path: str, n: int) -> tuple[str, str] | None:
    """``path`` cut before its ``n``-th ``/``: ``("/cdh", "/resource/a/b/c")`` for n=2."""
    if n < 1:
        return None
    pos = -1
    for _ in range(n):
        pos = path.find("/", pos + 1)
        if pos < 0:
            return None
    return path[:pos], path[pos:]


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class Router:
    """Upstream's routing, over the AA and CDH clients the features enabled (None: off)."""

    def __init__(
        self, feature: str, aa: CachedClient | None, cdh: CachedClient | None, version: str
    ) -> None:
        self.feature = feature
        self.aa = aa
        self.cdh = cdh
        self.version = version

    async def route(self, peer: str, method: str, target: str, body: bytes) -> Reply:
        if not is_loopback(peer):
            return FORBIDDEN
        if target.startswith(("http://", "https://")):  # absolute form
            parts = urlsplit(target)
            path, query = parts.path or "/", parts.query
        else:
            path, _, query = target.partition("?")
        params = dict(parse_qsl(query, keep_blank_values=True))
        try:
            return await self._route(method, path, params, body)
        except ApiServerError as e:
            log.info("%s %s: %s", method, path, e)
            return Reply(500, str(e).encode())

    async def _route(self, method: str, path: str, params: dict[str, str], body: bytes) -> Reply:
        if path == "/info":
            if method != "GET":
                return NOT_ALLOWED
            return await self._info()
        split = split_nth_slash(path, 2)
        if split is None:
            return NOT_FOUND
        root, rest = split
        if root == "/aa":
            if self.aa is None:
                return Reply(404, b"Attestation Feature Not Enabled")
            return await self._aa(self.aa, method, rest, params, body)
        if root == "/cdh":
            if self.cdh is None:
                return Reply(404, b"Resource Feature Not Enabled")
            api = split_nth_slash(rest, 2)
            if api is None or api[0] != "/resource":
                return NOT_FOUND
            from coco.rpc.protos import confidential_data_hub_pb2 as cpb

            req = cpb.GetResourceRequest(ResourcePath="kbs://" + api[1])
            res = await self.cdh.call(GET_RESOURCE, "GetResource", req)
            return Reply(200, res.Resource, OCTETS)
        return NOT_FOUND

    async def _info(self) -> Reply:
        doc: dict[str, Any] = {"version": self.version}
        if self.aa is not None:
            from coco.rpc.protos import attestation_agent_pb2 as apb

            tee = await self.aa.call(ATTESTATION_AGENT, "GetTeeType", apb.GetTeeTypeRequest())
            more = await self.aa.call(
                ATTESTATION_AGENT, "GetAdditionalTees", apb.GetAdditionalTeesRequest()
            )
            doc["tee"] = tee.tee
            if more.additional_tees:
                doc["additional_tees"] = list(more.additional_tees)
        doc["feature"] = self.feature
        return Reply(200, json.dumps(doc, separators=(",", ":")).encode(), JSON)

    async def _aa(
        self, aa: CachedClient, method: str, api: str, params: dict[str, str], body: bytes
    ) -> Reply:
        from coco.rpc.protos import attestation_agent_pb2 as apb

        if (api, method) == ("/token", "GET"):
            if "token_type" not in params:
                return BAD_REQUEST
            res = await aa.call(
                ATTESTATION_AGENT, "GetToken", apb.GetTokenRequest(TokenType=params["token_type"])
            )
            return Reply(200, res.Token, OCTETS)
        if (api, method) in (("/evidence", "GET"), ("/additional-evidence", "GET")):
            if "runtime_data" not in params:
                return BAD_REQUEST
            data = decode_runtime_data(params["runtime_data"], params.get("encoding"))
            if data is None:
                return BAD_REQUEST
            if api == "/evidence":
                req: Message = apb.GetEvidenceRequest(RuntimeData=data)
                res = await aa.call(ATTESTATION_AGENT, "GetEvidence", req)
            else:
                req = apb.GetAdditionalEvidenceRequest(RuntimeData=data)
                res = await aa.call(ATTESTATION_AGENT, "GetAdditionalEvidence", req)
            return Reply(200, res.Evidence, OCTETS)
        if (api, method) == ("/aael", "POST"):
            doc = jsonio.loads(body, what="Illegal AAEL eventry format: body", error=ApiServerError)
            fields = ("domain", "operation", "content")
            if not isinstance(doc, dict) or not all(isinstance(doc.get(f), str) for f in fields):
                raise ApiServerError(
                    "Illegal AAEL eventry format: expected a JSON object with string domain, "
                    "operation and content"
                )
            req = apb.ExtendRuntimeMeasurementRequest(
                Domain=doc["domain"], Operation=doc["operation"], Content=doc["content"]
            )
            res = await aa.call(
                ATTESTATION_AGENT, "ExtendRuntimeMeasurement", req, idempotent=False
            )
            return Reply(200, AAEL_ANSWERS.get(res.Result, AAEL_UNKNOWN), JSON)
        return NOT_FOUND


def make_router(
    features: str, *, aa_addr: str = AA_SOCKET, cdh_addr: str = CDH_SOCKET, version: str = ""
) -> Router:
    if features not in FEATURES:
        raise ApiServerError(f"--features {features!r}: expected one of {', '.join(FEATURES)}")
    if not version:
        from coco import __version__ as version
    aa = CachedClient(aa_addr, "AA") if features in ("attestation", "all") else None
    cdh = CachedClient(cdh_addr, "CDH") if features in ("resource", "all") else None
    return Router(features, aa, cdh, version)


# --------------------------------------------------------------------------------- HTTP


def _headers(reply: Reply, keep_alive: bool) -> list[tuple[str, str]]:
    h = [("date", formatdate(usegmt=True)), ("content-length", str(len(reply.body)))]
    if reply.content_type:
        h.append(("content-type", reply.content_type))
    if not keep_alive:
        h.append(("connection", "close"))
    return h


async def _send(
    writer: asyncio.StreamWriter, conn: h11.Connection, reply: Reply, *, close: bool = False
) -> None:
    keep = not close and h11.MUST_CLOSE not in (conn.their_state, conn.our_state)
    reason = HTTPStatus(reply.status).phrase.encode()
    response = h11.Response(status_code=reply.status, headers=_headers(reply, keep), reason=reason)
    data = conn.send(response)
    data += conn.send(h11.Data(data=reply.body)) if reply.body else b""
    data += conn.send(h11.EndOfMessage())
    writer.write(data)
    await writer.drain()


async def _next_event(reader: asyncio.StreamReader, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        async with asyncio.timeout(IDLE_TIMEOUT):
            conn.receive_data(await reader.read(65536))


async def handle_connection(
    router: Router, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Serve one HTTP/1.1 connection until it closes, idles out, or breaks the protocol."""
    peer = writer.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple) else ""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
    try:
        while True:
            event = await _next_event(reader, conn)
            if not isinstance(event, h11.Request):
                break  # ConnectionClosed (or a stray event): done
            target = event.target.decode("latin-1")
            method = event.method.decode("latin-1")
            body = bytearray()
            while True:
                part = await _next_event(reader, conn)
                if isinstance(part, h11.Data):
                    body += part.data
                    if len(body) > MAX_BODY:
                        await _send(writer, conn, Reply(413, b"Payload Too Large"), close=True)
                        return
                elif isinstance(part, h11.EndOfMessage):
                    break
                else:
                    return
            reply = await router.route(host, method, target, bytes(body))
            await _send(writer, conn, reply)
            if conn.our_state is h11.MUST_CLOSE:
                break
            conn.start_next_cycle()
    except h11.RemoteProtocolError as e:
        with contextlib.suppress(Exception):
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = e.error_status_hint
                text = b"BAD REQUEST" if status == 400 else b""
                await _send(writer, conn, Reply(status, text), close=True)
    except (TimeoutError, ConnectionError, h11.LocalProtocolError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def parse_bind(bind: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port)."""
    host, sep, port = bind.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 <= number < 65536:
        raise ApiServerError(
            f"--bind {bind!r}: expected <IP address>:<port>, e.g. 127.0.0.1:8006 or [::1]:8006"
        )
    return host, number


async def serve(router: Router, bind: str, *, ready: Callable[[str], None] | None = None) -> None:
    """Listen on ``bind`` and serve until cancelled."""
    host, port = parse_bind(bind)
    try:
        server = await asyncio.start_server(
            lambda r, w: handle_connection(router, r, w), host, port, reuse_address=True
        )
    except OSError as e:
        raise ApiServerError(f"--bind {bind}: cannot listen: {e.strerror or e}") from None
    sock = server.sockets[0].getsockname()
    address = f"[{sock[0]}]:{sock[1]}" if ":" in sock[0] else f"{sock[0]}:{sock[1]}"
    log.info("API server listening on http://%s with features %s", address, router.feature)
    if ready is not None:
        ready(address)
    try:
        async with server:
            await server.serve_forever()
    finally:
        for client in (router.aa, router.cdh):
            if client is not None:
                await client.close()
