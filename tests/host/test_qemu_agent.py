"""``coco agent serve`` inside the pod VM, driven over the virtio-serial channel as the kata shim
drives it: one TCG boot (QEMU, a swtpm vTPM, the image of ``coco podvm build``) for the module.

The app container's image is pulled inside the guest by the guest's CDH from the session's
docker-registry on the host (plain HTTP, reached at 10.0.2.2 through QEMU's user networking; the
CDH learns it from the initdata's ``cdh.toml``). A tardev layer made on the host by ``coco tardev
convert`` is handed to the guest as a read-only virtio disk and mounted through the guest
kernel's dm-verity with the root hash of the request; a wrong root hash fails the create with a
clear error and leaves nothing (the same container id is created afterwards). The policy in the
initdata lets the pod's requests through and denies ExecProcess, so the gate is checked too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coco.errors import PodVmError
from coco.host.podvm.boot import PodVm
from coco.host.podvm.build import Image
from coco.rpc import Code, RpcError
from coco.rpc.protos import agent_pb2 as pb
from coco.rpc.protos import health_pb2
from tests.conftest import Registry
from tests.guest.test_agent import CID, KATA, SID, Shim, cri_spec
from tests.host._util import processes_mentioning
from tests.imagekit import tar_layer
from tests.integrity.genpolicy.helpers import push

pytestmark = [
    pytest.mark.timeout(1200),  # a cold image build, then a TCG boot and a pull in the guest
    pytest.mark.skipif(os.geteuid() != 0, reason="the pod VM image build needs root"),
]

BUSYBOX = Path("/usr/bin/busybox")
APPLETS = ("sh", "cat", "echo", "sleep", "hostname", "ls", "true", "grep", "ip")
ALLOWED = (
    "CreateSandboxRequest", "DestroySandboxRequest", "GuestDetailsRequest", "CopyFileRequest",
    "CreateContainerRequest", "StartContainerRequest", "RemoveContainerRequest",
    "SignalProcessRequest", "WaitProcessRequest", "ReadStreamRequest", "WriteStreamRequest",
    "CloseStdinRequest",
)  # fmt: skip
LAYER_ID = hashlib.sha256(b"coco-test-tardev-layer").hexdigest()
TARDEV_CID = "f00dcafe" * 8


def _policy() -> str:
    lines = ["package agent_policy", "", "default AllowRequestsFailingPolicy := false"]
    lines += [f"default {name} := true" for name in ALLOWED]
    lines.append("default ExecProcessRequest := false")
    return "\n".join(lines) + "\n"


def _initdata(registry: str) -> bytes:
    cdh = (
        '[kbc]\nname = "offline_fs_kbc"\n\n'
        f'[[image.registry_config.registry]]\nlocation = "{registry}"\ninsecure = true\n'
    )
    return (
        'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n'
        f'"cdh.toml" = {json.dumps(cdh)}\n"policy.rego" = {json.dumps(_policy())}\n'
    ).encode()


@dataclass
class Tardev:
    disk: Path
    root_hash: str


@dataclass
class Pod:
    vm: PodVm
    shim: Shim
    image: str  # as the guest names it: 10.0.2.2:PORT/...
    tardev: Tardev
    boot_to_agent_s: float


def _busybox_files() -> dict[str, bytes | str | None]:
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed")
    files: dict[str, bytes | str | None] = {"bin/busybox": BUSYBOX.read_bytes(), "tmp/": None}
    files.update({f"bin/{a}": "->busybox" for a in APPLETS})
    return files


@pytest.fixture(scope="module")
def tardev_layer(tmp_path_factory: pytest.TempPathFactory) -> Tardev:
    """A layer tar turned into a tardev file by the real CLI; the root hash it prints."""
    d = tmp_path_factory.mktemp("tardev")
    files = _busybox_files()
    files["etc/motd"] = b"read through dm-verity\n"
    (d / "layer.tar").write_bytes(tar_layer(files, mode=0o755))
    out = subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "tardev", "convert", str(d / "layer.tar"),
         str(d / "layer.tardev")],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout.split()  # fmt: skip
    root_hash = next(w for w in out if len(w) == 64 and all(c in "0123456789abcdef" for c in w))
    return Tardev(d / "layer.tardev", root_hash)


def _dial(vm: PodVm, timeout: float) -> Shim:
    """One connection for the pod's whole life: the virtio-serial port is a single byte stream,
    so a second connection would start over at stream id 1 on the guest's side. Health.Check is
    retried on it until the agent answers."""
    shim = Shim(f"unix://{vm.agent_socket}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = shim.health.Check(health_pb2.CheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            return shim
        except RpcError as e:
            if e.code != Code.DEADLINE_EXCEEDED or time.monotonic() > deadline:
                shim.close()
                raise


@pytest.fixture(scope="module")
def pod(
    podvm_image: Image, open_registry: Registry, tardev_layer: Tardev,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pod]:  # fmt: skip
    port = open_registry.host.rsplit(":", 1)[1]
    guest_registry = f"10.0.2.2:{port}"
    push(open_registry, tmp_path_factory.mktemp("vm-img"), "vm/busybox",
         [tar_layer(_busybox_files(), mode=0o755)], {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]})  # fmt: skip
    run_dir = Path(tempfile.mkdtemp(prefix="qa-", dir="/tmp"))  # short: the agent socket
    vm = PodVm(
        podvm_image, initdata=_initdata(guest_registry), accel="tcg", run_dir=run_dir / "vm",
        disks=[tardev_layer.disk], console_log=run_dir / "console.log",
    )  # fmt: skip
    shim = None
    try:
        start = time.monotonic()
        vm.start()
        vm.wait_ready(600)
        shim = _dial(vm, 600)
        boot = time.monotonic() - start
        print(f"\nboot to agent ready: {boot:.1f} s (ready line: {vm.ready})")
        yield Pod(vm, shim, f"{guest_registry}/vm/busybox:latest", tardev_layer, boot)
        shim.agent.DestroySandbox(pb.DestroySandboxRequest(), timeout=60)
    finally:
        if shim is not None:
            shim.close()
        console = (run_dir / "console.log").read_text(errors="replace")
        vm.stop()
        left = processes_mentioning(str(run_dir))
        for pid in left:
            os.kill(pid, 9)
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
        print("guest console (tail):\n" + "\n".join(console.splitlines()[-40:]))
    assert not left, f"processes left running: {left}"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _container_doc(args: list[str]) -> dict:
    doc = cri_spec("container")
    doc["process"]["args"] = args
    return doc


def _tardev_storages(cid: str, root_hash: str) -> list[pb.Storage]:
    layer_mp = f"{KATA}/sandbox/layers/{LAYER_ID}"
    option = f"{LAYER_ID},tar,ro,io.katacontainers.fs-opt.block_device=file,"
    option += f"io.katacontainers.fs-opt.is-layer,io.katacontainers.fs-opt.root-hash={root_hash}"
    return [
        pb.Storage(
            driver="blk", source=PodVm.disk_pci_address(0), fstype="tar", mount_point=layer_mp,
            options=["ro", "io.katacontainers.fs-opt.block_device=file",
                     "io.katacontainers.fs-opt.is-layer",
                     f"io.katacontainers.fs-opt.root-hash={root_hash}"],
        ),
        pb.Storage(
            driver="overlayfs", fstype="fuse3.kata-overlay", source="none",
            mount_point=f"{KATA}/{cid}/rootfs",
            options=[
                f"io.katacontainers.fs-opt.layer-src-prefix={KATA}/sandbox/layers",
                "io.katacontainers.fs-opt.layer=" + base64.b64encode(option.encode()).decode(),
                "io.katacontainers.fs-opt.overlay-rw",
                f"lowerdir={LAYER_ID}",
            ],
        ),
    ]  # fmt: skip


def _create_tardev(shim: Shim, root_hash: str, args: list[str]) -> None:
    spec, pidns = shim.grpc_spec(_container_doc(args), TARDEV_CID, "container")
    shim.agent.CreateContainer(
        pb.CreateContainerRequest(
            container_id=TARDEV_CID, exec_id=TARDEV_CID, OCI=spec, sandbox_pidns=pidns,
            storages=_tardev_storages(TARDEV_CID, root_hash),
        ),
        timeout=300,
    )  # fmt: skip


def _rpc_error(call) -> RpcError:
    with pytest.raises(RpcError) as e:
        call()
    return e.value


def test_pod_life_with_the_image_pulled_in_the_guest(pod: Pod) -> None:
    shim = pod.shim
    shim.create_sandbox(cri_spec("sandbox"))
    details = shim.agent.GetGuestDetails(pb.GuestDetailsRequest(mem_block_size=True))
    assert "image_guest_pull" in details.agent_details.storage_handlers
    start = time.monotonic()
    shim.create_container(SID, "sandbox", "pause", cri_spec("sandbox"))
    shim.agent.StartContainer(pb.StartContainerRequest(container_id=SID))
    pause_s = time.monotonic() - start

    start = time.monotonic()
    doc = _container_doc(["/bin/sh", "-c", "echo hello-from-the-vm; hostname; exit 3"])
    spec, pidns = shim.grpc_spec(doc, CID, "container")
    meta = json.dumps({"metadata": dict(spec.Annotations)})
    storage = pb.Storage(
        driver="image_guest_pull", driver_options=[f"image_guest_pull={meta}"],
        source=pod.image, fstype="overlay", mount_point=f"{KATA}/{CID}/rootfs",
    )  # fmt: skip
    shim.agent.CreateContainer(
        pb.CreateContainerRequest(container_id=CID, exec_id=CID, storages=[storage], OCI=spec,
                                  sandbox_pidns=pidns),
        timeout=600,
    )  # fmt: skip
    pull_s = time.monotonic() - start
    start = time.monotonic()
    shim.agent.StartContainer(pb.StartContainerRequest(container_id=CID))
    assert shim.read_all(CID, CID) == b"hello-from-the-vm\naccpod\n"
    assert shim.wait(CID, CID) == 3
    run_s = time.monotonic() - start

    # the policy from the initdata is enforced in the guest
    err = _rpc_error(lambda: shim.exec(SID, ["/bin/busybox", "true"]))
    assert err.code == Code.PERMISSION_DENIED and "ExecProcessRequest" in err.message

    shim.agent.RemoveContainer(pb.RemoveContainerRequest(container_id=CID))
    err = _rpc_error(lambda: shim.agent.StartContainer(pb.StartContainerRequest(container_id=CID)))
    assert err.code == Code.INTERNAL and err.message.startswith("Invalid container id")
    rss = _rss_kib(pod.vm.qemu.pid)
    print(
        f"\npause container {pause_s:.1f} s; guest pull + create {pull_s:.1f} s; "
        f"start to exit {run_s:.1f} s; qemu RSS {rss // 1024} MiB"
    )


def test_tardev_layer_through_dm_verity(pod: Pod) -> None:
    """Replaces the host-side hook in tests/guest/test_agent_units.py (the host has no
    device-mapper): the real path in the guest's kernel."""
    shim = pod.shim
    bad = "0" * 64 if pod.tardev.root_hash != "0" * 64 else "1" * 64
    err = _rpc_error(lambda: _create_tardev(shim, bad, ["/bin/cat", "/etc/motd"]))
    assert "tardev layer" in err.message and "root hash" in err.message, err.message
    assert "\n" not in err.message
    # nothing half-made: the container does not exist, and its id and layer can be used again
    err = _rpc_error(
        lambda: shim.agent.StartContainer(pb.StartContainerRequest(container_id=TARDEV_CID))
    )
    assert err.message.startswith("Invalid container id")

    _create_tardev(shim, pod.tardev.root_hash, ["/bin/cat", "/etc/motd"])
    shim.agent.StartContainer(pb.StartContainerRequest(container_id=TARDEV_CID))
    assert shim.read_all(TARDEV_CID, TARDEV_CID) == b"read through dm-verity\n"
    assert shim.wait(TARDEV_CID, TARDEV_CID) == 0
    shim.agent.RemoveContainer(pb.RemoveContainerRequest(container_id=TARDEV_CID))
    # the layer was released with its last user: it opens again (dm name free, mount point gone)
    _create_tardev(shim, pod.tardev.root_hash, ["/bin/true"])
    shim.agent.RemoveContainer(pb.RemoveContainerRequest(container_id=TARDEV_CID))


# -- pieces without a VM -----------------------------------------------------------------------------
def test_guest_init_waits_for_the_agent_to_hold_its_port(tmp_path: Path) -> None:
    """The ready line means the agent has the virtio-serial port open (a character device is
    waited for by who holds it, a socket by its path)."""
    from coco.host.podvm import guest_init as g

    plan = dict((name, wait) for name, _, wait in g.service_plan({"agent", "cdh"}, set()))
    assert plan == {"cdh": None, "agent": g.AGENT_PORT}
    link = tmp_path / "port"
    link.symlink_to("/dev/zero")
    assert g.listening(os.getpid(), str(link)) is False  # a device nobody here holds open
    with open("/dev/zero", "rb"):
        assert g.holds_open(os.getpid(), str(link)) and g.listening(os.getpid(), str(link))
    assert g.listening(os.getpid(), str(tmp_path / "sock")) is False
    (tmp_path / "sock").touch()
    assert g.listening(os.getpid(), str(tmp_path / "sock")) is True


def test_extra_disks_sit_at_fixed_pci_slots(tmp_path: Path) -> None:
    image = tmp_path / "image"  # qemu_args reads no file of it; nothing is started
    image.mkdir()
    for name in ("vmlinuz", "initrd.img", "root.img"):
        (image / name).write_bytes(b"")
    podvm_image = Image.open(image)
    disk = tmp_path / "layer.img"
    disk.write_bytes(b"\0" * 8192)
    vm = PodVm(podvm_image, accel="tcg", disks=[disk])
    vm._run_dir = tmp_path  # qemu_args needs a run directory; nothing is started
    args = " ".join(vm.qemu_args())
    assert f"file={disk},format=raw,if=none,id=disk0,readonly=on" in args
    assert "virtio-blk-pci,drive=disk0,addr=0x10" in args
    assert PodVm.disk_pci_address(0) == "0000:00:10.0"
    with pytest.raises(PodVmError, match=r"disk .*missing\.img: expected a file or a block device"):
        PodVm(podvm_image, disks=[tmp_path / "missing.img"])
