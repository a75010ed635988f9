"""Benchmark: CreateVM -> agent ready through the cloud-api-adaptor, libvirt and qemu providers.

Per run, in one process: the CAA (in-process, its real ttRPC socket), a stub agent on a unix
socket and the forwarder serving the VM's relay (the tiny image of the tests: the pod VM kernel
and a busybox initramfs whose port 15150 relays to the host's forwarder), then, timed:

* CreateVM (sandbox record, TLS certificate, userdata);
* StartVM split into the provider's create_instance (disks, config drive, domain or qemu start)
  and the wait until the forwarder answers through the VM (the guest's boot under TCG, the relay,
  mutual TLS);
* StopVM.

The peer is the same VM booted by a bare ``qemu-system-x86_64`` with the same forward, timed to
the same point (a TCP round trip through the VM's port 15150). Prints medians and the ratios
StartVM / bare boot.

With ``--podvm-image DIR`` (``coco podvm build``'s image) the VMs are real peer-pod VMs instead:
their init binds the initdata, runs ``coco process-user-data`` and starts the AA, CDH,
api-server, the agent and ``coco forwarder serve``; StartVM returns once the agent in the VM
answered a health check through the proxy, the forwarder and mutual TLS (no stub, no relay, no
bare-boot peer; the guest's own per-service times are printed from its console).

    .venv/bin/python benchmarks/bench_peerpods.py [--runs 3] [--podvm-image DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.host.peerpods_fixtures

from tests.host.peerpods_fixtures import make_tiny_image, start_libvirtd
from tests.host.test_peerpods_libvirt import POD, StubAgent

from coco.guest.forwarder import Forwarder, ForwarderConfig
from coco.guest.userdata import parse_cloud_config
from coco.host.peerpods.caa import Caa, CaaConfig
from coco.host.peerpods.providers.libvirt import LibvirtConfig, LibvirtProvider
from coco.host.peerpods.providers.qemu import QemuProvider
from coco.rpc import Client, Server
from coco.rpc.protos import health_pb2, hypervisor_pb2
from coco.rpc.services import AGENT, HEALTH, HYPERVISOR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Timed:
    """Wraps a provider to time create_instance."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.name = inner.name
        self.create = 0.0

    def create_instance(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return self.inner.create_instance(*args, **kwargs)
        finally:
            self.create = time.perf_counter() - t

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


PODVM_POD = {**POD, "io.katacontainers.config.hypervisor.default_memory": "2048"}


async def podvm_run(provider, work: Path, sid: str, consoles: Path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """CreateVM, StartVM (the real pod VM until its agent answers through the proxy), StopVM."""
    provider = Timed(provider)
    caa = Caa(CaaConfig(socket=work / f"hv-{sid}.sock", pods_dir=work / "pods",
                        reconcile_interval=0, proxy_timeout=900), provider)  # fmt: skip
    await caa.start()
    try:
        async with await Client.connect(f"unix://{work}/hv-{sid}.sock") as shim:
            t0 = time.perf_counter()
            req = hypervisor_pb2.CreateVMRequest(id=sid, annotations=PODVM_POD)
            await shim.call(HYPERVISOR.name, "CreateVM", req, hypervisor_pb2.CreateVMResponse)
            t1 = time.perf_counter()
            await shim.call(HYPERVISOR.name, "StartVM", hypervisor_pb2.StartVMRequest(id=sid),
                            hypervisor_pb2.StartVMResponse, timeout=900)  # fmt: skip
            t2 = time.perf_counter()
            for log in consoles.rglob("console.log"):
                lines = log.read_text(errors="replace").splitlines()
                print("\n".join(ln for ln in lines if ln.startswith("coco-podvm: ")))
            await shim.call(HYPERVISOR.name, "StopVM", hypervisor_pb2.StopVMRequest(id=sid),
                            hypervisor_pb2.StopVMResponse)  # fmt: skip
            t3 = time.perf_counter()
    finally:
        await caa.stop()
    return {"CreateVM": t1 - t0, "create_instance": provider.create,
            "boot+agent ready": (t2 - t1) - provider.create, "StartVM": t2 - t1, "StopVM": t3 - t2}  # fmt: skip


async def one_run(provider_factory, work: Path, sid: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    port = free_port()
    provider = Timed(provider_factory(f"relay=10.0.2.2:{port}"))
    agent = Server()
    agent.register(AGENT, StubAgent())
    agent.register(HEALTH, {"Check": lambda r, c: health_pb2.HealthCheckResponse(status=1)})
    agent_addr = await agent.listen(f"unix://{work}/agent-{sid}.sock")
    caa = Caa(CaaConfig(socket=work / f"hv-{sid}.sock", pods_dir=work / "pods",
                        reconcile_interval=0, proxy_timeout=300), provider)  # fmt: skip
    await caa.start()
    fwd = None
    try:
        async with await Client.connect(f"unix://{work}/hv-{sid}.sock") as shim:
            t0 = time.perf_counter()
            req = hypervisor_pb2.CreateVMRequest(id=sid, annotations=POD)
            await shim.call(HYPERVISOR.name, "CreateVM", req, hypervisor_pb2.CreateVMResponse)
            t1 = time.perf_counter()
            # the VM's side: its userdata configures the forwarder the VM relays to
            files = parse_cloud_config(caa.store.userdata(sid).encode(), "userdata")
            apf = work / f"apf-{sid}.json"
            apf.write_bytes(next(f.content for f in files if f.path.endswith("apf.json")))
            fwd = Forwarder(agent_addr, ForwarderConfig.load(apf).ssl_context(str(apf)), "")
            await fwd.listen(f"127.0.0.1:{port}")
            t2 = time.perf_counter()
            await shim.call(HYPERVISOR.name, "StartVM", hypervisor_pb2.StartVMRequest(id=sid),
                            hypervisor_pb2.StartVMResponse, timeout=300)  # fmt: skip
            t3 = time.perf_counter()
            await shim.call(HYPERVISOR.name, "StopVM", hypervisor_pb2.StopVMRequest(id=sid),
                            hypervisor_pb2.StopVMResponse)  # fmt: skip
            t4 = time.perf_counter()
    finally:
        if fwd is not None:
            await fwd.stop()
        await caa.stop()
        await agent.stop(grace=1)
    return {"CreateVM": t1 - t0, "create_instance": provider.create,
            "boot+forwarder": (t3 - t2) - provider.create, "StartVM": t3 - t2, "StopVM": t4 - t3}  # fmt: skip


def bare_boot(image: Path, work: Path) -> float:
    """qemu with the same image and forward, until a byte goes through the VM's 15150 and back."""
    host_port, relay_port = free_port(), free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", relay_port))
    listener.listen()
    t = time.perf_counter()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", "1",
         "-nodefaults", "-display", "none", "-no-reboot", "-kernel", str(image / "vmlinuz"),
         "-initrd", str(image / "initrd.img"), "-append",
         f"console=ttyS0 quiet panic=-1 relay=10.0.2.2:{relay_port}",
         "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{host_port}-:15150",
         "-device", "virtio-net-pci,netdev=n0", "-serial", f"file:{work}/bare.log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", host_port), timeout=2) as c:
                    c.sendall(b"x")
                    listener.settimeout(1)
                    peer, _ = listener.accept()
                    with peer:
                        if peer.recv(1) == b"x":
                            return time.perf_counter() - t
            except OSError:
                time.sleep(0.1)
    finally:
        qemu.kill()
        qemu.wait()
        listener.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--podvm-image", type=Path, help="Real pod VMs from this image directory.")
    opts = ap.parse_args()
    if opts.podvm_image is not None:
        return podvm_main(opts.podvm_image.absolute(), opts.runs)
    results: dict[str, list[dict[str, float]]] = {"libvirt": [], "qemu": []}
    bare: list[float] = []
    with start_libvirtd() as lv:
        image = make_tiny_image(lv.base / "tiny")
        work = Path(tempfile.mkdtemp(prefix="bpp-", dir="/tmp"))
        try:
            factories = {
                "libvirt": lambda arg: LibvirtProvider(LibvirtConfig(
                    uri=lv.uri, image=image, data_dir=lv.data_dir, kernel_args=(arg,))),
                "qemu": lambda arg: QemuProvider(image, work / "vms", kernel_args=(arg,)),
            }  # fmt: skip
            for i in range(opts.runs):
                bare.append(bare_boot(image, work))
                for name, factory in factories.items():
                    sid = f"{name}{i:02d}" + "0" * 8
                    results[name].append(asyncio.run(one_run(factory, work, sid)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(bare)
    print(
        f"bare qemu boot to a round trip through the VM's 15150: {base:.2f} s (median of {len(bare)})"
    )
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in med.items())
        print(f"{name:8s} {parts}; StartVM / bare boot = {med['StartVM'] / base:.2f}")


def podvm_main(image: Path, runs: int) -> None:
    results: dict[str, list[dict[str, float]]] = {"libvirt": [], "qemu": []}
    with start_libvirtd() as lv:
        work = Path(tempfile.mkdtemp(prefix="bpp-", dir="/tmp"))
        try:
            providers = {
                "libvirt": lambda: LibvirtProvider(LibvirtConfig(
                    uri=lv.uri, image=image, data_dir=lv.data_dir, memory=2048, vtpm=True)),
                "qemu": lambda: QemuProvider(image, work / "vms"),
            }  # fmt: skip
            for i in range(runs):
                for name, make in providers.items():
                    sid = f"{name}{i:02d}" + "0" * 8
                    consoles = lv.data_dir if name == "libvirt" else work / "vms"
                    results[name].append(asyncio.run(podvm_run(make(), work, sid, consoles)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for name, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{name:8s} " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))


if __name__ == "__main__":
    main()
