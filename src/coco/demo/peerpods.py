"""Step 6 of the demo, peer pods: the same pod on the ``coco-remote`` runtime class.

coco's shim asks a cloud-api-adaptor (``coco cloud-api-adaptor serve``) for the pod's VM instead
of starting it; the CAA's provider boots the same pod VM image in peer-pod mode (the userdata on a
config drive, the forwarder in the guest behind a forwarded port, reached by the CAA's agent proxy
over mutual TLS), with a vTPM that is a copy of the node's enrolled one and the pod's initdata
bound into PCR 8, so the KBS releases the secret under the same resource policy.

The provider is ``qemu`` (the VMs are the CAA's children). libvirt's provider gives each domain a
vTPM of libvirt's own making, whose attestation key no owner enrolled, so the KBS would rightly
refuse it: the demo says so and does not use it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from coco.demo.owner import Containerd
from coco.demo.session import Session

POD_NETWORK_NAMESPACE = "/run/netns/podns"  # the forwarder's (coco forwarder serve's default)
LIBVIRT_NOTE = (
    "provider qemu: libvirt's provider gives each domain a new vTPM whose attestation key no "
    "owner enrolled, which the KBS would refuse"
)


def short_dir(session: Session) -> Path:
    """A short directory for the CAA (its per-pod agent proxy socket is under a 64-character
    sandbox id, and Unix socket paths are short); removed at clean-up."""
    d = Path(tempfile.mkdtemp(prefix="cd-pp-", dir="/tmp"))
    session.dirs.append(d)
    return d


def start_caa(session: Session, base: Path, image: Path, vtpm: Path, memory: int) -> Path:
    """``coco cloud-api-adaptor serve qemu``; returns its socket (coco-remote's)."""
    socket = base / "hv.sock"
    log = session.work / "logs" / "cloud-api-adaptor.log"
    session.spawn(
        "cloud-api-adaptor",
        ["coco", "cloud-api-adaptor", "serve", "qemu", "--podvm-image", str(image),
         "--data-dir", str(base / "vms"), "--socket", str(socket), "--pods-dir",
         str(base / "pods"), "--reconcile-interval", "0", "--proxy-timeout", "900s",
         "--memory", str(memory), "--tpm-state", str(vtpm)],
        ready=lambda: log.exists() and "serving" in log.read_text(errors="replace"),
        timeout=60,
        reach=f"{socket} (pod VMs under {base / 'vms'}, each with a copy of the node's vTPM)",
    )  # fmt: skip
    return socket


def configure_remote(session: Session, ctrd: Containerd) -> Path:
    """coco-remote's runtime config: TCG-sized timeouts and the short state dir (the socket is
    the one ``coco runtime install --remote-hypervisor-socket`` wrote)."""
    import tomlkit

    path = ctrd.coco_config_dir / "configuration-remote.toml"
    doc = tomlkit.parse(path.read_text())
    doc["hypervisor"]["remote"]["remote_hypervisor_timeout"] = 900  # type: ignore[index]
    doc["agent"] = {"kata": {"dial_timeout": 600, "create_container_timeout": 900}}
    doc["runtime"] = {"state_dir": str(ctrd.local_state)}
    path.write_text(tomlkit.dumps(doc))
    session.say(f"coco-remote's runtime config ({path}):")
    session.show(path.read_text())
    return path


def network_namespace() -> dict[str, object]:
    """genpolicy settings for a peer pod: in the VM, the forwarder puts every container into the
    pod's network namespace (the shim removed the host's), and the agent policy must expect it."""
    from coco.integrity.genpolicy.settings import DEFAULT_SETTINGS

    extra = {"Type": "network", "Path": POD_NETWORK_NAMESPACE}
    return {
        kind: {"Linux": {"Namespaces": [*DEFAULT_SETTINGS[kind]["Linux"]["Namespaces"], extra]}}
        for kind in ("pause_container", "other_container")
    }


def vms_left(base: Path) -> list[str]:
    vms = base / "vms"
    return sorted(v.name for v in vms.iterdir()) if vms.is_dir() else []
