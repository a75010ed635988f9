"""Step 1 of the demo, the owner's side and the node: a KBS, a registry, and a containerd.

* ``coco kbs serve`` on loopback with SQLite storage, its admin API behind an Ed25519 key whose
  signed token the owner's tools present;
* Debian's ``docker-registry`` on loopback (plain HTTP: the guest and containerd are told so);
* a containerd of the demo's own (root, state, sockets, CNI config under the work directory),
  with coco's runtime handlers and coco's snapshotter added by ``coco runtime install``, the way a
  node gets them; ``coco snapshotter serve`` runs beside it, so that the encrypted image the CRI
  pulls is left to the guest instead of being unpacked (and failing) on the host. Pod
  networking comes from a small CNI plugin written here that keeps the pod's network inside the
  pod's namespace (a veth pair whose both ends stay there), so the host's network is untouched;
* for coco-qemu, the pod VM image (``coco podvm build``, cached by content) and the node's vTPM:
  one swtpm state every pod VM boots a copy of, whose attestation key the owner reads with
  ``coco aa ak-public --tpm-state`` and puts among the KBS's trusted AKs (its TPM verifier's
  ``COCO_TPM_TRUSTED_AK_KEYS_DIR``), as one enrols a node's TPM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coco.demo.session import Blocked, DemoError, Session, free_port, listening

CNI_PLUGIN = r'''#!{python}
"""coco-demo-veth: a CNI plugin that keeps a pod's network inside the pod's namespace."""
import hashlib, json, os, subprocess, sys

cmd = os.environ.get("CNI_COMMAND", "")
conf = json.loads(sys.stdin.read() or "{{}}")
version = conf.get("cniVersion", "0.4.0")
if cmd == "VERSION":
    print(json.dumps({{"cniVersion": version, "supportedVersions": ["0.3.1", "0.4.0"]}}))
    sys.exit(0)
if cmd != "ADD":
    sys.exit(0)
netns, ifname = os.environ["CNI_NETNS"], os.environ.get("CNI_IFNAME", "eth0")
with open(conf["record"], "a") as record:  # the demo's clean-up checks these are gone
    record.write(json.dumps({{"sandbox": os.environ["CNI_CONTAINERID"], "netns": netns}}) + "\n")
h = hashlib.sha256(os.environ["CNI_CONTAINERID"].encode()).digest()
addr = "10.251.%d.%d" % (h[0], 2 + h[1] % 250)
for args in (["link", "add", ifname, "type", "veth", "peer", "name", "demo0"],
             ["addr", "add", addr + "/16", "dev", ifname],
             ["link", "set", ifname, "up"], ["link", "set", "demo0", "up"]):
    subprocess.run(["nsenter", "--net=" + netns, "ip", *args], check=True, capture_output=True)
print(json.dumps({{"cniVersion": version, "interfaces": [{{"name": ifname, "sandbox": netns}}],
                  "ips": [{{"version": "4", "address": addr + "/16", "interface": 0}}]}}))
'''


@dataclass
class Kbs:
    url: str  # as this host reaches it
    port: int
    admin_key: Path  # Ed25519 private key (PEM) signing the admin token
    admin_token: Path  # a ready admin token file for `coco kbs-client`

    def config(self, session: Session, *args: str, what: str = "") -> None:
        session.run(
            ["coco", "kbs-client", "--url", self.url, "config", "--admin-token-file",
             str(self.admin_token), *args],
            what=what,
        )  # fmt: skip


@dataclass
class Containerd:
    base: Path
    config: Path
    state: Path  # containerd's state directory (the pods' bundles are under it)
    address: Path
    coco_config_dir: Path
    local_state: Path  # the local sandbox's state directory (short: its sockets live there)

    @property
    def endpoint(self) -> str:
        return f"unix://{self.address}"


def start_kbs(session: Session) -> Kbs:
    """The KBS; its TPM verifier trusts the attestation keys in ``kbs/trusted-aks`` (empty until
    the owner enrols a node's vTPM: :func:`enrol_vtpm`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from coco.protocol.admin import admin_token, load_admin_key

    d = session.work / "kbs"
    d.mkdir()
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    (d / "admin.pem").write_bytes(pem)
    (d / "admin.pem").chmod(0o600)
    (d / "admin.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    token = d / "admin.token"
    token.write_text(admin_token(load_admin_key(pem, str(d / "admin.pem"))))
    token.chmod(0o600)
    port = free_port()
    (d / "trusted-aks").mkdir(mode=0o700)
    session.spawn(
        "kbs",
        ["coco", "kbs", "serve", "--listen", f"127.0.0.1:{port}", "--insecure-http",
         "--storage", f"sqlite://{d / 'kbs.db'}", "--admin-public-key", str(d / "admin.pub")],
        env={"COCO_TPM_TRUSTED_AK_KEYS_DIR": str(d / "trusted-aks")},
        ready=listening(port),
        reach=f"http://127.0.0.1:{port} (SQLite {d / 'kbs.db'}, admin API behind an Ed25519 key)",
    )  # fmt: skip
    return Kbs(f"http://127.0.0.1:{port}", port, d / "admin.pem", token)


def start_registry(session: Session) -> str:
    d = session.work / "registry"
    d.mkdir()
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(d / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    (d / "config.yml").write_text(json.dumps(config))
    host = f"127.0.0.1:{port}"
    session.spawn(
        "docker-registry",
        ["docker-registry", "serve", str(d / "config.yml")],
        ready=listening(port),
        reach=f"{host} (plain HTTP, blobs under {d / 'data'})",
    )
    return host


def registry_blob(session: Session, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return (
        session.work / "registry" / "data" / "docker" / "registry" / "v2" / "blobs" / algo
        / hexd[:2] / hexd / "data"
    )  # fmt: skip


def start_containerd(
    session: Session, registry: str, pause_image: str, podvm_image: Path | None = None,
    remote_socket: Path | None = None,
) -> Containerd:  # fmt: skip
    """containerd with everything under the work directory and coco's runtime installed (with
    ``podvm_image``, coco-qemu's pod VM image; with ``remote_socket``, where coco-remote finds
    the cloud-api-adaptor)."""
    for tool in ("containerd", "runc", "ctr", "nsenter", "ip"):
        if shutil.which(tool) is None:
            raise Blocked(f"{tool} is not installed (scripts/install-system-deps)")
    if os.geteuid() != 0:
        raise Blocked("containerd needs root: run the demo as root")
    import tomlkit

    base = session.work / "containerd"
    base.mkdir()
    default = subprocess.run(
        ["containerd", "config", "default"], check=True, capture_output=True, text=True
    ).stdout
    doc = tomlkit.parse(default)
    doc["root"] = str(base / "root")
    doc["state"] = str(base / "state")
    doc["grpc"]["address"] = str(base / "c.sock")  # type: ignore[index]
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]  # type: ignore[index]
    cri["sandbox_image"] = pause_image
    cri["restrict_oom_score_adj"] = True
    cri["cni"]["bin_dir"] = str(base / "cni-bin")
    cri["cni"]["conf_dir"] = str(base / "cni-conf")
    cri["registry"]["config_path"] = str(base / "certs.d")
    hosts = base / "certs.d" / registry
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        f'server = "http://{registry}"\n\n[host."http://{registry}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    config = base / "config.toml"
    config.write_text(tomlkit.dumps(doc))
    (base / "cni-bin").mkdir()
    (base / "cni-conf").mkdir()
    plugin = base / "cni-bin" / "coco-demo-veth"
    plugin.write_text(CNI_PLUGIN.format(python=sys.executable))
    plugin.chmod(0o755)
    loopback = Path("/usr/lib/cni/loopback")
    if not loopback.exists():
        raise Blocked("containernetworking-plugins is not installed (scripts/install-system-deps)")
    (base / "cni-bin" / "loopback").symlink_to(loopback)
    (base / "cni-conf" / "10-coco-demo.conf").write_text(
        json.dumps({"cniVersion": "0.4.0", "name": "coco-demo", "type": "coco-demo-veth",
                    "record": str(base / "pods.jsonl")})
    )  # fmt: skip
    session.say(
        "coco's runtime handlers and its snapshotter go into this containerd's config, as on a "
        "node:"
    )
    snapshots = base / "snap.sock"
    session.run(
        ["coco", "runtime", "install", "--containerd-config", str(config),
         "--config-dir", str(base / "coco"), "--shim-link-dir", str(base / "bin"),
         "--snapshotter", str(snapshots),
         *(["--podvm-image", str(podvm_image)] if podvm_image else []),
         *(["--remote-hypervisor-socket", str(remote_socket)] if remote_socket else [])]
    )  # fmt: skip
    # the local sandbox keeps its per-pod state (Unix sockets) in a short directory of ours
    state = Path(tempfile.mkdtemp(prefix="coco-demo-st-", dir="/tmp"))
    session.dirs.append(state)
    session.say(f"local sandbox state: {state} (short: the guest's sockets live there)")
    session.on_close("mounts under the local sandbox state", lambda: umount_under(state))
    local = base / "coco" / "configuration-local.toml"
    local.write_text(local.read_text() + f'\n[runtime]\nstate_dir = "{state}"\n')
    ctrd = Containerd(base, config, base / "state", base / "c.sock", base / "coco", state)
    session.on_close("containerd's pods", lambda: remove_pods(ctrd))
    session.on_close("mounts under the work directory", lambda: umount_under(session.work))
    session.on_close(
        "the pods' namespaces and shim sockets", lambda: remove_pod_state(session, ctrd), after=True
    )
    session.spawn(
        "snapshotter",
        ["coco", "snapshotter", "serve", "--socket", str(snapshots), "--root", str(base / "snap"),
         "--containerd-address", str(ctrd.address)],
        ready=snapshots.exists,
        reach=f"{snapshots} (containerd's CRI snapshotter; encrypted images are left to the guest)",
    )  # fmt: skip
    path = f"{base / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    session.spawn(
        "containerd",
        ["containerd", "--config", str(config)],
        env={"PATH": path},  # containerd 1.6 finds shims by name on its PATH
        ready=lambda: _answers(ctrd.address),
        timeout=60,
        reach=f"{ctrd.endpoint} (root, state and CNI under {base})",
    )
    return ctrd


def remove_pod_state(session: Session, ctrd: Containerd) -> None:
    """Look for what the pods of this containerd may leave outside its directories (their
    network namespaces under /var/run/netns, their shims' sockets in /run/containerd/s, named by
    the digest of containerd's address, the namespace and the sandbox id), once containerd has
    stopped; remove what is there. Both lists go into the session (``checked``, ``removed``)."""
    from coco.host.runtime.shim import socket_address

    for pod in _recorded_pods(ctrd):
        sock = socket_address(str(ctrd.address), "k8s.io", pod["sandbox"]).removeprefix("unix://")
        for path in (Path(pod["netns"]), Path(sock)):
            session.checked.append(str(path))
            if os.path.lexists(path):
                session.removed.append(str(path))
                subprocess.run(["umount", str(path)], check=False, capture_output=True)
                path.unlink()
    if session.removed:
        session.say(f"removed what the pods left: {', '.join(session.removed)}")


def plaintext_on_host(ctrd: Containerd, name: str) -> list[Path]:
    """Files called ``name`` under containerd's and the snapshotter's directories."""
    found = []
    for top, _, files in os.walk(ctrd.base):  # directories vanishing meanwhile are skipped
        found += [Path(top, name) for f in files if f == name]
    return found


def _answers(address: Path) -> bool:
    if not address.exists():
        return False
    r = subprocess.run(["ctr", "--address", str(address), "version"], capture_output=True)
    return r.returncode == 0


def remove_pods(ctrd: Containerd) -> None:
    """Stop and remove every pod sandbox containerd still has (after a failure or Ctrl-C; an
    interrupted `coco pod run` removes its own, even one containerd was still making)."""
    from coco.errors import CocoError
    from coco.host.pod.cri import CriClient

    with contextlib.suppress(CocoError), CriClient(ctrd.endpoint, timeout=60) as client:
        for s in client.list_sandboxes():
            for step in (client.stop_sandbox, client.remove_sandbox):
                with contextlib.suppress(CocoError):
                    step(s.id)


def _recorded_pods(ctrd: Containerd) -> list[dict[str, str]]:
    record = ctrd.base / "pods.jsonl"
    return [json.loads(ln) for ln in record.read_text().splitlines()] if record.exists() else []


def umount_under(base: Path) -> None:
    prefix = str(base) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False, capture_output=True)


def podvm_image(session: Session, given: Path | None) -> Path:
    """The pod VM image: ``given``, else ``coco podvm build``'s (built once, then cached)."""
    if given is not None:
        session.say(f"the pod VM image: {given} (given)")
        return given
    session.say(
        "the pod VM image (Debian's kernel, an initramfs, a root with coco's guest components): "
        "built once, then found in the cache by its content"
    )
    out = session.run(["coco", "podvm", "build"], timeout=3600, what="building the pod VM image")
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    path = Path(lines[-1]) if lines else None
    if path is None or not (path / "vmlinuz").exists():
        raise DemoError(f"coco podvm build printed no image directory: {lines[-1:]}")
    return path


def enrol_vtpm(session: Session, ctrd: Containerd) -> Path:
    """The node's vTPM: a swtpm state every pod VM boots a copy of; its attestation key goes
    into the KBS's trusted AKs, as an owner enrols a node. Returns the state directory."""
    state = ctrd.base / "vtpm"
    out = session.run(
        ["coco", "aa", "ak-public", "--tpm-state", str(state)],
        what="enrolling the node's vTPM", show=False,
    )  # fmt: skip
    trusted = session.work / "kbs" / "trusted-aks" / "node.pub"
    trusted.write_text(out.stdout)
    session.say(f"its attestation key, now trusted by the KBS's TPM verifier ({trusted}):")
    session.show(out.stdout)
    return state


def configure_qemu(session: Session, ctrd: Containerd, vtpm: Path) -> Path:
    """coco-qemu's runtime config: the node's vTPM, TCG-sized timeouts, the short state dir."""
    import tomlkit

    path = ctrd.coco_config_dir / "configuration-qemu.toml"
    doc = tomlkit.parse(path.read_text())
    qemu = doc["hypervisor"]["qemu"]  # type: ignore[index]
    qemu["tpm_state"] = str(vtpm)
    qemu["boot_timeout"] = 600
    doc["agent"] = {"kata": {"dial_timeout": 600, "create_container_timeout": 900}}
    doc["runtime"] = {"state_dir": str(ctrd.local_state)}
    path.write_text(tomlkit.dumps(doc))
    session.say(f"coco-qemu's runtime config ({path}):")
    session.show(path.read_text())
    return path
