"""The provider interface: what a cloud (or libvirt, or plain qemu) must do for the CAA.

A provider creates and deletes pod VMs; the CAA does everything else (sandboxes, userdata, TLS,
the agent proxy, reconcile). Upstream's four methods are kept (``create_instance``,
``delete_instance``, ``teardown``, ``config_verifier``), plus ``list_instances``, which the CAA
needs to find VMs that no live sandbox owns: every VM a provider creates carries the :class:`Tags`
it was given (the CAA's id and the sandbox id), and ``list_instances`` returns them.

Providers register by name in :data:`PROVIDERS` (module path, loaded on first use), one folder
each under ``coco.host.peerpods.providers``. Methods are blocking: the CAA runs them in threads.
See docs/peerpods-providers.md for the guide a cloud provider follows.
"""

from __future__ import annotations

import argparse
import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from coco.errors import HostError


class PeerPodError(HostError):
    """Peer pods: the CAA, its providers, the proxy, the webhook and the controller."""


class ProviderError(PeerPodError):
    """A provider could not create, find or delete a VM; ``instance_id`` names what it left."""

    def __init__(self, message: str, instance_id: str = "") -> None:
        super().__init__(message)
        self.instance_id = instance_id


@dataclass(frozen=True)
class Tags:
    """What every VM is labelled with, so a CAA can tell its own VMs and their sandboxes."""

    caa: str
    sandbox: str


@dataclass(frozen=True)
class Instance:
    """A VM as a provider reports it: ``id`` is what ``delete_instance`` takes; ``ips[0]`` is
    where the forwarder listens (``forwarder_port`` overrides the CAA's port for providers that
    map it, such as qemu's user networking)."""

    id: str
    name: str
    ips: tuple[str, ...] = ()
    tags: Tags | None = None
    forwarder_port: int | None = None


@dataclass(frozen=True)
class InstanceTypeSpec:
    """What the pod asked for (upstream's InstanceTypeSpec); memory in MiB, 0 = not asked."""

    instance_type: str = ""
    vcpus: int = 0
    memory: int = 0
    gpus: int = 0
    arch: str = ""
    image: str = ""


@dataclass(frozen=True, order=True)
class InstanceType:
    """A size a provider offers; sorted as upstream sorts its list: GPUs, memory, vCPUs."""

    gpus: int
    memory: int
    vcpus: int
    name: str = field(compare=False)


class Provider(ABC):
    """One cloud. Each method raises :class:`ProviderError` with a one-line reason."""

    name: str = ""

    @abstractmethod
    def create_instance(
        self,
        pod_name: str,
        sandbox_id: str,
        userdata: str,
        spec: InstanceTypeSpec,
        tags: Tags,
        initdata: bytes | None = None,
    ) -> Instance:
        """Create and start a VM named :func:`instance_name` that receives ``userdata`` (the
        ``#cloud-config`` text) and carries ``tags``. ``initdata`` (the TOML) goes into the
        launch measurement where the platform has one (the qemu and libvirt providers attach it
        as the initdata disk, which the guest extends into PCR 8 of its vTPM). On failure it removes what it made, or
        raises :class:`ProviderError` with ``instance_id`` set so the CAA can delete it."""

    @abstractmethod
    def delete_instance(self, instance_id: str) -> None:
        """Delete the VM and everything made for it; a VM already gone is not an error."""

    @abstractmethod
    def list_instances(self, caa: str) -> list[Instance]:
        """The VMs tagged with CAA id ``caa`` (with their tags)."""

    def stopped(self, instance_id: str) -> str | None:
        """Why the VM is no longer running (e.g. the last line its guest printed), or None while
        it runs or when the provider cannot tell. The CAA asks while it waits for the VM's
        forwarder, so a VM that powered off fails StartVM at once with the reason."""
        return None

    def teardown(self) -> None:
        """Release connections; VMs stay."""
        return

    def config_verifier(self) -> None:
        """Check the configuration against the cloud (``--cloud-config-verify``)."""
        return


def guest_last_words(console_log: Path) -> str:
    """What a stopped VM's guest said last: its init's error line (``coco-podvm: error: ...``)
    if it printed one, else the console's last line; at most 400 characters."""
    try:
        data = console_log.read_bytes()[-16384:]
    except OSError:
        return "no console log"
    lines = [" ".join(ln.split()) for ln in data.decode(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if ln.startswith("coco-podvm: error")]
    return ((errors or lines or ["the console is empty"])[-1])[:400]


class ProviderFactory(ABC):
    """Upstream's CloudProvider manager: the flags of one provider and how to make it."""

    @abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the provider's flags; each falls back to its upstream environment variable."""

    @abstractmethod
    def new_provider(self, args: argparse.Namespace) -> Provider: ...


# name -> module exposing FACTORY (a ProviderFactory); loaded only when chosen
PROVIDERS: dict[str, str] = {
    "libvirt": "coco.host.peerpods.providers.libvirt",
    "qemu": "coco.host.peerpods.providers.qemu",
}


def get_factory(name: str) -> ProviderFactory:
    module = PROVIDERS.get(name)
    if module is None:
        raise PeerPodError(
            f"cloud provider: expected one of {', '.join(sorted(PROVIDERS))}, found {name!r}"
        )
    return importlib.import_module(module).FACTORY


_UNSAFE = re.compile(r"[^a-z0-9-]")


def instance_name(pod_name: str, sandbox_id: str, limit: int = 63) -> str:
    """``podvm-<pod, sanitised, truncated>-<sandbox id[:8]>``, at most ``limit`` characters."""
    prefix, suffix = "podvm-", f"-{sandbox_id[:8]}"
    pod = _UNSAFE.sub("-", pod_name.lower())[: max(0, limit - len(prefix) - len(suffix))]
    return f"{prefix}{pod}{suffix}"


def parse_instance_types(text: str, where: str) -> list[InstanceType]:
    """``name=VCPUSxMEMORY_MIB[xGPUS],...`` (e.g. ``small=1x512,large=2x2048``), sorted."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, size = item.partition("=")
        parts = size.split("x")
        if not sep or not name or len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
            raise PeerPodError(f"{where}: expected NAME=VCPUSxMEMORY_MIB[xGPUS], found {item!r}")
        vcpus, memory, gpus = (int(p) for p in (*parts, "0")[:3])
        if vcpus < 1 or memory < 256:
            raise PeerPodError(
                f"{where}: {name}: expected at least 1 vCPU and 256 MiB, found {vcpus}x{memory}"
            )
        out.append(InstanceType(gpus, memory, vcpus, name))
    return sorted(out)


def select_instance_type(
    spec: InstanceTypeSpec, types: list[InstanceType], default: str
) -> InstanceType | None:
    """Upstream's order: an explicit type; else with GPUs the smallest type with enough GPUs,
    vCPUs and memory; else with vCPUs and memory the smallest non-GPU type that fits; else the
    default. The result must be in ``types`` (when it is not empty). ``None``: no list is
    configured, so the provider sizes the VM from ``spec`` itself."""
    by_name = {t.name: t for t in types}
    if not types:
        if spec.instance_type:
            raise PeerPodError(
                f"instance type {spec.instance_type!r} asked for, but no instance types are "
                "configured (--instance-types)"
            )
        return None
    chosen = ""
    if spec.instance_type:
        chosen = spec.instance_type
    elif spec.gpus > 0:
        fit = [
            t for t in types if t.gpus >= spec.gpus and t.vcpus >= spec.vcpus
            and t.memory >= spec.memory
        ]  # fmt: skip
        if not fit:
            raise PeerPodError(
                f"no instance type has {spec.gpus} GPUs, {spec.vcpus} vCPUs and {spec.memory} "
                f"MiB; configured: {', '.join(by_name)}"
            )
        chosen = fit[0].name
    elif spec.vcpus and spec.memory:
        fit = [t for t in types if not t.gpus and t.memory >= spec.memory and t.vcpus >= spec.vcpus]
        if not fit:
            raise PeerPodError(
                f"no instance type has {spec.vcpus} vCPUs and {spec.memory} MiB; "
                f"configured: {', '.join(by_name)}"
            )
        chosen = fit[0].name
    chosen = chosen or default or types[0].name
    if chosen not in by_name:
        raise PeerPodError(f"instance type: expected one of {', '.join(by_name)}, found {chosen!r}")
    return by_name[chosen]
