"""``coco cdh``: the Confidential Data Hub (``serve``), its command-line clients (``get-resource``,
``unseal``, ``pull-image``), and the tools that make sealed secrets (``keygen``, ``seal``)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

from coco.cli._args import Commands, Parser, env_default, run_group

DESCRIPTION = "The Confidential Data Hub: resources, sealed secrets and image pulls in the guest."
_SOCKET_ENV = "COCO_CDH_SOCKET"
_DEFAULT_SOCKET = "unix:///run/confidential-containers/cdh.sock"
_TIMEOUT = 50.0


def _add_socket(p: Parser) -> None:
    p.add_argument(
        "--socket",
        default=env_default(_SOCKET_ENV) or _DEFAULT_SOCKET,
        metavar="ADDR",
        help=f"The hub's ttRPC address [default: ${_SOCKET_ENV} or {_DEFAULT_SOCKET}].",
    )


# --- serve ----------------------------------------------------------------------------------------


def _build_serve(p: Parser) -> None:
    p.description = (
        "Serve the hub's five ttRPC services (UnsealSecret, GetResource, SecureMount, PullImage, "
        "UnWrapKey) on one socket. Without --config the KBC comes from $AA_KBC_PARAMS or the "
        "kernel command line (agent.aa_kbc_params), else offline_fs_kbc."
    )
    p.add_argument("--config", "-c", metavar="FILE", help="cdh.toml (or .json), upstream's shape.")
    p.add_argument("--socket", metavar="ADDR", help="Listen here instead of the config's socket.")
    p.add_argument(
        "--ocicrypt-config",
        metavar="FILE",
        help="Also write an ocicrypt_config.json naming this hub as the attestation-agent "
        "key provider (upstream writes /run/confidential-containers/cdh/ocicrypt_config.json).",
    )
    p.set_defaults(func=serve)


def serve(config: str | None, socket: str | None, ocicrypt_config: str | None) -> None:
    import asyncio
    import dataclasses

    from coco.guest.cdh.config import load_config
    from coco.guest.cdh.hub import Hub
    from coco.guest.cdh.server import make_getter, prepare
    from coco.guest.cdh.server import serve as serve_hub

    cfg = load_config(config)
    if socket:
        cfg = dataclasses.replace(cfg, socket=socket)
    hub = Hub(cfg, make_getter(cfg))
    prepare(hub, ocicrypt_config=ocicrypt_config)

    def ready(address: str) -> None:
        print(f"coco cdh: serving on {address}", file=sys.stderr, flush=True)

    async def main() -> None:
        import signal

        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # stop cleanly: the socket file goes too
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve_hub(hub, ready=ready)

    asyncio.run(main())


# --- clients --------------------------------------------------------------------------------------


def _call(socket: str, service: Any, method: str, request: Any) -> Any:
    from coco.rpc import Stub, SyncClient

    with SyncClient(socket) as client:
        return getattr(Stub(client, service, timeout=_TIMEOUT), method)(request)


def _build_get_resource(p: Parser) -> None:
    p.description = "Print the resource (raw bytes) that the hub fetches from the KBS."
    p.add_argument("uri", metavar="URI", help="kbs:///repository/type/tag")
    _add_socket(p)
    p.set_defaults(func=get_resource)


def get_resource(uri: str, socket: str) -> None:
    from coco.rpc.protos import confidential_data_hub_pb2 as pb
    from coco.rpc.services import GET_RESOURCE

    reply = _call(socket, GET_RESOURCE, "GetResource", pb.GetResourceRequest(ResourcePath=uri))
    sys.stdout.buffer.write(reply.Resource)
    sys.stdout.flush()


def _build_unseal(p: Parser) -> None:
    p.description = "Print the plaintext of a sealed secret ('-': read it from stdin)."
    p.add_argument("secret", metavar="SECRET", help="sealed.<header>.<payload>.<signature>, or -")
    _add_socket(p)
    p.set_defaults(func=unseal)


def unseal(secret: str, socket: str) -> None:
    from coco.rpc.protos import confidential_data_hub_pb2 as pb
    from coco.rpc.services import SEALED_SECRET

    data = sys.stdin.buffer.read().strip() if secret == "-" else secret.encode()
    reply = _call(socket, SEALED_SECRET, "UnsealSecret", pb.UnsealSecretInput(secret=data))
    sys.stdout.buffer.write(reply.plaintext)
    sys.stdout.flush()


def _build_pull_image(p: Parser) -> None:
    p.description = (
        "Ask the hub to pull IMAGE into BUNDLE (absolute path); prints the manifest digest."
    )
    p.add_argument("image", metavar="IMAGE", help="e.g. registry.example/app:1")
    p.add_argument("bundle", metavar="BUNDLE")
    _add_socket(p)
    p.set_defaults(func=pull_image)


def pull_image(image: str, bundle: str, socket: str) -> None:
    import os

    from coco.rpc.protos import confidential_data_hub_pb2 as pb
    from coco.rpc.services import IMAGE_PULL

    req = pb.ImagePullRequest(image_url=image, bundle_path=os.path.abspath(bundle))
    reply = _call(socket, IMAGE_PULL, "PullImage", req)
    print(reply.manifest_digest)


# --- sealing --------------------------------------------------------------------------------------


def _build_keygen(p: Parser) -> None:
    p.description = (
        "Make a P-256 signing key for sealed secrets: <kid>-private.json (keep it) and "
        "<kid>-public.json (put it in the KBS under the kid, or in the hub's sealed-secret dir)."
    )
    p.add_argument(
        "--kid", required=True, metavar="KID", help="e.g. kbs:///default/sealed-secret-key/1"
    )
    p.add_argument("--output-dir", required=True, metavar="DIR")
    p.set_defaults(func=keygen)


def keygen(kid: str, output_dir: str) -> None:
    from coco.guest.cdh.secret import keygen as make

    priv, pub = make(kid, output_dir)
    print(f"{priv}\n{pub}")


def _build_seal(p: Parser) -> None:
    p.description = (
        "Print a sealed secret signed with --signing-jwk-path under --signing-kid: 'vault' names "
        "a secret the provider holds (--name kbs:///...); 'envelope' encrypts --file under a data "
        "key wrapped by the KMS provider (built in: local, with --key-dir)."
    )
    p.add_argument("type", choices=["vault", "envelope"], metavar="{vault,envelope}")
    p.add_argument("--signing-kid", required=True, metavar="KID")
    p.add_argument("--signing-jwk-path", required=True, metavar="FILE")
    p.add_argument(
        "--name", metavar="URI", help="vault: the secret's name (a resource URI for kbs)."
    )
    p.add_argument(
        "--provider",
        default=None,
        metavar="NAME",
        help="[default: kbs for vault, local for envelope]",
    )
    p.add_argument("--file", metavar="FILE", help="envelope: the plaintext to seal.")
    p.add_argument("--key-id", metavar="ID", help="envelope: the KMS key id.")
    p.add_argument(
        "--key-dir", metavar="DIR", help="envelope with provider local: its key directory."
    )
    p.add_argument("--wrap-type", default="A256GCM", choices=["A256GCM", "A256CTR"], metavar="ALG")
    p.set_defaults(func=seal)


def seal(
    type: str,
    signing_kid: str,
    signing_jwk_path: str,
    name: str | None,
    provider: str | None,
    file: str | None,
    key_id: str | None,
    key_dir: str | None,
    wrap_type: str,
) -> None:
    from coco.cli._args import Usage
    from coco.guest.cdh import secret as s
    from coco.guest.cdh.kms import LOCAL_KEY_DIR, KmsContext

    key = s.load_signing_key(signing_jwk_path)
    if type == "vault":
        if not name:
            raise Usage("seal vault: --name is required")
        payload = s.vault_payload(name, provider or "kbs")
    else:
        if not file or not key_id:
            raise Usage("seal envelope: --file and --key-id are required")
        with open(file, "rb") as f:
            data = f.read()
        kms = KmsContext(None, key_dir or LOCAL_KEY_DIR)
        payload = s.envelope_payload(data, provider or "local", key_id, kms, wrap_type)
    print(s.seal(payload, signing_kid, key))


COMMANDS: Commands = {
    "serve": ("Serve the hub's ttRPC services.", _build_serve),
    "get-resource": ("Fetch a resource through the hub.", _build_get_resource),
    "unseal": ("Unseal a sealed secret through the hub.", _build_unseal),
    "pull-image": ("Pull an image into a bundle through the hub.", _build_pull_image),
    "keygen": ("Make a signing key for sealed secrets.", _build_keygen),
    "seal": ("Make a sealed secret (vault or envelope).", _build_seal),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
