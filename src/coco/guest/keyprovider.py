"""``coco keyprovider``: the ``attestation-agent`` key provider, as upstream's coco_keyprovider.

What ``skopeo copy --encryption-key provider:attestation-agent:<params>`` calls (gRPC
``keyprovider.KeyProviderService``, or this module as an ocicrypt ``cmd`` provider reading the
request on stdin). ``WrapKey`` protects a layer's private options (its key, nonce, digest) under a
key encryption key (KEK) and answers the CoCo AnnotationPacket that ocicrypt stores in the layer's
``org.opencontainers.image.enc.keys.provider.attestation-agent`` annotation::

    {"kid":"kbs:///default/image-key/1","wrapped_data":"<b64>","iv":"<b64>","wrap_type":"A256GCM"}

``<params>`` are ``::``-separated ``key=value`` pairs:

- ``keyid``: the KEK's resource URI in the KBS (``kbs:///repo/type/tag``; also upstream's
  ``kbs://<addr>/repo/type/tag``, ``<addr>/repo/type/tag`` and ``/repo/type/tag``), default
  ``kbs:///default/image-kek/<uuid4>``;
- ``keypath``: a file holding the KEK (32 bytes); without it a fresh random KEK is made;
- ``algorithm``: ``A256GCM`` (default; 12-byte iv) or ``A256CTR`` (16-byte iv, no integrity of
  its own: ocicrypt's layer HMAC still covers the layer);
- ``sample=true``: upstream's well-known sample KEK (INSECURE, for tests), kid
  ``kbs:///default/test-key/1``, never registered.

With ``--kbs`` and an admin credential (``--auth-private-key`` signs upstream's two-hour JWT,
``--admin-token-file`` holds a ready one) the KEK is registered in the KBS under its kid
(``POST /kbs/v0/resource/<repo>/<type>/<tag>``) before the answer goes out.

Where this differs from upstream, on purpose:

- ``algorithm=`` is honoured (upstream reads it from ``keypath``, so it always wraps with
  A256GCM), and A256CTR gets the 16-byte iv it needs (upstream's 12 bytes could never work);
- the KBS's answer to the registration is checked: a KEK the KBS did not store fails
  ``WrapKey``, so skopeo stops and no image is pushed whose key is lost; for the same reason a
  freshly generated KEK without a KBS to register it in is refused (upstream wraps it anyway);
- unknown parameter names, a ``sample`` that is not ``true``/``false``, more than one
  ``attestation-agent`` parameter and a kid that is not a resource URI are refused (upstream
  ignores or mangles them); generated kids are ``kbs:///...`` URIs that the guest accepts;
- one kid, one KEK: skopeo calls ``WrapKey`` once per layer, and upstream makes (and registers)
  a fresh KEK each time, so with ``keyid=`` every layer but the last is wrapped under a key the
  KBS no longer has. The server remembers the KEK it generated for a kid and wraps the other
  layers under it; the ``cmd`` form (one process per layer) cannot, so there a ``keyid=`` without
  ``keypath=`` is refused (a generated kid, one per layer, is fine);
- ``UnWrapKey`` works (upstream: UNIMPLEMENTED) when a KBC is configured: the KEK is fetched by
  kid through the KBC after attestation, and the packet is opened by the Confidential Data
  Hub's own code (:mod:`coco.guest.cdh.annotation_packet`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from coco import jsonio
from coco.errors import CocoError
from coco.guest.cdh import wrap
from coco.guest.cdh.annotation_packet import AnnotationPacket, unwrap_key
from coco.guest.cdh.errors import CdhError
from coco.guest.cdh.kms import LOCAL_KEY_DIR, KmsContext
from coco.protocol.resource_uri import ResourceUri, ResourceUriError

log = logging.getLogger(__name__)

PROVIDER = "attestation-agent"
DEFAULT_SOCKET = "127.0.0.1:50000"
SAMPLE_KEK = bytes(
    [217, 155, 119, 5, 176, 186, 122, 22, 130, 149, 179, 163, 54, 114, 112, 176,
     221, 155, 55, 27, 245, 20, 202, 139, 155, 167, 240, 163, 55, 17, 218, 234]
)  # fmt: skip
SAMPLE_KID = "kbs:///default/test-key/1"
GENERATED_KID_PREFIX = "kbs:///default/image-kek/"
PARAMS = ("sample", "keyid", "keypath", "algorithm")
_KID_FORMS = "kbs:///<repo>/<type>/<tag>, kbs://<addr>/<repo>/<type>/<tag>, <addr>/<repo>/<type>/<tag> or /<repo>/<type>/<tag>"


class KeyProviderError(CocoError):
    """A keyprovider request that cannot be honoured (``bad_input``: the caller's fault)."""

    def __init__(self, message: str, *, bad_input: bool = True) -> None:
        super().__init__(message)
        self.bad_input = bad_input


@dataclass(frozen=True, slots=True)
class WrapParams:
    sample: bool = False
    keyid: str | None = None
    keypath: str | None = None
    algorithm: str = "A256GCM"

    @classmethod
    def parse(cls, text: str) -> WrapParams:
        """``key=value`` pairs separated by ``::`` (see the module doc)."""
        where = f"{PROVIDER} parameters {text!r}"
        values: dict[str, str] = {}
        for field in text.split("::"):
            key, eq, value = field.partition("=")
            if not eq:
                raise KeyProviderError(f"{where}: expected key=value, found {field!r}")
            if key not in PARAMS:
                raise KeyProviderError(
                    f"{where}: unknown parameter {key!r}: expected {', '.join(PARAMS)}"
                )
            if key in values:
                raise KeyProviderError(f"{where}: {key!r} given twice")
            values[key] = value
        sample = values.pop("sample", "false")
        if sample not in ("true", "false"):
            raise KeyProviderError(f"{where}: sample: expected true or false, found {sample!r}")
        algorithm = values.pop("algorithm", "A256GCM")
        if algorithm not in wrap.WRAP_TYPES:
            raise KeyProviderError(
                f"{where}: algorithm: expected {' or '.join(wrap.WRAP_TYPES)}, found {algorithm!r}"
            )
        return cls(sample == "true", values.get("keyid"), values.get("keypath"), algorithm)


def normalize_kid(keyid: str) -> ResourceUri:
    """A kid in any of upstream's forms as a :class:`ResourceUri`."""
    text = keyid if "://" in keyid else "kbs://" + keyid  # <addr>/r/t/g or /r/t/g
    try:
        return ResourceUri.parse(text, f"keyid {keyid!r}")
    except ResourceUriError as e:
        raise KeyProviderError(f"{e} (accepted forms: {_KID_FORMS})") from None


class Registrar(Protocol):
    """Stores a KEK in the KBS under its resource URI, or raises."""

    def register(self, uri: ResourceUri, kek: bytes) -> None: ...


class KbsRegistrar:
    """Registration through the KBS admin API; ``token`` is called for a bearer JWT each time."""

    def __init__(self, url: str, token: Callable[[], str | None], *, verify: str | bool = True):
        self.url = url.rstrip("/")
        self._token = token
        self._verify = verify

    def register(self, uri: ResourceUri, kek: bytes) -> None:
        from coco.protocol.admin import AdminClient

        with AdminClient(self.url, self._token(), verify=self._verify) as admin:
            admin.set_resource(uri.resource_path, kek)
        log.info("registered the KEK of %s in the KBS %s", uri, self.url)


def registrar_from(
    kbs: str, *, private_key_pem: bytes | None = None, token_file: str | None = None,
    verify: str | bool = True, where: str = "--auth-private-key",
) -> KbsRegistrar:  # fmt: skip
    """A registrar signing its own tokens with ``private_key_pem``, or reading ``token_file``."""
    from coco.protocol.admin import admin_token, load_admin_key

    if private_key_pem is not None:
        key = load_admin_key(private_key_pem, where)
        return KbsRegistrar(kbs, lambda: admin_token(key), verify=verify)
    if token_file is not None:
        path = token_file

        def read() -> str:
            try:
                with open(path, encoding="utf-8") as f:
                    return f.read().strip()
            except OSError as e:
                raise KeyProviderError(
                    f"admin token file {path}: cannot read: {e.strerror}", bad_input=False
                ) from None

        return KbsRegistrar(kbs, read, verify=verify)
    return KbsRegistrar(kbs, lambda: None, verify=verify)


def _bytes(value: Any, where: str, *, raw_json: bool = False) -> bytes:
    """A ``[]byte`` of the protocol: standard base64, or a JSON array of byte values (the Rust
    form); with ``raw_json`` also the raw JSON text that ocicrypt-rs sends as ``optsdata``."""
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b <= 255 for b in value):
        return bytes(value)
    if isinstance(value, str):
        if raw_json and value.startswith("{"):
            return value.encode()
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise KeyProviderError(f"{where}: expected standard base64 or an array of byte values")


def _wrap_request(request: bytes) -> tuple[bytes, str]:
    """(optsdata, the attestation-agent parameter text) of a ``keywrap`` request."""
    doc = jsonio.loads(request, what="WrapKey request", error=KeyProviderError)
    if not isinstance(doc, dict):
        raise KeyProviderError("WrapKey request: expected a JSON object")
    if doc.get("op", "keywrap") != "keywrap":
        raise KeyProviderError(f"WrapKey request: expected op 'keywrap', found {doc.get('op')!r}")
    params = doc.get("keywrapparams")
    if not isinstance(params, dict):
        raise KeyProviderError("WrapKey request: expected keywrapparams")
    if params.get("optsdata") is None:
        raise KeyProviderError("WrapKey request: keywrapparams.optsdata is missing")
    optsdata = _bytes(params["optsdata"], "keywrapparams.optsdata", raw_json=True)
    ec = params.get("ec")
    table = ec.get("Parameters") if isinstance(ec, dict) else None
    values = table.get(PROVIDER) if isinstance(table, dict) else None
    if not isinstance(values, list) or not values:
        raise KeyProviderError(
            f"WrapKey request: expected keywrapparams.ec.Parameters[{PROVIDER!r}] "
            f"(skopeo --encryption-key provider:{PROVIDER}:keyid=kbs:///repo/type/tag)"
        )
    if len(values) != 1:
        raise KeyProviderError(
            f"WrapKey request: expected one {PROVIDER} parameter (one key per layer), "
            f"found {len(values)}"
        )
    raw = _bytes(values[0], f"keywrapparams.ec.Parameters[{PROVIDER!r}][0]")
    try:
        return optsdata, raw.decode()
    except UnicodeDecodeError:
        raise KeyProviderError(f"{PROVIDER} parameters: expected UTF-8 text") from None


class KeyProvider:
    """``WrapKey`` (owner side: ``registrar`` stores the KEKs) and ``UnWrapKey`` (guest side:
    ``getter`` is the KBC the KEKs come from)."""

    def __init__(
        self, registrar: Registrar | None = None, getter: Any = None,
        *, local_key_dir: str = LOCAL_KEY_DIR, remember_keys: bool = True,
    ) -> None:  # fmt: skip
        self.registrar = registrar
        self.getter = getter
        self.kms = KmsContext(getter, local_key_dir)
        self.remember_keys = remember_keys
        self._keks: dict[str, bytes] = {}  # kid -> the KEK generated (and registered) for it
        self._lock = threading.Lock()

    def wrap_key(self, request: bytes) -> bytes:
        """A ``keywrap`` request (JSON) to ``{"keywrapresults":{"annotation":[...]}}``."""
        optsdata, text = _wrap_request(request)
        p = WrapParams.parse(text)
        if p.sample or p.keypath is not None:
            return self._wrap(optsdata, p)
        with self._lock:  # the layers of one image, wrapped concurrently, share one KEK
            return self._wrap(optsdata, p)

    def _wrap(self, optsdata: bytes, p: WrapParams) -> bytes:
        alg = p.algorithm
        if p.sample:
            log.warning("%s: sample=true: the well-known sample KEK protects this image (INSECURE)",
                        PROVIDER)  # fmt: skip
            kek, kid = SAMPLE_KEK, SAMPLE_KID
            iv: bytes | None = bytes(12 if alg == "A256GCM" else 16)
        else:
            kid = (
                str(normalize_kid(p.keyid)) if p.keyid else GENERATED_KID_PREFIX + str(uuid.uuid4())
            )
            iv = None
            if p.keypath is not None:
                try:
                    with open(p.keypath, "rb") as f:
                        kek = f.read(wrap.KEY_SIZE + 1)
                except OSError as e:
                    raise KeyProviderError(
                        f"keypath {p.keypath}: cannot read: {e.strerror}"
                    ) from None
                if len(kek) != wrap.KEY_SIZE:
                    raise KeyProviderError(
                        f"keypath {p.keypath}: expected a {wrap.KEY_SIZE}-byte key, found "
                        f"{'more' if len(kek) > wrap.KEY_SIZE else len(kek)} bytes"
                    )
            elif kid in self._keks:
                kek = self._keks[kid]
            else:
                if p.keyid and not self.remember_keys:
                    raise KeyProviderError(
                        f"WrapKey {kid}: the cmd form makes a new KEK for every layer, so all but "
                        "the last would be lost under one keyid: give keypath= as well, leave "
                        "keyid= out (one generated kid per layer), or use coco keyprovider serve"
                    )
                if self.registrar is None:
                    raise KeyProviderError(
                        f"WrapKey {kid}: a fresh KEK would be lost: start the key provider with "
                        "--kbs and --auth-private-key (or --admin-token-file) to register it, or "
                        "give keypath="
                    )
                kek = os.urandom(wrap.KEY_SIZE)
        if alg == "A256CTR":
            log.warning("%s %s: A256CTR has no integrity of its own", PROVIDER, kid)
        try:
            wrapped, iv = wrap.encrypt(kek, optsdata, alg, iv)
        except CdhError as e:
            raise KeyProviderError(f"encrypt failed: {e}", bad_input=False) from None
        if self.registrar is not None and not p.sample and self._keks.get(kid) != kek:
            try:
                self.registrar.register(ResourceUri.parse(kid), kek)
            except CocoError as e:
                raise KeyProviderError(
                    f"WrapKey {kid}: register KEK failed: {e}", bad_input=False
                ) from None
            if p.keypath is None and self.remember_keys:
                self._keks[kid] = kek
        packet = AnnotationPacket(kid=kid, wrapped_data=wrapped, iv=iv, wrap_type=alg)
        return json.dumps(
            {"keywrapresults": {"annotation": list(packet.to_json())}}, separators=(",", ":")
        ).encode()

    def _kek(self, kid: str) -> bytes:
        uri = ResourceUri.parse(kid, "AnnotationPacket kid")
        return self.getter.get_resource(f"kbs:///{uri.resource_path}")

    def unwrap_key(self, request: bytes) -> bytes:
        """A ``keyunwrap`` request to ``{"keyunwrapresults":{"optsdata":[...]}}``."""
        if self.getter is None:
            raise KeyProviderError(
                "UnWrapKey: no KBC configured (start with --aa-kbc-params cc_kbc::<KBS URL>)",
                bad_input=False,
            )
        return unwrap_key(request, self._kek, self.kms)

    def handle(self, method: str, request: bytes) -> bytes:
        if method == "WrapKey":
            return self.wrap_key(request)
        if method == "UnWrapKey":
            return self.unwrap_key(request)
        raise KeyProviderError(f"keyprovider: unknown method {method!r}")


# ---------------------------------------------------------------------------------- gRPC


def _grpc_handler(provider: KeyProvider, method: str) -> Callable[[Any, Any], Any]:
    import grpc

    from coco.rpc.protos import keyprovider_pb2 as pb

    def handle(req: Any, context: Any) -> Any:
        try:
            out = provider.handle(method, req.KeyProviderKeyWrapProtocolInput)
        except KeyProviderError as e:
            unconfigured = method == "UnWrapKey" and provider.getter is None
            code = (
                grpc.StatusCode.UNIMPLEMENTED if unconfigured
                else grpc.StatusCode.INVALID_ARGUMENT if e.bad_input
                else grpc.StatusCode.INTERNAL
            )  # fmt: skip
            log.warning("%s: %s", method, e)
            context.abort(code, str(e))
        except CocoError as e:
            log.warning("%s: %s", method, e)
            context.abort(grpc.StatusCode.INTERNAL, str(e))
        return pb.KeyProviderKeyWrapProtocolOutput(KeyProviderKeyWrapProtocolOutput=out)

    return handle


def grpc_server(provider: KeyProvider, socket: str, *, workers: int = 4) -> tuple[Any, int]:
    """A started grpcio server on ``socket`` (``host:port``) and the port it bound."""
    from concurrent import futures

    import grpc

    from coco.rpc.protos import keyprovider_pb2 as pb

    handlers = {
        m: grpc.unary_unary_rpc_method_handler(
            _grpc_handler(provider, m),
            request_deserializer=pb.KeyProviderKeyWrapProtocolInput.FromString,
            response_serializer=pb.KeyProviderKeyWrapProtocolOutput.SerializeToString,
        )
        for m in ("WrapKey", "UnWrapKey")
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("keyprovider.KeyProviderService", handlers),)
    )
    try:
        port = server.add_insecure_port(socket)
    except RuntimeError as e:
        raise KeyProviderError(f"--socket {socket}: cannot listen: {e}", bad_input=False) from None
    if port == 0:
        raise KeyProviderError(f"--socket {socket}: cannot listen (address in use or invalid)")
    server.start()
    return server, port
