"""``coco agent``: the Kata agent of the guest (``serve``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from coco.cli._args import Commands, Parser, run_group

DESCRIPTION = "The Kata agent: the guest's grpc.AgentService, every request held to the policy."


def _build_serve(p: Parser) -> None:
    p.description = (
        "Serve grpc.AgentService and grpc.Health over ttRPC. ADDR: vsock://-1:1024 (the default "
        "where vsock exists), serial:///dev/virtio-ports/agent.0, tcp://HOST:PORT or "
        "unix:///PATH; also $KATA_AGENT_SERVER_ADDR or agent.server_addr= on the kernel command "
        "line. The policy: --policy, else the initdata's policy.rego, else none (everything "
        "allowed, with a warning) unless --require-policy."
    )
    p.add_argument("--config", "-c", metavar="FILE", help="agent.toml.")
    p.add_argument("--server-addr", metavar="ADDR", help="Listen here.")
    p.add_argument(
        "--policy", dest="policy_file", metavar="FILE", help="The initial agent policy (Rego)."
    )
    p.add_argument(
        "--require-policy",
        action="store_true",
        help="Refuse every request until a policy is set (SetPolicy).",
    )
    p.set_defaults(func=serve)


def serve(
    config: str | None, server_addr: str | None, policy_file: str | None, require_policy: bool
) -> None:
    import asyncio
    import dataclasses

    from coco.guest.agent.config import load_config
    from coco.guest.agent.server import make_gate
    from coco.guest.agent.server import serve as serve_agent

    cfg = load_config(config, server_addr=server_addr)
    if require_policy:
        cfg = dataclasses.replace(cfg, require_policy=True)
    gate = make_gate(cfg, policy_file)

    def ready(address: str) -> None:
        print(f"coco agent: serving on {address}", file=sys.stderr, flush=True)

    asyncio.run(serve_agent(cfg, gate, ready=ready))


COMMANDS: Commands = {"serve": ("Serve the agent API.", _build_serve)}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
