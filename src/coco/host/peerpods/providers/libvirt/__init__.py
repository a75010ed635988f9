"""The ``libvirt`` provider: pod VMs as libvirt domains (libvirt-python, any libvirtd).

Each VM is a domain named :func:`~coco.host.peerpods.provider.instance_name` with, in its own
directory under ``--data-dir``:

* ``root.qcow2``: a copy-on-write overlay on the pod VM image's ``root.img`` (``qemu-img``);
* ``cidata.iso``: the userdata as a cloud-init config drive (ISO 9660 labelled ``cidata`` holding
  ``user-data``, ``meta-data``, ``vendor-data``; ``genisoimage``), read by ``coco
  process-user-data`` (or cloud-init in an upstream image);
* ``initdata.img``: the initdata disk the guest's init extends into PCR 8 (with ``--vtpm``);
* direct kernel boot of the image's ``vmlinuz`` + ``initrd.img``, ``<features><acpi/>``, the
  serial console to ``console.log``.

Networking: ``--network-name user`` (the default) gives the domain QEMU user networking with a
host forward ``127.0.0.1:<free port> -> 15150`` (no bridge or DHCP needed: this machine has
none); any other name attaches the domain to that libvirt network and waits for its DHCP lease,
as upstream does. The domain type is ``kvm`` where KVM works, else ``qemu`` (TCG).

Tags (CAA id, sandbox id, forwarded port) live in the domain's ``<metadata>``, so
:meth:`LibvirtProvider.list_instances` finds this CAA's domains after a restart.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from coco.host.peerpods.provider import (
    Instance,
    InstanceTypeSpec,
    Provider,
    ProviderError,
    ProviderFactory,
    Tags,
    guest_last_words,
    instance_name,
)
from coco.host.podvm.boot import KERNEL_ARGS

META_NS = "https://confidentialcontainers.org/coco/peerpod/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

FORWARDER_PORT = 15150
USER_NETWORK = "user"


@dataclass
class LibvirtConfig:
    uri: str = "qemu:///system"
    network: str = USER_NETWORK
    image: Path | None = None  # a `coco podvm build` directory: vmlinuz, initrd.img, root.img
    data_dir: Path = Path("/var/lib/coco/peerpods/libvirt")
    cpu: int = 2
    memory: int = 8192
    domain_type: str = ""  # "" = kvm where it works, else qemu
    vtpm: bool = False
    kernel_args: tuple[str, ...] = ()
    ip_timeout: float = 60.0


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise ProviderError(
            "libvirt provider: the Python module libvirt is missing: install coco with the "
            "`libvirt` extra (pip install 'confidential-containers[libvirt]'; it builds against libvirt-dev)"
        ) from None
    return libvirt


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pkg = {"qemu-img": "qemu-utils", "genisoimage": "genisoimage"}.get(name, name)
        raise ProviderError(f"libvirt provider: {name} not found: install the Debian package {pkg}")
    return path


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ProviderError(f"{what}: {Path(cmd[0]).name} failed: {last}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config_drive(userdata: str, name: str, out: Path) -> None:
    """An ISO 9660 volume ``cidata`` with user-data, meta-data and vendor-data (Rock Ridge +
    Joliet names), as cloud-init's NoCloud reads it."""
    with tempfile.TemporaryDirectory(prefix="cidata-", dir=out.parent) as tmp:
        d = Path(tmp)
        (d / "user-data").write_text(userdata)
        (d / "meta-data").write_text(f"instance-id: {name}\nlocal-hostname: {name}\n")
        (d / "vendor-data").write_text("")
        _run([_tool("genisoimage"), "-quiet", "-output", str(out), "-volid", "cidata",
              "-joliet", "-rock", str(d / "user-data"), str(d / "meta-data"),
              str(d / "vendor-data")], "config drive")  # fmt: skip


class LibvirtProvider(Provider):
    name = "libvirt"

    def __init__(self, config: LibvirtConfig) -> None:
        self.config = config
        self._conn: Any = None
        self._lock = threading.Lock()

    # -- connection ------------------------------------------------------------------------------
    def conn(self) -> Any:
        with self._lock:
            if self._conn is None:
                libvirt = _libvirt()
                libvirt.registerErrorHandler(
                    lambda *_: None, None
                )  # errors are raised, not printed
                try:
                    self._conn = libvirt.open(self.config.uri)
                except libvirt.libvirtError as e:
                    raise ProviderError(
                        f"libvirt provider: cannot connect to {self.config.uri}: "
                        f"{e.get_error_message()}"
                    ) from None
            return self._conn

    def teardown(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    def config_verifier(self) -> None:
        c = self.config
        if c.cpu < 1 or c.memory < 256:
            raise ProviderError(
                f"libvirt provider: expected --cpu >= 1 and --memory >= 256, found {c.cpu} and "
                f"{c.memory}"
            )
        if c.image is None:
            raise ProviderError(
                "libvirt provider: --podvm-image: expected a pod VM image directory"
            )
        missing = [f for f in ("vmlinuz", "initrd.img", "root.img") if not (c.image / f).is_file()]
        if missing:
            raise ProviderError(
                f"libvirt provider: pod VM image {c.image}: missing {', '.join(missing)}"
            )
        conn = self.conn()
        if c.network != USER_NETWORK:
            try:
                conn.networkLookupByName(c.network)
            except _libvirt().libvirtError:
                raise ProviderError(
                    f"libvirt provider: network {c.network!r} not found at {c.uri}"
                ) from None

    # -- instances -------------------------------------------------------------------------------
    def _domain_type(self) -> str:
        if self.config.domain_type:
            return self.config.domain_type
        from coco.host.podvm.boot import detect_accel

        return "kvm" if detect_accel() == "kvm" else "qemu"

    def domain_xml(
        self, name: str, spec: InstanceTypeSpec, tags: Tags, vm_dir: Path, port: int,
        initdata: bool,
    ) -> str:  # fmt: skip
        c = self.config
        assert c.image is not None
        vcpus = spec.vcpus or c.cpu
        memory = spec.memory or c.memory
        q = quoteattr
        disks = [
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file={q(str(vm_dir / 'root.qcow2'))}/><target dev='vda' bus='virtio'/></disk>",
            f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file={q(str(vm_dir / 'cidata.iso'))}/><target dev='vdb' bus='virtio'/>"
            "<readonly/></disk>",
        ]
        if initdata:
            disks.append(
                f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                f"<source file={q(str(vm_dir / 'initdata.img'))}/>"
                "<target dev='vdc' bus='virtio'/><readonly/></disk>"
            )
        if c.network == USER_NETWORK:
            net = ""
            qemu_args = ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{FORWARDER_PORT}",
                         "-device", "virtio-net-pci,netdev=n0,bus=pcie.0,addr=0x10"]  # fmt: skip
        else:
            net = f"<interface type='network'><source network={q(c.network)}/><model type='virtio'/></interface>"
            qemu_args = []
        tpm = (
            "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>" if c.vtpm else ""
        )
        cmdline = " ".join((*KERNEL_ARGS, "coco.peerpod=1", *c.kernel_args))
        extra = "".join(f"<qemu:arg value={q(a)}/>" for a in qemu_args)
        return (
            f"<domain type={q(self._domain_type())} xmlns:qemu={q(QEMU_NS)}>"
            f"<name>{name}</name>"
            f"<metadata><coco:peerpod xmlns:coco={q(META_NS)} caa={q(tags.caa)} "
            f"sandbox={q(tags.sandbox)} port='{port}'/></metadata>"
            f"<memory unit='MiB'>{memory}</memory><vcpu>{vcpus}</vcpu>"
            f"<os><type arch='x86_64' machine='q35'>hvm</type>"
            f"<kernel>{c.image / 'vmlinuz'}</kernel><initrd>{c.image / 'initrd.img'}</initrd>"
            f"<cmdline>{cmdline}</cmdline></os>"
            "<features><acpi/></features>"
            "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>"
            f"<devices>{''.join(disks)}{net}"
            f"<serial type='file'><source path={q(str(vm_dir / 'console.log'))}/>"
            "<target port='0'/></serial>"
            f"<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>{tpm}"
            "</devices>"
            f"{f'<qemu:commandline>{extra}</qemu:commandline>' if extra else ''}"
            "</domain>"
        )

    def create_instance(
        self,
        pod_name: str,
        sandbox_id: str,
        userdata: str,
        spec: InstanceTypeSpec,
        tags: Tags,
        initdata: bytes | None = None,
    ) -> Instance:
        libvirt = _libvirt()
        c = self.config
        if c.image is None:
            raise ProviderError("libvirt provider: no pod VM image configured (--podvm-image)")
        name = instance_name(pod_name, sandbox_id)
        conn = self.conn()
        try:
            dom = conn.lookupByName(name)
            return self._instance(dom)
        except libvirt.libvirtError:
            pass
        vm_dir = c.data_dir / name
        dom = None
        try:
            vm_dir.mkdir(parents=True, exist_ok=False)
            os.chmod(vm_dir, 0o755)
            backing = (Path(spec.image) if spec.image else c.image / "root.img").resolve()
            _run([_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                  str(backing), str(vm_dir / "root.qcow2")], "root disk overlay")  # fmt: skip
            make_config_drive(userdata, name, vm_dir / "cidata.iso")
            if initdata is not None:
                from coco.integrity.initdata import encode_image

                (vm_dir / "initdata.img").write_bytes(encode_image(initdata))
            _give_to_owner_of(c.data_dir, vm_dir)
            port = free_port() if c.network == USER_NETWORK else 0
            xml = self.domain_xml(name, spec, tags, vm_dir, port, initdata is not None)
            dom = conn.defineXML(xml)
            dom.create()
            inst = self._instance(dom)
            if not inst.ips:
                inst = self._wait_for_lease(dom, inst)
            return inst
        except libvirt.libvirtError as e:
            uuid = dom.UUIDString() if dom is not None else ""
            if not uuid:
                shutil.rmtree(vm_dir, ignore_errors=True)
            raise ProviderError(
                f"libvirt provider: creating domain {name}: {e.get_error_message()}", uuid
            ) from None
        except BaseException:
            if dom is None:
                shutil.rmtree(vm_dir, ignore_errors=True)
                raise
            raise ProviderError(
                f"libvirt provider: creating domain {name} failed", dom.UUIDString()
            ) from None

    def _wait_for_lease(self, dom: Any, inst: Instance) -> Instance:
        libvirt = _libvirt()
        deadline = time.monotonic() + self.config.ip_timeout
        while time.monotonic() < deadline:
            try:
                ifaces = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
            except libvirt.libvirtError:
                ifaces = {}
            ips = [a["addr"] for i in ifaces.values() for a in (i.get("addrs") or [])
                   if a.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4]  # fmt: skip
            if ips:
                return Instance(inst.id, inst.name, tuple(ips), inst.tags)
            time.sleep(3)
        raise ProviderError(
            f"libvirt provider: domain {inst.name} got no DHCP lease on network "
            f"{self.config.network!r} within {self.config.ip_timeout:g} s",
            inst.id,
        )

    def _instance(self, dom: Any) -> Instance:
        tags, port = _tags(dom.XMLDesc(0))
        ips: tuple[str, ...] = ("127.0.0.1",) if port else ()
        return Instance(dom.UUIDString(), dom.name(), ips, tags, port or None)

    def delete_instance(self, instance_id: str) -> None:
        libvirt = _libvirt()
        conn = self.conn()
        try:
            dom = conn.lookupByUUIDString(instance_id)
        except libvirt.libvirtError:
            return  # already gone
        name = dom.name()
        try:
            if dom.isActive():
                dom.destroy()
            try:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError:
                dom.undefine()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise ProviderError(
                    f"libvirt provider: deleting domain {name}: {e.get_error_message()}",
                    instance_id,
                ) from None
        shutil.rmtree(self.config.data_dir / name, ignore_errors=True)

    def stopped(self, instance_id: str) -> str | None:
        libvirt = _libvirt()
        try:
            dom = self.conn().lookupByUUIDString(instance_id)
            if dom.isActive():
                return None
            name = dom.name()
        except (libvirt.libvirtError, ProviderError):
            return None  # cannot tell
        log = self.config.data_dir / name / "console.log"
        return f"domain {name} is shut off: {guest_last_words(log)}"

    def list_instances(self, caa: str) -> list[Instance]:
        libvirt = _libvirt()
        out = []
        try:
            domains = self.conn().listAllDomains(0)
        except libvirt.libvirtError as e:
            raise ProviderError(
                f"libvirt provider: listing domains: {e.get_error_message()}"
            ) from None
        for dom in domains:
            try:
                inst = self._instance(dom)
            except libvirt.libvirtError:
                continue  # went away meanwhile
            if inst.tags is not None and inst.tags.caa == caa:
                out.append(inst)
        return out


def _give_to_owner_of(data_dir: Path, vm_dir: Path) -> None:
    """Hand the VM's files to the owner of ``data_dir``: the user QEMU runs as under a session
    libvirtd (under the system one, libvirt's dynamic ownership takes over from root)."""
    st = data_dir.stat()
    if os.geteuid() != 0 or st.st_uid == 0:
        return
    for path in (vm_dir, *vm_dir.iterdir()):
        os.chown(path, st.st_uid, st.st_gid)


def _tags(xml: str) -> tuple[Tags | None, int]:
    root = ET.fromstring(xml)
    el = root.find(f"metadata/{{{META_NS}}}peerpod")
    if el is None:
        return None, 0
    port = el.get("port", "0")
    return Tags(el.get("caa", ""), el.get("sandbox", "")), int(port) if port.isdigit() else 0


class LibvirtFactory(ProviderFactory):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        env = os.environ.get
        parser.add_argument("--uri", default=env("LIBVIRT_URI", "qemu:///system"),
                            help="libvirt URI (LIBVIRT_URI; default qemu:///system).")  # fmt: skip
        parser.add_argument(
            "--network-name", default=env("LIBVIRT_NET", USER_NETWORK),
            help="libvirt network, or 'user' for QEMU user networking with a forwarded port "
            "(LIBVIRT_NET; default user).",
        )  # fmt: skip
        parser.add_argument("--podvm-image", type=Path, default=env("PODVM_IMAGE"),
                            help="The pod VM image directory (`coco podvm build -o DIR`; PODVM_IMAGE).")  # fmt: skip
        parser.add_argument("--data-dir", type=Path,
                            default=Path(env("LIBVIRT_DATA_DIR", "/var/lib/coco/peerpods/libvirt")),
                            help="Where each VM's disks and console log go.")  # fmt: skip
        parser.add_argument("--cpu", type=int, default=int(env("LIBVIRT_CPU", "2")),
                            help="vCPUs when the pod asks none (LIBVIRT_CPU; default 2).")  # fmt: skip
        parser.add_argument("--memory", type=int, default=int(env("LIBVIRT_MEMORY", "8192")),
                            help="MiB when the pod asks none (LIBVIRT_MEMORY; default 8192).")  # fmt: skip
        parser.add_argument("--vtpm", action="store_true", default=env("LIBVIRT_VTPM") == "true",
                            help="Give each VM a vTPM (swtpm through libvirt) and the initdata disk.")  # fmt: skip

        parser.add_argument("--kernel-arg", dest="kernel_args", action="append", default=[],
                            metavar="ARG", help="An extra kernel argument for the pod VMs (repeatable).")  # fmt: skip

    def new_provider(self, args: argparse.Namespace) -> Provider:
        return LibvirtProvider(
            LibvirtConfig(
                uri=args.uri,
                network=args.network_name,
                image=Path(args.podvm_image) if args.podvm_image else None,
                data_dir=args.data_dir,
                cpu=args.cpu,
                memory=args.memory,
                vtpm=args.vtpm,
                kernel_args=tuple(args.kernel_args),
            )
        )


FACTORY = LibvirtFactory()
