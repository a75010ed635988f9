"""``coco pod run --runtime-class coco-local``: a CRI pod through containerd, the handler that
``coco runtime install`` added, coco's shim and the (insecure) local sandbox: the guest pulls the
image itself, the agent holds every request against the policy from the pod's initdata."""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.host.containerd_fixture import Containerd, CriImages, _busybox_layer
from tests.host.test_pod_run import coco, leftovers, sandboxes, write_pod
from tests.imagekit import tar_layer, write_image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ALLOWED = ["CreateSandboxRequest", "DestroySandboxRequest", "GuestDetailsRequest",
           "CopyFileRequest", "StartContainerRequest", "RemoveContainerRequest",
           "ExecProcessRequest", "SignalProcessRequest", "WaitProcessRequest", "ReadStreamRequest",
           "WriteStreamRequest", "CloseStdinRequest", "TtyWinResizeRequest",
           "UpdateContainerRequest", "StatsContainerRequest"]  # fmt: skip


def _initdata(registry: str, *, deny: str) -> str:
    """gzip+base64 initdata: a CDH that may pull from the plain-HTTP test registry, and a policy
    that allows everything but CreateContainerRequest for ``deny``: "" (none), "app" (every
    container but the pause container) or "all"."""
    policy = ["package agent_policy", "", "default AllowRequestsFailingPolicy := false"]
    policy += [f"default {name} := true" for name in ALLOWED]
    policy.append(f"default CreateContainerRequest := {'true' if not deny else 'false'}")
    if deny == "app":
        policy += [
            "CreateContainerRequest {",
            '  input.OCI.Annotations["io.kubernetes.cri.container-type"] == "sandbox"',
            "}",
        ]
    cdh = (
        '[kbc]\nname = "offline_fs_kbc"\n\n'
        f'[[image.registry_config.registry]]\nlocation = "{registry}"\ninsecure = true\n'
    )
    raw = (
        'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n'
        f'"cdh.toml" = {json.dumps(cdh)}\n"policy.rego" = {json.dumps(chr(10).join(policy) + chr(10))}\n'
    ).encode()
    return base64.b64encode(gzip.compress(raw)).decode()


def _shims_of(ctrd: Containerd) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        shim = "containerd-shim-coco-v2" in cmd or "coco.host.runtime.shim" in cmd
        if shim and str(ctrd.address) in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def _nothing_left(ctrd: Containerd, tmp_path: Path) -> None:
    deadline = time.monotonic() + 30
    state = ctrd.coco_state
    while time.monotonic() < deadline:
        busy = _shims_of(ctrd) or (state.exists() and any(state.iterdir()))
        if not busy:
            break
        time.sleep(0.2)
    assert _shims_of(ctrd) == []
    assert not state.exists() or list(state.iterdir()) == []
    assert sandboxes(ctrd) == []
    assert leftovers(tmp_path) == []
    mounts = Path("/proc/self/mounts").read_text()
    assert str(state) not in mounts


def _pod(tmp_path: Path, images: CriImages, name: str, *, deny: str) -> Path:
    registry = images.busybox.split("/")[0]
    return write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata:
          name: {name}
          annotations:
            io.katacontainers.config.hypervisor.cc_init_data: {_initdata(registry, deny=deny)}
        spec:
          runtimeClassName: coco-local
          terminationGracePeriodSeconds: 1
          containers:
          - name: app
            image: {images.busybox}
            command: ["/bin/sh", "-c", "echo hello from $(POD) in the guest; echo to-stderr >&2; exit 5"]
            env: [{{name: POD, value: {name}}}]
        """,
    )


def _args(ctrd: Containerd, tmp_path: Path) -> list[str]:
    return [
        "--runtime-endpoint",
        ctrd.endpoint,
        "--tls-verify=false",  # the host reads guest-pulled images' configs from a plain-HTTP registry
        "--log-root",
        str(tmp_path / "logs"),
        "--state-dir",
        str(tmp_path / "state"),
    ]


def test_local_pod_output_and_exit_code(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    pod = _pod(tmp_path, test_images, "local-hello", deny="")
    r = coco("pod", "run", str(pod), *_args(containerd, tmp_path), timeout=400)
    assert r.stdout == "hello from local-hello in the guest\n", r.stderr
    assert "to-stderr" in r.stderr
    assert r.returncode == 5, r.stderr
    assert "creating pod default/local-hello with runtime class coco-local" in r.stderr
    _nothing_left(containerd, tmp_path)


@pytest.mark.parametrize(
    ("deny", "what"),
    [("app", "container app did not start"), ("all", "the sandbox did not start")],
)
def test_local_pod_policy_deny_is_one_line(
    containerd: Containerd, test_images: CriImages, tmp_path: Path, deny: str, what: str
) -> None:
    pod = _pod(tmp_path, test_images, f"local-denied-{deny}", deny=deny)
    r = coco("pod", "run", str(pod), *_args(containerd, tmp_path), timeout=400)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"coco: error: pod default/local-denied-{deny}: {what}:"), last
    assert "CreateContainerRequest is blocked by policy" in last
    assert "hello from" not in r.stdout
    _nothing_left(containerd, tmp_path)


def test_local_pod_exec_logs_delete(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    registry = test_images.busybox.split("/")[0]
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata:
          name: local-svc
          annotations:
            io.katacontainers.config.hypervisor.cc_init_data: {_initdata(registry, deny="")}
        spec:
          runtimeClassName: coco-local
          terminationGracePeriodSeconds: 1
          containers:
          - name: app
            image: {test_images.busybox}
            command: ["/bin/sh", "-c", "echo serving; exec sleep 600"]
        """,
    )
    ep = ["--runtime-endpoint", containerd.endpoint]
    r = coco("pod", "run", "-d", str(pod), *_args(containerd, tmp_path), timeout=400)
    assert r.returncode == 0, r.stderr
    try:
        r = coco("pod", "exec", "local-svc", *ep, "--", "/bin/sh", "-c", "echo in-guest; exit 3")
        assert (r.returncode, r.stdout) == (3, "in-guest\n"), r.stderr
        deadline = time.monotonic() + 30
        while (r := coco("pod", "logs", "local-svc", *ep)).stdout == "":
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (r.returncode, r.stdout) == (0, "serving\n"), r.stderr
    finally:
        d = coco("pod", "delete", "local-svc", "--grace-period", "1", *ep)
    assert d.returncode == 0, d.stderr
    _nothing_left(containerd, tmp_path)


def _layers(ctrd: Containerd) -> set[str]:
    out = ctrd.ctr("-n", "k8s.io", "content", "ls", "-q").stdout
    return set(out.split())


def test_guest_pull_never_brings_layers_to_the_host(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    registry = test_images.busybox.split("/")[0]
    image = f"{registry}/coco-test/guest-only:1"
    # busybox's layer (the pause image has it too) and one of its own the host must never fetch
    base = tmp_path / "img"
    write_image(base, [_busybox_layer(), tar_layer({"etc/guest-only": "x\n"})], tag="1")
    subprocess.run(
        ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{base}:1", f"docker://{image}"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    manifest = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{image}"],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    layer = manifest["layers"][1]["digest"]
    pod = _pod(tmp_path, test_images, "guest-only", deny="")
    pod.write_text(pod.read_text().replace(test_images.busybox, image))
    r = coco("pod", "run", str(pod), *_args(containerd, tmp_path), timeout=400)
    assert (r.returncode, r.stdout) == (5, "hello from guest-only in the guest\n"), r.stderr
    assert f"{image}: guest pull (the host reads its config, never its layers)" in r.stderr
    assert layer not in _layers(containerd)  # the host never fetched the layer
    _nothing_left(containerd, tmp_path)

    # the same image on a host runtime: the placeholder is no rootfs, the real image is pulled
    runc = tmp_path / "runc"
    runc.mkdir()
    pod2 = write_pod(
        runc,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: host-after-guest}}
        spec:
          containers: [{{name: app, image: {image}, command: ["/bin/echo", "on the host"]}}]
        """,
    )
    r = coco("pod", "run", str(pod2), *_args(containerd, runc), "--runtime-class", "runc")
    assert (r.returncode, r.stdout) == (0, "on the host\n"), r.stderr
    assert layer in _layers(containerd)


def test_encrypted_image_host_unpack_fails_guest_pull_reaches_the_guest(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    registry = test_images.busybox.split("/")[0]
    image = f"{registry}/coco-test/encrypted:1"
    key = tmp_path / "key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    pub = tmp_path / "pub.pem"
    subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
        check=True, capture_output=True,
    )  # fmt: skip
    # a layer no other image has (containerd skips layers whose snapshot it already holds)
    base = tmp_path / "img"
    write_image(base, [_busybox_layer(), tar_layer({"etc/secret-app": "s\n"})], tag="1")
    subprocess.run(
        ["skopeo", "copy", "-q", "--dest-tls-verify=false", "--encryption-key", f"jwe:{pub}",
         f"oci:{base}:1", f"docker://{image}"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pod = _pod(tmp_path, test_images, "enc", deny="")
    pod.write_text(pod.read_text().replace(test_images.busybox, image))

    # CRI PullImage: containerd 1.6 unpacks what it pulls, on the host, and an encrypted layer
    # cannot be; with coco's snapshotter as the CRI snapshotter the layer is left to the guest
    r = coco("pod", "run", str(pod), *_args(containerd, tmp_path), "--guest-pull", "never")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    if getattr(containerd, "snapshotter", None) is None:
        assert "pulling " + image in last, last
    else:
        assert "container app did not start" in last, last
    assert sandboxes(containerd) == []

    # guest pull: the host is done, the guest pulls and cannot decrypt without the key
    r = coco("pod", "run", str(pod), *_args(containerd, tmp_path), timeout=400)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("coco: error: pod default/enc: container app did not start:"), last
    assert "hello from" not in r.stdout
    _nothing_left(containerd, tmp_path)


def _planned_netns(ctrd: Containerd) -> str | None:
    """The network namespace in a local guest's plan, once one is written whole."""
    for plan in ctrd.coco_state.glob("*/plan.json"):
        try:
            return json.loads(plan.read_text())["netns"]
        except (OSError, ValueError):
            continue  # not written yet
    return None


def test_local_pod_interrupted_while_its_sandbox_starts_leaves_nothing(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    """Ctrl-C while containerd is still inside RunPodSandbox (the shim has started the local
    guest, whose start takes a second or two): `coco pod run` has no sandbox id yet, finds the
    sandbox by the pod's metadata once containerd has made it, and removes it: no sandbox, shim,
    guest, network namespace or mount is left."""
    pod = _pod(tmp_path, test_images, "local-cut", deny="")
    proc = subprocess.Popen(
        [sys.executable, "-m", "coco.cli.main", "pod", "run", str(pod),
         *_args(containerd, tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    netns: str | None = None
    try:
        deadline = time.monotonic() + 300
        # the shim writes the guest's plan (with the pod's netns from CNI) before starting it
        while (netns := _planned_netns(containerd)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "the sandbox of pod default/local-cut is still being made" in err, err
    assert err.strip().splitlines()[-1] == "coco: interrupted"
    assert netns is not None and netns.startswith("/var/run/netns/")
    assert not os.path.lexists(netns)
    assert netns not in Path("/proc/self/mounts").read_text()
    _nothing_left(containerd, tmp_path)
