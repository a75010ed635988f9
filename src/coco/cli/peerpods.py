"""``coco peerpods``: the peer-pods webhook and cleanup controller (the cluster-side parts)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Parser, Usage, dispatch, parse_command

DESCRIPTION = "Peer pods in the cluster: the mutating webhook and the cleanup controller."


def _build_webhook(p: Parser) -> None:
    p.description = (
        "Serve the mutating admission webhook (AdmissionReview v1, JSONPatch) on HTTPS: pods of "
        "the peer-pods runtime class get their resources as pod VM annotations and one "
        "kata.peerpods.io/vm; other pods pass untouched. --print-manifests prints its Kubernetes "
        "objects (cert-manager certificate, service, deployment, MutatingWebhookConfiguration)."
    )
    p.add_argument("verb", choices=("serve",), help="serve")
    p.add_argument("--listen", default="0.0.0.0:8443", help="HOST:PORT (default 0.0.0.0:8443).")
    p.add_argument("--cert", type=Path, help="The TLS certificate (PEM).")
    p.add_argument("--key", type=Path, help="The TLS key (PEM).")
    p.add_argument(
        "--target-runtime-class",
        default=os.environ.get("TARGET_RUNTIMECLASS", "kata-remote"),
        help="The peer-pods runtime class (TARGET_RUNTIMECLASS; default kata-remote).",
    )
    p.add_argument(
        "--extended-resource",
        default=os.environ.get("POD_VM_EXTENDED_RESOURCE", "kata.peerpods.io/vm"),
        help="POD_VM_EXTENDED_RESOURCE (default kata.peerpods.io/vm).",
    )
    p.add_argument(
        "--namespace",
        default="peer-pods-webhook-system",
        help="The webhook's namespace in the manifests.",
    )
    p.add_argument("--image", default="coco:latest", help="The image in the manifests.")
    p.add_argument("--print-manifests", action="store_true", help="Print the YAML and exit.")  # fmt: skip
    p.set_defaults(func=webhook)


def webhook(verb: str, listen: str, cert: Path | None, key: Path | None,
            target_runtime_class: str, extended_resource: str, namespace: str, image: str,
            print_manifests: bool) -> None:  # fmt: skip
    from coco.host.peerpods import webhook as wh

    if print_manifests:
        sys.stdout.write(wh.manifests(namespace, image, target_runtime_class))
        return
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise Usage(f"--listen: expected HOST:PORT, found {listen!r}")
    if cert is None or key is None:
        raise Usage("--cert and --key: expected the webhook's TLS certificate and key")
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise Usage(f"--cert/--key: cannot load {cert} and {key}: {e}") from None
    server = wh.WebhookServer(host, int(port), ctx, target_runtime_class, extended_resource)
    sys.stderr.write(f"peerpods webhook: serving https://{host}:{server.port}{wh.PATH}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def _controller(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    from coco.host.peerpods.provider import PROVIDERS, get_factory

    p = Parser(f"{group.prog} controller")
    p.description = (
        "Run the cleanup controller: a PeerPod being deleted while the CAA's finalizer is still "
        "on it gets its VM deleted through PROVIDER, then the finalizer removed. "
        "--print-crd prints the PeerPod CustomResourceDefinition."
    )
    p.add_argument("provider", metavar="PROVIDER", nargs="?", help="The cloud provider.")
    p.add_argument("--server", help="A Kubernetes API URL to use without credentials (tests); "
                   "default: in-cluster or kubeconfig login.")  # fmt: skip
    p.add_argument("--print-crd", action="store_true", help="Print the PeerPod CRD and exit.")
    positional = [a for a in argv if not a.startswith("-")]
    factory = None
    if positional and positional[0] in PROVIDERS:
        factory = get_factory(positional[0])
        factory.add_arguments(p)
    args = p.parse_args(argv)
    if not args.print_crd and factory is None:
        raise Usage(
            f"PROVIDER: expected one of {', '.join(sorted(PROVIDERS))}, found {args.provider!r}"
        )
    return controller, {"args": args, "factory": factory}


def controller(args: Any, factory: Any) -> None:
    from coco.host.peerpods import controller as ctl

    if args.print_crd:
        sys.stdout.write(ctl.manifests())
        return
    import asyncio
    import logging

    logging.basicConfig(
        level=logging.INFO, format="peerpods controller: %(levelname)s: %(message)s"
    )
    provider = factory.new_provider(args)
    try:
        asyncio.run(ctl.run(provider, args.server))
    except KeyboardInterrupt:
        pass
    finally:
        provider.teardown()


COMMANDS = {
    "webhook": ("The mutating admission webhook: serve, or --print-manifests.", _build_webhook),
    "controller": ("The cleanup controller of PeerPod objects (kopf).", lambda p: None),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    _, name, rest = dispatch(group, argv, COMMANDS)
    if name == "controller":
        return _controller(group, rest)
    return parse_command(group, name, rest, COMMANDS)
