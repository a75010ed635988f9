"""``coco cloud-api-adaptor serve PROVIDER``: the peer-pods adaptor on the node.

Flags are upstream's in double-dash form, each falling back to upstream's environment variable;
the provider's own flags follow the provider name (``coco cloud-api-adaptor serve libvirt --help``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Parser, Usage

DESCRIPTION = "The peer-pods cloud-api-adaptor: pod VMs through a cloud provider."


def duration(text: str) -> float:
    """A Go-style duration (``90s``, ``5m``, ``1h``, ``1m30s``) or plain seconds."""
    t = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 90s, 5m or 1h, found {text!r}"
        )
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name) or default


def _add_common(p: Parser) -> None:
    p.add_argument(
        "--socket",
        type=Path,
        default=Path(_env("REMOTE_HYPERVISOR_ENDPOINT", "/run/peerpod/hypervisor.sock")),
        help="The hypervisor.Hypervisor socket (REMOTE_HYPERVISOR_ENDPOINT).",
    )
    p.add_argument(
        "--pods-dir",
        type=Path,
        default=Path(_env("PODS_DIR", "/run/peerpod/pods")),
        help="Per-sandbox state and agent sockets (PODS_DIR).",
    )
    p.add_argument(
        "--forwarder-port",
        type=int,
        default=int(_env("FORWARDER_PORT", "15150")),
        help="The forwarder's port in each VM (FORWARDER_PORT; default 15150).",
    )
    p.add_argument(
        "--proxy-timeout",
        type=duration,
        default=duration(_env("PROXY_TIMEOUT", "5m")),
        help="How long StartVM waits for the VM's forwarder (PROXY_TIMEOUT; default 5m).",
    )
    p.add_argument(
        "--initdata",
        default=_env("INITDATA"),
        help="Default initdata, gzip + base64, for pods without the annotation (INITDATA).",
    )
    p.add_argument(
        "--cloud-config-verify",
        action="store_true",
        default=_env("CLOUD_CONFIG_VERIFY") == "true",
        help="Check the provider's configuration at start (CLOUD_CONFIG_VERIFY).",
    )
    p.add_argument(
        "--disable-tls",
        action="store_true",
        default=_env("DISABLE_TLS") == "true",
        help="Insecure: talk to the forwarders without TLS (DISABLE_TLS).",
    )
    p.add_argument(
        "--ca-cert-file",
        type=Path,
        default=_env("CACERT_FILE") or None,
        help="Manual TLS: the CA of the forwarders' certificates (CACERT_FILE).",
    )
    p.add_argument(
        "--cert-file",
        type=Path,
        default=_env("CERT_FILE") or None,
        help="Manual TLS: the CAA's client certificate (CERT_FILE); without it, the "
        "CAA makes a CA and a certificate per VM.",
    )
    p.add_argument(
        "--cert-key",
        type=Path,
        default=_env("CERT_KEY") or None,
        help="Manual TLS: the client certificate's key (CERT_KEY).",
    )
    p.add_argument("--tls-skip-verify", action="store_true",
                   default=_env("TLS_SKIP_VERIFY") == "true",
                   help="Insecure: accept any forwarder certificate (manual TLS only).")  # fmt: skip
    p.add_argument(
        "--tls-min-version",
        default=_env("TLS_MIN_VERSION", "TLSv1.2"),
        choices=("TLSv1.2", "TLSv1.3"),
        help="TLS_MIN_VERSION (default TLSv1.2).",
    )
    p.add_argument(
        "--instance-types",
        default=_env("PODVM_INSTANCE_TYPES"),
        help="Allowed sizes NAME=VCPUSxMEMORY_MIB[xGPUS],... (PODVM_INSTANCE_TYPES); "
        "empty: the pod's vCPUs and memory are used as asked.",
    )
    p.add_argument(
        "--instance-type",
        default=_env("PODVM_INSTANCE_TYPE"),
        help="The default size's name (PODVM_INSTANCE_TYPE).",
    )
    p.add_argument(
        "--reconcile-interval",
        type=duration,
        default=duration(_env("RECONCILE_INTERVAL", "60s")),
        help="How often VMs no sandbox owns are looked for and deleted (0: only at start).",
    )
    p.add_argument(
        "--caa-id",
        default=_env("CAA_ID"),
        help="This adaptor's id in VM tags (default: made once, kept in PODS_DIR).",
    )
    p.add_argument("--authfile", type=Path, default=_env("AUTHFILE") or None,
                   help="Registry credentials (auth.json) handed to every VM.")  # fmt: skip


def _build_serve(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    from coco.host.peerpods.provider import PROVIDERS, get_factory

    p = Parser(f"{group.prog} serve")
    p.description = (
        "Serve hypervisor.Hypervisor and podvminfo.PodVMInfo on --socket for the kata shim's "
        f"remote hypervisor, creating pod VMs with PROVIDER ({', '.join(sorted(PROVIDERS))})."
    )
    p.add_argument("provider", metavar="PROVIDER", help="The cloud provider.")
    _add_common(p)
    positional = [a for a in argv if not a.startswith("-")]
    factory = None
    if positional and positional[0] in PROVIDERS:
        factory = get_factory(positional[0])
        factory.add_arguments(p)
    args = p.parse_args(argv)
    if factory is None:
        raise Usage(
            f"PROVIDER: expected one of {', '.join(sorted(PROVIDERS))}, found {args.provider!r}"
        )
    return serve, {"args": args, "factory": factory}


def serve(args: argparse.Namespace, factory: Any) -> None:
    import asyncio
    import logging
    import signal

    from coco.host.peerpods.caa import Caa, CaaConfig
    from coco.host.peerpods.provider import parse_instance_types

    log = logging.getLogger("coco.host.peerpods")
    logging.basicConfig(level=logging.INFO, format="cloud-api-adaptor: %(levelname)s: %(message)s")
    if args.disable_tls:
        log.warning(
            "--disable-tls: the agent's traffic to every pod VM is NOT protected (insecure)"
        )
    config = CaaConfig(
        socket=args.socket, pods_dir=args.pods_dir, forwarder_port=args.forwarder_port,
        proxy_timeout=args.proxy_timeout, initdata=args.initdata, disable_tls=args.disable_tls,
        tls_min_version=args.tls_min_version, reconcile_interval=args.reconcile_interval,
        caa_id=args.caa_id,
        instance_types=parse_instance_types(args.instance_types or "", "--instance-types"),
        default_instance_type=args.instance_type, authfile=args.authfile,
        ca_cert_file=args.ca_cert_file, cert_file=args.cert_file, cert_key=args.cert_key,
        tls_skip_verify=args.tls_skip_verify,
    )  # fmt: skip
    if args.tls_skip_verify:
        log.warning("--tls-skip-verify: forwarder certificates are NOT checked (insecure)")
    provider = factory.new_provider(args)
    if args.cloud_config_verify:
        provider.config_verifier()

    async def main() -> None:
        caa = Caa(config, provider)
        await caa.start()
        sys.stderr.write(f"cloud-api-adaptor: serving {config.socket}\n")
        sys.stderr.flush()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await caa.stop()

    asyncio.run(main())


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    group.usage = f"{group.prog} serve PROVIDER [OPTIONS]"
    group.commands = {"serve": "Serve the remote hypervisor protocol with a cloud provider."}
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(group.format_help())
        sys.exit(0 if argv else 2)
    if argv[0] != "serve":
        group.error(f"No such command {argv[0]!r} (expected one of: serve)")
    return _build_serve(group, argv[1:])
