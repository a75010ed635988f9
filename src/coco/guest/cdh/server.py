"""``coco cdh serve``: the hub's five ttRPC services on one socket, as upstream's CDH serves them.

``api.SealedSecretService/UnsealSecret``, ``api.GetResourceService/GetResource``,
``api.SecureMountService/SecureMount``, ``api.ImagePullService/PullImage`` and
``keyprovider.KeyProviderService/UnWrapKey`` (``WrapKey`` is declared, not implemented: NOT_FOUND
``/keyprovider.KeyProviderService/WrapKey is not supported``, as upstream's). A failure answers
INTERNAL ``[CDH] [ERROR]: <what failed>`` (an UnWrapKey request that does not parse:
``[ERROR] UnwrapKey Parse request failed…``); the server keeps serving other calls.

The hub's work (KBS round trips, AES, pulls) runs in worker threads so one slow pull does not hold
up a ``GetResource``. At start the hub writes its ``[[credentials]]``, exports ``image_pull_proxy``
to the environment (when unset), registers itself as the in-process ``native``
``attestation-agent`` key provider and, when asked, writes an ocicrypt_config.json naming its own
socket (``{"key-providers":{"attestation-agent":{"ttrpc":"<socket>"}}}``) for other processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.errors import CocoError
from coco.guest.cdh.config import CdhConfig, ocicrypt_config_json
from coco.guest.cdh.hub import Hub
from coco.guest.cdh.resource import ResourceGetter

log = logging.getLogger(__name__)


def make_getter(config: CdhConfig) -> ResourceGetter:
    """The KBS client ``[kbc]`` names: ``cc_kbc`` with tokens from the Attestation Agent at
    ``[aa] aa_socket``, or ``offline_fs_kbc``."""
    from coco.guest.kbc import AaTokenSource, make_kbc

    kbc = config.kbc
    source = AaTokenSource(config.aa_socket) if kbc.name == "cc_kbc" else None
    return make_kbc(kbc.name, kbc.url, source=source, cert=kbc.kbs_cert)  # type: ignore[return-value]


def _internal(e: BaseException) -> CocoError:
    from coco.rpc import Code, RpcError

    text = " ".join(str(e).split())
    if text.startswith("UnwrapKey Parse request failed"):
        return RpcError(Code.INTERNAL, f"[ERROR] {text}")
    return RpcError(Code.INTERNAL, f"[CDH] [ERROR]: {text}")


class CdhService:
    """The handlers of the five services, over one :class:`Hub`."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(func, *args)
        except CocoError as e:
            raise _internal(e) from None

    async def UnsealSecret(self, req: Any, ctx: Any) -> Any:
        from coco.rpc.protos import confidential_data_hub_pb2 as pb

        plaintext = await self._run(self.hub.unseal_secret, req.secret)
        return pb.UnsealSecretOutput(plaintext=plaintext)

    async def GetResource(self, req: Any, ctx: Any) -> Any:
        from coco.rpc.protos import confidential_data_hub_pb2 as pb

        data = await self._run(self.hub.get_resource, req.ResourcePath)
        return pb.GetResourceResponse(Resource=data)

    async def SecureMount(self, req: Any, ctx: Any) -> Any:
        from coco.rpc.protos import confidential_data_hub_pb2 as pb

        await self._run(
            self.hub.secure_mount,
            req.volume_type,
            dict(req.options),
            list(req.flags),
            req.mount_point,
        )
        return pb.SecureMountResponse()

    async def PullImage(self, req: Any, ctx: Any) -> Any:
        from coco.rpc.protos import confidential_data_hub_pb2 as pb

        cancel = threading.Event()  # a dropped call or a deadline stops the pull's threads
        try:
            digest = await self._run(self.hub.pull_image, req.image_url, req.bundle_path, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise
        return pb.ImagePullResponse(manifest_digest=digest)

    async def UnWrapKey(self, req: Any, ctx: Any) -> Any:
        from coco.rpc.protos import keyprovider_pb2 as pb

        answer = await self._run(self.hub.unwrap_key, req.KeyProviderKeyWrapProtocolInput)
        return pb.KeyProviderKeyWrapProtocolOutput(KeyProviderKeyWrapProtocolOutput=answer)


def build_server(hub: Hub) -> Any:
    """A :class:`coco.rpc.Server` with the hub's five services registered."""
    from coco.rpc import Server
    from coco.rpc import services as s

    server = Server()
    svc = CdhService(hub)
    for service in (s.SEALED_SECRET, s.GET_RESOURCE, s.SECURE_MOUNT, s.IMAGE_PULL):
        server.register(service, svc)
    server.register(s.KEY_PROVIDER, {"UnWrapKey": svc.UnWrapKey, "WrapKey": None})
    return server


def prepare(hub: Hub, *, ocicrypt_config: str | None = None) -> None:
    """What the hub does before it answers: credentials, proxies, the native key provider."""
    from coco.ocicrypt.keywrap.keyprovider import register_native

    for path in hub.provision_credentials():
        log.info("wrote credential %s", path)
    proxy = hub.config.image.image_pull_proxy
    if proxy is not None:
        for name, value in (
            ("https_proxy", proxy.https_proxy),
            ("http_proxy", proxy.http_proxy),
            ("no_proxy", proxy.no_proxy),
        ):
            if value and not os.environ.get(name) and not os.environ.get(name.upper()):
                os.environ[name] = value
    register_native("attestation-agent", hub.keyprovider)
    if ocicrypt_config:
        p = Path(ocicrypt_config)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(ocicrypt_config_json(hub.config.socket))
        log.info("wrote %s (attestation-agent key provider at %s)", p, hub.config.socket)


async def serve(hub: Hub, *, ready: Callable[[str], None] | None = None) -> None:
    """Serve until cancelled; ``ready`` gets the bound address once the socket listens."""
    socket = hub.config.socket
    if socket.startswith("unix://") and not socket.startswith("unix://@"):
        Path(socket[len("unix://") :]).parent.mkdir(parents=True, exist_ok=True)
    server = build_server(hub)
    bound = await server.listen(socket)
    log.info("confidential data hub serving on %s (kbc %s)", bound, hub.config.kbc.name)
    if ready is not None:
        ready(bound)
    try:
        await server.serve_forever()
    finally:
        await server.stop()
