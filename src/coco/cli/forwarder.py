"""``coco forwarder serve``: the agent-protocol-forwarder inside a peer-pod VM."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Commands, Parser, run_group

DESCRIPTION = "The agent-protocol-forwarder in a peer-pod VM: TLS 15150 to the kata agent."


def _build_serve(p: Parser) -> None:
    p.description = (
        "Serve the kata agent's ttRPC services on --listen over mutual TLS (keys from the "
        "forwarder config that process-user-data wrote) and relay each call to the agent."
    )
    p.add_argument(
        "--config",
        type=Path,
        default=Path("/run/peerpod/apf.json"),
        help="The forwarder config (apf.json).",
    )
    p.add_argument(
        "--listen",
        default=os.environ.get("FORWARDER_LISTEN", "0.0.0.0:15150"),
        help="HOST:PORT to serve on (default 0.0.0.0:15150).",
    )
    p.add_argument(
        "--kata-agent-socket",
        default="unix:///run/kata-containers/agent.sock",
        help="The agent's ttRPC address.",
    )
    p.add_argument(
        "--pod-namespace",
        default="/run/netns/podns",
        help="The pod network namespace appended to CreateContainer ('' for none).",
    )
    p.add_argument(
        "--cert-file",
        type=Path,
        default=Path("/etc/certificates/tls.crt"),
        help="Manual TLS: the server certificate, used when the config has no keys.",
    )
    p.add_argument(
        "--cert-key",
        type=Path,
        default=Path("/etc/certificates/tls.key"),
        help="Manual TLS: its key.",
    )
    p.add_argument(
        "--ca-cert-file",
        type=Path,
        default=Path("/etc/certificates/ca.crt"),
        help="Manual TLS: the CA of the clients (the CAA) to accept.",
    )
    p.add_argument("--disable-tls", action="store_true",
                   help="Insecure: serve without TLS (any peer reaches the agent).")  # fmt: skip
    p.set_defaults(func=serve)


def serve(config: Path, listen: str, kata_agent_socket: str, pod_namespace: str,
          cert_file: Path, cert_key: Path, ca_cert_file: Path, disable_tls: bool) -> None:  # fmt: skip
    import asyncio
    import logging
    import signal

    from coco.guest.forwarder import Forwarder, ForwarderConfig, TlsFiles, ensure_netns

    logging.basicConfig(level=logging.INFO, format="forwarder: %(levelname)s: %(message)s")
    if disable_tls:
        logging.getLogger("coco.guest.forwarder").warning(
            "--disable-tls: the agent is reachable by any peer without authentication (insecure)"
        )
        ctx = None
    else:
        baked = TlsFiles(cert_file, cert_key, ca_cert_file)
        ctx = ForwarderConfig.load(config).ssl_context(f"forwarder config {config}", baked)
    ensure_netns(pod_namespace)

    async def main() -> None:
        fwd = Forwarder(kata_agent_socket, ctx, pod_namespace)
        host, port = await fwd.listen(listen)
        sys.stderr.write(f"forwarder: serving {host}:{port}\n")
        sys.stderr.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await fwd.stop()

    asyncio.run(main())


COMMANDS: Commands = {"serve": ("Serve the agent's ttRPC over TLS and relay it.", _build_serve)}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
