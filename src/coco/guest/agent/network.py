"""UpdateInterface, UpdateRoutes, ListInterfaces and ListRoutes, through iproute2 (``ip -j``).

As upstream: an interface is found by its hardware address (``Link not found`` otherwise: the
shim retries on that text while the hotplugged NIC appears); its name, MTU, addresses and
IFF_NOARP are set and it is brought up. UpdateRoutes replaces the routes the kernel did not add
itself with the given ones.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from coco.guest.agent.errors import AgentError
from coco.rpc.protos import agent_pb2, types_pb2

IFF_NOARP = 0x80
_SCOPES = {"global": 0, "site": 200, "link": 253, "host": 254, "nowhere": 255}


async def ip(*args: str, what: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            "ip", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as e:
        raise AgentError(f"{what}: cannot run ip (iproute2): {e.strerror}") from None
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise AgentError(f"{what}: ip {' '.join(args)}: {err.decode(errors='replace').strip()}")
    return out.decode()


async def _links() -> list[dict[str, Any]]:
    return json.loads(await ip("-j", "addr", "show", what="list interfaces") or "[]")


async def list_interfaces() -> agent_pb2.Interfaces:
    out = agent_pb2.Interfaces()
    for link in await _links():
        iface = out.Interfaces.add()
        iface.device = iface.name = link.get("ifname", "")
        iface.mtu = int(link.get("mtu", 0))
        iface.hwAddr = link.get("address", "")
        iface.type = link.get("link_type", "")
        iface.raw_flags = IFF_NOARP if "NOARP" in link.get("flags", []) else 0
        for a in link.get("addr_info", []):
            iface.IPAddresses.add(
                family=types_pb2.v6 if a.get("family") == "inet6" else types_pb2.v4,
                address=a.get("local", ""),
                mask=str(a.get("prefixlen", "")),
            )
    return out


async def update_interface(iface: types_pb2.Interface) -> types_pb2.Interface:
    hw = iface.hwAddr.lower()
    link = next((x for x in await _links() if x.get("address", "").lower() == hw and hw), None)
    if link is None:
        raise AgentError(f"Link not found (no interface has hardware address {iface.hwAddr!r})")
    dev = link["ifname"]
    what = f"UpdateInterface {iface.name or dev}"
    await ip("link", "set", "dev", dev, "down", what=what)
    if iface.name and iface.name != dev:
        await ip("link", "set", "dev", dev, "name", iface.name, what=what)
        dev = iface.name
    if iface.mtu:
        await ip("link", "set", "dev", dev, "mtu", str(iface.mtu), what=what)
    await ip(
        "link", "set", "dev", dev, "arp", "off" if iface.raw_flags & IFF_NOARP else "on", what=what
    )
    await ip("addr", "flush", "dev", dev, what=what)
    for a in iface.IPAddresses:
        fam = "-6" if a.family == types_pb2.v6 else "-4"
        await ip(fam, "addr", "add", f"{a.address}/{a.mask}", "dev", dev, what=what)
    await ip("link", "set", "dev", dev, "up", what=what)
    return iface


async def list_routes() -> agent_pb2.Routes:
    out = agent_pb2.Routes()
    for fam, family in (("-4", types_pb2.v4), ("-6", types_pb2.v6)):
        for r in json.loads(await ip("-j", fam, "route", "show", what="list routes") or "[]"):
            dst = r.get("dst", "")
            out.Routes.add(
                dest="" if dst == "default" else dst,
                gateway=r.get("gateway", ""),
                device=r.get("dev", ""),
                source=r.get("prefsrc", ""),
                scope=_SCOPES.get(r.get("scope", "global"), 0),
                family=family,
                mtu=int(r.get("mtu", 0) or 0),
            )
    return out


async def update_routes(routes: list[types_pb2.Route]) -> agent_pb2.Routes:
    for fam in ("-4", "-6"):
        for r in json.loads(await ip("-j", fam, "route", "show", what="list routes") or "[]"):
            if r.get("protocol") == "kernel":
                continue
            await ip(fam, "route", "del", r.get("dst", "default"), *(
                ["dev", r["dev"]] if r.get("dev") else []), what="UpdateRoutes")  # fmt: skip
    for r in routes:
        fam = "-6" if r.family == types_pb2.v6 else "-4"
        args = [fam, "route", "replace", r.dest or "default"]
        if r.gateway:
            args += ["via", r.gateway]
        if r.device:
            args += ["dev", r.device]
        if r.source:
            args += ["src", r.source]
        if r.scope:
            args += ["scope", str(r.scope)]
        if r.mtu:
            args += ["mtu", str(r.mtu)]
        await ip(*args, what=f"UpdateRoutes {r.dest or 'default'}")
    return await list_routes()
