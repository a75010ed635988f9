"""The ``provider.<name>`` key wrapper: the ocicrypt keyprovider protocol, over a command or gRPC.

The request is a JSON document (``KeyProviderKeyWrapProtocolInput``): ``op`` is ``keywrap`` or
``keyunwrap``; wrapping sends the provider's parameters and the private options (``optsdata``),
unwrapping sends its decryption parameters and the annotation it once returned. Byte strings
travel as standard base64; answers may also use JSON arrays of byte values (ocicrypt-rs, CDH).

- ``cmd``: the program reads the request on stdin and writes the answer on stdout.
- ``grpc``: ``keyprovider.KeyProviderService/WrapKey`` and ``/UnWrapKey``; both messages are one
  ``bytes`` field (number 1) holding the JSON, encoded here by hand (no generated code needed).
- ``ttrpc`` (ocicrypt-rs): the same service over ttRPC (``unix:///run/confidential-containers/
  cdh.sock``), what the Confidential Data Hub serves, through :mod:`coco.rpc`'s client.
- ``native`` (ocicrypt-rs): a provider in this process. A higher floor that holds one (the
  Confidential Data Hub) makes it known with :func:`register_native`; ``handler`` does the same
  for one :class:`KeyProvider` object. Either way the request and the answer are the same JSON
  documents as on the wire.
"""

from __future__ import annotations

import base64
import binascii
import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from coco.errors import CocoError, OcicryptError
from coco.ocicrypt.keywrap import KeyUnwrapError

SCHEME_PREFIX = "provider."
SERVICE = "/keyprovider.KeyProviderService/"
TIMEOUT = 50.0

Handler = Callable[[str, bytes], bytes]
"""An in-process provider: (method ``WrapKey``/``UnWrapKey``, request JSON) -> answer JSON."""

_NATIVE: dict[str, Handler] = {}


def register_native(name: str, handler: Handler | None) -> None:
    """Make ``{"native": name}`` providers call ``handler`` (None: forget it)."""
    if handler is None:
        _NATIVE.pop(name, None)
    else:
        _NATIVE[name] = handler


@dataclass(frozen=True, slots=True)
class GrpcTls:
    """``grpc-tls`` settings of a provider (server verified unless insecure-skip-verify)."""

    root_ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""


@dataclass(frozen=True, slots=True)
class KeyProvider:
    """One entry of ``key-providers`` in ocicrypt_config.json."""

    name: str
    cmd_path: str = ""
    cmd_args: tuple[str, ...] = ()
    grpc: str = ""
    grpc_tls: GrpcTls | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    handler: Handler | None = field(default=None, compare=False)

    @property
    def scheme(self) -> str:
        return SCHEME_PREFIX + self.name

    @property
    def usable(self) -> bool:
        return bool(
            self.cmd_path
            or self.grpc
            or self.handler
            or self.extra.get("ttrpc")
            or self.extra.get("native")
        )

    # --- the two operations --------------------------------------------------------------------

    def wrap(self, params: Sequence[bytes], optsdata: bytes) -> bytes:
        """Ask the provider to wrap ``optsdata``; return the annotation bytes it produced."""
        request = {
            "op": "keywrap",
            "keywrapparams": {
                "ec": {
                    "Parameters": {self.name: [_b64(p) for p in params]},
                    "DecryptConfig": {"Parameters": {}},
                },
                "optsdata": _b64(optsdata),
            },
            "keyunwrapparams": {"dc": None, "annotation": None},
        }
        answer = self._call("WrapKey", request, OcicryptError)
        results = answer.get("keywrapresults")
        if not isinstance(results, dict) or "annotation" not in results:
            raise OcicryptError(f"keyprovider {self.name}: answer has no keywrapresults.annotation")
        return _bytes(results["annotation"], f"keyprovider {self.name}: annotation", OcicryptError)

    def unwrap(self, params: Sequence[bytes], annotation: bytes) -> bytes:
        """Ask the provider to unwrap ``annotation``; return the private options bytes."""
        request = {
            "op": "keyunwrap",
            "keywrapparams": {"ec": None, "optsdata": None},
            "keyunwrapparams": {
                "dc": {"Parameters": {self.name: [_b64(p) for p in params]}},
                "annotation": _b64(annotation),
            },
        }
        answer = self._call("UnWrapKey", request, KeyUnwrapError)
        results = answer.get("keyunwrapresults")
        if not isinstance(results, dict) or "optsdata" not in results:
            raise KeyUnwrapError(
                f"keyprovider {self.name}: answer has no keyunwrapresults.optsdata"
            )
        return _bytes(results["optsdata"], f"keyprovider {self.name}: optsdata", KeyUnwrapError)

    # --- transports ----------------------------------------------------------------------------

    def _call(
        self, method: str, request: dict[str, Any], err: type[OcicryptError]
    ) -> dict[str, Any]:
        payload = json.dumps(request, separators=(",", ":")).encode()
        if self.handler is not None:
            raw = self._run_handler(self.handler, method, payload, err)
        elif self.cmd_path:
            raw = self._run_cmd(payload, err)
        elif self.grpc:
            raw = self._run_grpc(method, payload, err)
        elif self.extra.get("ttrpc"):
            raw = self._run_ttrpc(method, payload, err)
        elif self.extra.get("native"):
            native = self.extra["native"]
            handler = _NATIVE.get(native) if isinstance(native, str) else None
            if handler is None:
                raise err(
                    f"keyprovider {self.name}: native provider {native!r} is not available in "
                    "this process (it lives in the Confidential Data Hub: use its socket through "
                    "the 'ttrpc' form)"
                )
            raw = self._run_handler(handler, method, payload, err)
        else:
            raise err(f"keyprovider {self.name}: neither 'cmd' nor 'grpc' configured")
        try:
            answer = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            head = raw[:60].decode("utf-8", "replace")
            raise err(f"keyprovider {self.name}: answer is not JSON: {head!r}") from None
        if not isinstance(answer, dict):
            raise err(f"keyprovider {self.name}: answer is not a JSON object")
        return answer

    def _run_handler(
        self, handler: Handler, method: str, payload: bytes, err: type[OcicryptError]
    ) -> bytes:
        try:
            return handler(method, payload)
        except OcicryptError:
            raise
        except CocoError as e:
            raise err(f"keyprovider {self.name}: {method}: {e}") from None

    def _run_cmd(self, payload: bytes, err: type[OcicryptError]) -> bytes:
        try:
            proc = subprocess.run(
                [self.cmd_path, *self.cmd_args],
                input=payload,
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
        except FileNotFoundError:
            raise err(f"keyprovider {self.name}: command {self.cmd_path!r} not found") from None
        except PermissionError:
            raise err(
                f"keyprovider {self.name}: command {self.cmd_path!r} not executable"
            ) from None
        except subprocess.TimeoutExpired:
            raise err(f"keyprovider {self.name}: command timed out after {TIMEOUT:.0f} s") from None
        if proc.returncode != 0:
            msg = " ".join(proc.stderr.decode("utf-8", "replace").split())[:200]
            raise err(
                f"keyprovider {self.name}: command {self.cmd_path!r} exited with "
                f"{proc.returncode}: {msg or '(no message)'}"
            )
        return proc.stdout

    def _run_grpc(self, method: str, payload: bytes, err: type[OcicryptError]) -> bytes:
        import grpc  # imported lazily: only gRPC providers need it

        target = self.grpc
        for prefix in ("http://", "tcp://"):
            target = target.removeprefix(prefix)
        if self.grpc_tls is not None:
            t = self.grpc_tls
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(t.root_ca_file, err) if t.root_ca_file else None,
                private_key=_read(t.key_file, err) if t.key_file else None,
                certificate_chain=_read(t.cert_file, err) if t.cert_file else None,
            )
            options = [("grpc.ssl_target_name_override", t.server_name)] if t.server_name else []
            channel = grpc.secure_channel(target, creds, options=options)
        else:
            channel = grpc.insecure_channel(target)
        try:
            call = channel.unary_unary(
                SERVICE + method,
                request_serializer=_pb_encode,
                response_deserializer=_pb_decode,
            )
            return call(payload, timeout=TIMEOUT)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            details = e.details() if hasattr(e, "details") else str(e)
            raise err(
                f"keyprovider {self.name}: gRPC {method} at {self.grpc}: {code}: {details}"
            ) from None
        except ValueError as e:
            raise err(f"keyprovider {self.name}: gRPC answer: {e}") from None
        finally:
            channel.close()

    def _run_ttrpc(self, method: str, payload: bytes, err: type[OcicryptError]) -> bytes:
        from coco.rpc import Stub, SyncClient  # only ttrpc providers need it
        from coco.rpc.protos import keyprovider_pb2 as pb
        from coco.rpc.services import KEY_PROVIDER

        address = self.extra["ttrpc"]
        where = f"keyprovider {self.name}: ttRPC {method} at {address}"
        if not isinstance(address, str):
            raise err(f"{where}: expected a unix:///path address")
        try:
            with SyncClient(address) as client:
                reply = getattr(Stub(client, KEY_PROVIDER, timeout=TIMEOUT), method)(
                    pb.KeyProviderKeyWrapProtocolInput(KeyProviderKeyWrapProtocolInput=payload)
                )
        except CocoError as e:
            raise err(f"{where}: {e}") from None
        except OSError as e:
            raise err(f"{where}: cannot connect: {e.strerror or e}") from None
        return bytes(reply.KeyProviderKeyWrapProtocolOutput)


def _read(path: str, err: type[OcicryptError]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise err(f"keyprovider grpc-tls: cannot read {path}: {e.strerror}") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bytes(value: object, where: str, err: type[OcicryptError]) -> bytes:
    """Go ``[]byte`` in JSON: a base64 string, or (ocicrypt-rs) an array of byte values."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise err(f"{where}: not valid base64") from None
    if isinstance(value, list) and all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in value
    ):
        return bytes(value)
    raise err(f"{where}: expected a base64 string or an array of bytes")


# --- the one-field protobuf messages -----------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(0x80 | b)
        else:
            out.append(b)
            return bytes(out)


def _pb_encode(payload: bytes) -> bytes:
    """``message { bytes field = 1; }``"""
    if not payload:
        return b""
    return b"\x0a" + _varint(len(payload)) + payload


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in protobuf message")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long in protobuf message")


def _pb_decode(buf: bytes) -> bytes:
    """Field 1 (bytes) of a protobuf message; unknown fields are skipped."""
    pos, found = 0, b""
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field in protobuf message")
            if num == 1:
                found = buf[pos : pos + n]
            pos += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
    return found
