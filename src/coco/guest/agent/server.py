"""``coco agent serve``: the agent's services on its address, until DestroySandbox or SIGTERM.

The initial policy is ``--policy`` / ``policy_file``, else the initdata's ``policy.rego`` (as the
pod VM's init writes it under ``initdata_dir``), else none (see :mod:`.policy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from coco.errors import CocoError
from coco.guest.agent.config import AgentConfig
from coco.guest.agent.errors import AgentError, StorageError
from coco.guest.agent.policy import PolicyGate
from coco.guest.agent.process import become_subreaper
from coco.guest.agent.sandbox import Sandbox
from coco.guest.agent.service import SUPPORTED, AgentService, HealthService, unsupported
from coco.guest.agent.storage import Storages

log = logging.getLogger(__name__)


def initial_policy(cfg: AgentConfig, policy_file: str | None) -> tuple[str, str] | None:
    """(text, where) of the initial policy, or None."""
    path = policy_file or cfg.policy_file
    if not path:
        candidate = Path(cfg.initdata_dir, "policy.rego")
        if not candidate.exists():
            return None
        path = str(candidate)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise AgentError(f"agent policy {path}: cannot read it: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AgentError(f"agent policy {path}: expected UTF-8 Rego text") from None
    if "package agent_policy" not in text:
        from coco.integrity.genpolicy import policy_from_annotation

        text = policy_from_annotation(text, path)
    return text, path


def make_gate(cfg: AgentConfig, policy_file: str | None) -> PolicyGate:
    from coco.integrity.agent_policy import AgentPolicy

    found = initial_policy(cfg, policy_file)
    policy = AgentPolicy(found[0], found[1]) if found else None
    return PolicyGate(policy, require=cfg.require_policy)


def make_puller(cfg: AgentConfig):
    async def pull(image: str, bundle: str) -> str:
        from coco.rpc import Client, RpcError, Stub
        from coco.rpc.protos import confidential_data_hub_pb2 as cdh
        from coco.rpc.services import IMAGE_PULL

        try:
            client = await Client.connect(cfg.cdh_socket, timeout=cfg.cdh_api_timeout)
        except RpcError as e:
            raise StorageError(
                f"image_guest_pull {image}: no Confidential Data Hub at {cfg.cdh_socket}: "
                f"{e.message}"
            ) from None
        try:
            req = cdh.ImagePullRequest(image_url=image, bundle_path=bundle)
            reply = await Stub(client, IMAGE_PULL).PullImage(req, timeout=cfg.image_pull_timeout)
        except RpcError as e:
            raise StorageError(
                f"image_guest_pull {image}: the Confidential Data Hub refused the pull: {e.message}"
            ) from None
        finally:
            await client.close()
        return reply.manifest_digest

    return pull


def build(cfg: AgentConfig, gate: PolicyGate):
    from coco.rpc import Server
    from coco.rpc.services import AGENT, HEALTH

    sandbox = Sandbox(cfg, Storages(cfg, make_puller(cfg)))
    svc = AgentService(cfg, sandbox, gate)
    server = Server()
    table = {m: getattr(svc, m) if m in SUPPORTED else unsupported(m) for m in AGENT.methods}
    server.register(AGENT, table)
    server.register(HEALTH, HealthService())
    return server, sandbox


async def serve(
    cfg: AgentConfig, gate: PolicyGate, ready: Callable[[str], None] | None = None
) -> None:
    if not become_subreaper():
        log.warning("cannot become a child subreaper: container exit codes will be unknown (255)")
    server, sandbox = build(cfg, gate)
    address = await server.listen(cfg.server_addr)
    if ready is not None:
        ready(address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    destroyed = asyncio.ensure_future(sandbox.destroyed.wait())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([destroyed, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        destroyed.cancel()
        stopped.cancel()
        if sandbox.destroyed.is_set():
            await asyncio.sleep(0.05)  # let the DestroySandbox answer go out
        await server.stop(grace=2.0)
        if not sandbox.destroyed.is_set() and (sandbox.containers or sandbox.created):
            with contextlib.suppress(CocoError, OSError):
                await sandbox.destroy()
        log.info("agent: stopped (pid %d)", os.getpid())
