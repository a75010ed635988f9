"""``coco api-server serve``: upstream's api-server-rest (REST on loopback over the AA and CDH)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

from coco.cli._args import Commands, Parser, run_group, shown

DESCRIPTION = "The guest's REST API server over the Attestation Agent and the Data Hub."
_AA = "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"
_CDH = "unix:///run/confidential-containers/cdh.sock"


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, _COMMANDS)


def _build_serve(p: Parser) -> None:
    p.description = (
        "Serve /info, /aa/token, /aa/evidence, /aa/additional-evidence, /aa/aael and "
        "/cdh/resource/<repo>/<type>/<tag> over HTTP, answered by ttRPC calls to the Attestation "
        "Agent and the Confidential Data Hub. Callers that are not on loopback get 403."
    )
    p.add_argument(
        "-b", "--bind", default="127.0.0.1:8006", metavar="ADDR",
        help=shown("IP:port to listen on.", "127.0.0.1:8006"),
    )  # fmt: skip
    p.add_argument(
        "-f", "--features", default="resource", choices=["resource", "attestation", "all"],
        metavar="{resource,attestation,all}",
        help=shown("Routes to serve: /cdh (resource), /aa (attestation) or both.", "resource"),
    )  # fmt: skip
    p.add_argument(
        "-c", "--cdh-addr", "--cdh_addr", dest="cdh_addr", default=_CDH, metavar="ADDR",
        help=shown("ttRPC address of the Confidential Data Hub.", _CDH),
    )  # fmt: skip
    p.add_argument(
        "-a", "--aa-addr", "--aa_addr", dest="aa_addr", default=_AA, metavar="ADDR",
        help=shown("ttRPC address of the Attestation Agent.", _AA),
    )  # fmt: skip
    p.set_defaults(func=serve)


def serve(bind: str, features: str, cdh_addr: str, aa_addr: str) -> None:
    import asyncio

    from coco.guest.api_server import make_router, parse_bind
    from coco.guest.api_server import serve as run

    parse_bind(bind)
    router = make_router(features, aa_addr=aa_addr, cdh_addr=cdh_addr)

    def ready(address: str) -> None:
        print(
            f"coco api-server: listening on http://{address} with features {features}",
            file=sys.stderr, flush=True,
        )  # fmt: skip

    async def main() -> None:
        import signal

        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await run(router, bind, ready=ready)

    asyncio.run(main())


_COMMANDS: Commands = {
    "serve": ("Serve the REST API on loopback.", _build_serve),
}
