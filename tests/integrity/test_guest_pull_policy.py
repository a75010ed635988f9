"""Guest pull end to end: a policy from ``coco policy generate`` against what our shim sends.

The pod is the one containerd 1.6 ran for ../shared/vectors/cri/ (its two ``config.json`` files),
written back as the Kubernetes YAML its owner would have given: same names, command, env, shared
pid namespace and passthrough annotation. ``coco policy generate`` (guest pull, the default) turns
it into a policy inside the initdata; the shim's own code (``TaskService``: CreateSandbox, the
CopyFile calls for bind mounts, ``constrain``, the ``image_guest_pull`` storages) turns the
containerd specs into agent requests, sent to a real ``coco agent serve`` holding that policy: the
app's image is then pulled in the "guest" by a real ``coco cdh serve`` from the docker-registry
and run with runc. The pod's life passes; the same pod altered after the policy was made (another
command, image, env var, privileged, an extra mount) is refused with the rule named, and
``coco policy evaluate`` judges the recorded requests the same way.

Two things the vectors' CRI client did that the kubelet does not are put back: the kubelet asks
for the default masked and read-only ``/proc`` paths (``coco pod run`` sends the same), and pod
uids are UUIDs.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from coco.guest.agent.ocispec import policy_input
from coco.host.pod.translate import MASKED_PATHS, READONLY_PATHS
from coco.host.runtime import config as rconfig
from coco.host.runtime import initdata as rinitdata
from coco.host.runtime.events import Publisher
from coco.host.runtime.spec import fill
from coco.host.runtime.task import AGENT, TaskService
from coco.integrity import initdata as idata
from coco.integrity.agent_policy import AgentPolicy
from coco.rpc import Client, Code, RpcError, Stub
from coco.rpc.protos import agent_pb2 as pb
from coco.rpc.protos import oci_pb2
from tests.conftest import Registry
from tests.guest.test_agent import (
    CID,
    CRI,
    SID,
    busybox_image,  # noqa: F401 (fixture)
    cdh,  # noqa: F401 (fixture)
    cleanup_root,
    pytestmark,  # noqa: F401
    run_agent,
)
from tests.host.containerd_fixture import (
    Containerd,
    CriImages,
    containerd,  # noqa: F401 (fixture)
    test_images,  # noqa: F401 (fixture)
)
from tests.host.test_pod_run import leftovers, sandboxes
from tests.imagekit import tar_layer
from tests.integrity.genpolicy.helpers import push

POD_UID = "0b8f3c2e-5d7a-4e1b-9c6f-2a4d8e0f1b3c"
BUNDLES = "/run/containerd/io.containerd.runtime.v2.task/k8s.io"
ALLOWED_EXEC = ["/bin/echo", "alive"]


def coco(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coco.cli.main", *args], capture_output=True, text=True, timeout=300
    )


def pod_yaml(image: str) -> str:
    app = json.loads((CRI / "containerd-1.6-container.config.json").read_text())
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "accpod",
                "namespace": "default",
                "annotations": {"io.katacontainers.config.hypervisor.default_vcpus": "1"},
            },
            "spec": {
                "runtimeClassName": "coco-local",
                "shareProcessNamespace": True,  # the vectors' container joins the pause's pid ns
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "c1",
                        "image": image,
                        "command": app["process"]["args"],
                        "env": [{"name": "FOO", "value": "bar"}],
                        "livenessProbe": {"exec": {"command": ALLOWED_EXEC}},
                    }
                ],
            },
        }
    )


@pytest.fixture(scope="module")
def generated(
    open_registry: Registry,
    busybox_image: str,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """``coco policy generate`` of the pod: its output YAML, policy text and initdata TOML."""
    d = tmp_path_factory.mktemp("gp-e2e")
    # the pause image containerd ran for the vectors: its args are Entrypoint + Cmd
    pause = push(open_registry, d, "gpe2e/pause", [tar_layer({"pause": b"pause"})],
                 {"Entrypoint": ["/bin/sleep", "infinity"], "Cmd": [""], "Env": ["PATH=/bin"]})  # fmt: skip
    settings = d / "settings.json"
    settings.write_text(json.dumps({"cluster_config": {"pause_container_image": pause}}))
    src = d / "pod.yaml"
    src.write_text(pod_yaml(busybox_image))
    r = coco("policy", "generate", str(src), "-o", str(d / "out.yaml"), "--settings",
             str(settings), "--src-tls-verify=false", "--allow-logs", "--annotation", "both",
             "--raw-out", str(d / "policy.rego"), "--initdata-out", str(d / "initdata.toml"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    return {
        "dir": d,
        "yaml": d / "out.yaml",
        "annotations": yaml.safe_load((d / "out.yaml").read_text())["metadata"]["annotations"],
        "policy": (d / "policy.rego").read_text(),
        "initdata": (d / "initdata.toml").read_bytes(),
        "image": busybox_image,
    }


def test_generated_annotations_are_what_the_shim_reads(generated: dict[str, Any]) -> None:
    anno = generated["annotations"]
    # the initdata, read independently: base64 of gzip of the TOML, the policy in policy.rego
    raw = idata._gunzip(base64.b64decode(anno[idata.ANNOTATION]), "test")
    assert raw == generated["initdata"]
    doc = tomllib.loads(raw.decode())
    assert (doc["version"], doc["algorithm"]) == ("0.1.0", "sha384")
    assert doc["data"] == {"policy.rego": generated["policy"]}
    assert base64.b64decode(anno[rinitdata.POLICY_ANNOTATION]).decode() == generated["policy"]
    # the shim takes both annotations, finds them in agreement, and boots the guest with that TOML
    assert rinitdata.from_annotations(anno) == raw
    data = json.loads(generated["policy"].split("\npolicy_data := ", 1)[1])
    pause, app = data["containers"]
    assert pause["storages"] == [{
        "driver": "image_guest_pull", "driver_options": [], "source": "pause",
        "fstype": "overlay", "options": [],
        "mount_point": "/run/kata-containers/$(bundle-id)/rootfs", "fs_group": None,
    }]  # fmt: skip
    assert app["storages"][0]["source"] == generated["image"]
    assert app["OCI"]["Root"]["Path"] == "/run/kata-containers/$(bundle-id)/rootfs"
    assert (pause["sandbox_pidns"], app["sandbox_pidns"]) == (False, True)
    assert pause["OCI"]["Process"]["Args"] == ["/bin/sleep", "infinity", ""]


# --- containerd's specs for the pod, and our shim turning them into agent requests --------------


def specs(d: Path, image: str, pod_annotations: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The vectors' specs as containerd writes them for this pod (host files in ``d``)."""
    for name, text in (("hostname", "accpod\n"), ("hosts", "127.0.0.1 localhost\n"),
                       ("resolv.conf", "nameserver 10.0.0.10\n")):  # fmt: skip
        (d / name).write_text(text)
    out = {}
    for kind in ("sandbox", "container"):
        spec = json.loads((CRI / f"containerd-1.6-{kind}.config.json").read_text())
        anno = spec["annotations"]
        anno["io.kubernetes.cri.sandbox-uid"] = POD_UID
        # containerd passes the pod's io.katacontainers.* annotations through (the policy too)
        anno.update(
            {k: v for k, v in pod_annotations.items() if k.startswith("io.katacontainers.")}
        )
        if kind == "sandbox":
            anno["io.kubernetes.cri.sandbox-log-directory"] = (
                f"/var/log/pods/default_accpod_{POD_UID}"
            )
        else:
            anno["io.kubernetes.cri.image-name"] = image
            spec["linux"]["maskedPaths"] = list(MASKED_PATHS)
            spec["linux"]["readonlyPaths"] = list(READONLY_PATHS)
        for m in spec["mounts"]:
            name = m["destination"].rsplit("/", 1)[-1]
            if m["type"] == "bind" and (d / name).exists():
                m["source"] = str(d / name)
        out[kind] = spec
    return out


class Tap:
    """The agent stub, keeping the last request of each method (for ``coco policy evaluate``)."""

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self.sent: dict[str, Any] = {}

    def __getattr__(self, method: str) -> Any:
        async def call(request: Any, **kw: Any) -> Any:
            self.sent[method] = request
            return await getattr(self.stub, method)(request, **kw)

        return call


async def shim_for(socket: str, d: Path) -> tuple[TaskService, Tap]:
    config = d / "runtime.toml"
    config.write_text("[hypervisor.local]\n[agent.kata]\ncreate_container_timeout = 120\n")
    svc = TaskService("k8s.io", Publisher("", "k8s.io"), lambda: None)
    svc.config = rconfig.load(str(config))
    svc.client = await Client.connect(socket, timeout=5)
    svc.agent = tap = Tap(Stub(svc.client, AGENT))
    return svc, tap


async def denied(svc: TaskService, spec: dict[str, Any]) -> str:
    with pytest.raises(RpcError) as e:
        await svc._create_container(CID, f"{BUNDLES}/{CID}", "pod_container", spec)
    assert e.value.code == Code.PERMISSION_DENIED, e.value.message
    return e.value.message


async def read_until_eof(svc: TaskService, cid: str, eid: str) -> bytes:
    out = b""
    while True:
        reply = await svc.agent.ReadStdout(
            pb.ReadStreamRequest(container_id=cid, exec_id=eid, len=32768), timeout=60
        )
        if not reply.data:
            return out
        out += reply.data


def evaluate(policy: Path, d: Path, name: str, request: Any) -> subprocess.CompletedProcess[str]:
    body = d / f"{name}.json"
    body.write_text(json.dumps(policy_input(request)))
    return coco("policy", "evaluate", "--policy", str(policy), name, str(body))


def test_pod_life_passes_altered_pod_refused(
    generated: dict[str, Any],
    cdh: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    spec = specs(tmp_path, generated["image"], generated["annotations"])
    policy_file = tmp_path / "policy.rego"
    policy_file.write_text(generated["policy"])
    with run_agent(tmp_path, cdh_socket=cdh, args=("--policy", str(policy_file))) as guest:

        async def life() -> dict[str, Any]:
            svc, tap = await shim_for(guest.socket, tmp_path)
            recorded: dict[str, Any] = {}
            try:
                await svc._agent_call("CreateSandbox", svc._sandbox_request(SID, spec["sandbox"]))
                await svc._create_container(SID, f"{BUNDLES}/{SID}", "pod_sandbox", spec["sandbox"])
                recorded["pause"] = tap.sent["CreateContainer"]
                await svc._agent_call("StartContainer", pb.StartContainerRequest(container_id=SID))

                # the pod altered after the policy was generated: refused, nothing created
                messages = {}
                for what, change in ALTERATIONS.items():
                    altered = copy.deepcopy(spec["container"])
                    change(altered, tmp_path)
                    messages[what] = await denied(svc, altered)
                    recorded[what] = tap.sent["CreateContainer"]
                assert not (guest.root / CID).exists()

                await svc._create_container(
                    CID, f"{BUNDLES}/{CID}", "pod_container", spec["container"]
                )
                recorded["app"] = tap.sent["CreateContainer"]
                await svc._agent_call("StartContainer", pb.StartContainerRequest(container_id=CID))
                out = b""
                while b"accpod\n" not in out:
                    reply = await svc.agent.ReadStdout(
                        pb.ReadStreamRequest(container_id=CID, exec_id=CID, len=32768), timeout=60
                    )
                    assert reply.data, out
                    out += reply.data
                assert out.startswith(b"hello-from-cri\naccpod\n")  # pulled in the guest, ran

                # exec as the shim makes it from containerd's exec spec: the probe's command only
                for args, allowed in ((ALLOWED_EXEC, True), (["/bin/sh"], False)):
                    process = fill(oci_pb2.Process(), {"args": args, "env": ["PATH=/bin"],
                                   "cwd": "/", "user": {"uid": 0, "gid": 0}}, "exec")  # fmt: skip
                    req = pb.ExecProcessRequest(container_id=CID, exec_id=args[-1], process=process)
                    if allowed:
                        await svc._agent_call("ExecProcess", req)
                        assert await read_until_eof(svc, CID, args[-1]) == b"alive\n"
                        wait = pb.WaitProcessRequest(container_id=CID, exec_id=args[-1])
                        assert (await svc.agent.WaitProcess(wait, timeout=60)).status == 0
                    else:
                        with pytest.raises(RpcError) as e:
                            await svc._agent_call("ExecProcess", req)
                        messages["exec"] = e.value.message
                # the shim's stop path: kill all, wait, remove; then DestroySandbox
                kill = pb.SignalProcessRequest(container_id=CID, exec_id="", signal=9)
                await svc._agent_call("SignalProcess", kill)
                wait = pb.WaitProcessRequest(container_id=CID, exec_id=CID)
                assert (await svc.agent.WaitProcess(wait, timeout=60)).status == 137
                await svc._agent_call(
                    "RemoveContainer", pb.RemoveContainerRequest(container_id=CID)
                )
                await svc._stop_sandbox()
            finally:
                if svc.client is not None:
                    await svc.client.close()
            return {"messages": messages, "recorded": recorded}

        result = asyncio.run(life())
        guest.proc.wait(15)
        assert cleanup_root(guest.root) == []

    messages = result["messages"]
    prefix = "agent CreateContainer " + CID + ": CreateContainerRequest is blocked by policy: "
    image = generated["image"]
    assert messages["command"] == (
        prefix + "rule args: OCI.Process.Args[2] expected echo hello-from-cri; hostname; ip addr "
        "2>/dev/null | grep inet; sleep 300, got cat /etc/shadow"
    )
    assert messages["image"] == (
        prefix + f"rule image: OCI.Annotations[io.kubernetes.cri.image-name] expected {image}, "
        f"got {image.rsplit(':', 1)[0]}:2"
    )
    assert messages["env"] == prefix + (
        "rule env: OCI.Process.Env[3] expected a variable the policy lists or allows, got EVIL=1"
    )
    assert messages["privileged"].startswith(
        prefix + "rule capabilities: OCI.Process.Capabilities.Bounding expected"
    )
    assert messages["mount"].startswith(prefix + "rule mounts: OCI.Mounts[")
    assert "(/host) expected a destination the policy lists, got /host" in messages["mount"]
    assert messages["exec"] == (
        "agent ExecProcess: ExecProcessRequest is blocked by policy: rule exec: process.Args "
        'expected ["/bin/echo alive"], got /bin/sh'
    )

    # the same requests through `coco policy evaluate`, the policy read from the pod's YAML
    recorded = result["recorded"]
    for name in ("pause", "app"):
        r = evaluate(generated["yaml"], tmp_path, "CreateContainerRequest", recorded[name])
        assert (r.returncode, r.stdout) == (0, "allowed\n"), (name, r.stdout, r.stderr)
    r = evaluate(generated["yaml"], tmp_path, "CreateContainerRequest", recorded["image"])
    assert r.returncode == 1
    assert r.stdout.startswith("denied: CreateContainerRequest: rule image: ")
    # the storage's image is checked too, not only the annotation
    pol = AgentPolicy(generated["policy"])
    whys = [str(v) for v in pol.evaluate("CreateContainerRequest",
                                         policy_input(recorded["image"])).violations]  # fmt: skip
    assert (
        f"rule image: storages[0].source expected {image}, got {image.rsplit(':', 1)[0]}:2" in whys
    )


def _command(spec: dict[str, Any], d: Path) -> None:
    spec["process"]["args"][2] = "cat /etc/shadow"


def _image(spec: dict[str, Any], d: Path) -> None:
    anno = spec["annotations"]
    anno["io.kubernetes.cri.image-name"] = (
        anno["io.kubernetes.cri.image-name"].rsplit(":", 1)[0] + ":2"
    )


def _env(spec: dict[str, Any], d: Path) -> None:
    spec["process"]["env"].append("EVIL=1")


def _privileged(spec: dict[str, Any], d: Path) -> None:
    from coco.integrity.genpolicy.settings import PRIVILEGED_CAPS

    for s in ("bounding", "effective", "permitted"):
        spec["process"]["capabilities"][s] = list(PRIVILEGED_CAPS)
    spec["linux"].pop("maskedPaths")
    spec["linux"].pop("readonlyPaths")


def _mount(spec: dict[str, Any], d: Path) -> None:
    (d / "host-file").write_text("from the host\n")
    spec["mounts"].append({"destination": "/host", "type": "bind", "source": str(d / "host-file"),
                           "options": ["rbind", "rprivate", "rw"]})  # fmt: skip


ALTERATIONS = {
    "command": _command,
    "image": _image,
    "env": _env,
    "privileged": _privileged,
    "mount": _mount,
}


# --- the same through a real containerd: `coco pod run` on coco-local ----------------------------

UUID_RE = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
GUEST_CDH = (  # the guest's CDH may pull from the plain-HTTP test registry
    '[kbc]\nname = "offline_fs_kbc"\n\n'
    '[[image.registry_config.registry]]\nlocation = "{registry}"\ninsecure = true\n'
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_coco_pod_run_with_the_generated_policy(
    containerd: Containerd,  # noqa: F811
    test_images: CriImages,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The node's settings (this containerd's state dir, the log root of `coco pod run`), a base
    initdata with the guest's cdh.toml: the pod runs; its command altered afterwards: refused."""
    registry = test_images.busybox.split("/")[0]
    bundles = f"{containerd.state}/io.containerd.runtime.v2.task/k8s.io/$(bundle-id)"
    logs = tmp_path / "logs"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({
        "cluster_config": {"pause_container_image": test_images.pause},
        "pause_container": {"Annotations": {
            "io.katacontainers.pkg.oci.bundle_path": bundles,
            "io.kubernetes.cri.sandbox-log-directory":
                f"^{re.escape(str(logs))}/$(sandbox-namespace)_$(sandbox-name)_{UUID_RE}$",
        }},
        "other_container": {"Annotations": {"io.katacontainers.pkg.oci.bundle_path": bundles}},
    }))  # fmt: skip
    base = tmp_path / "initdata.toml"
    cdh_toml = GUEST_CDH.format(registry=registry)
    base.write_text(
        f'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"cdh.toml" = {json.dumps(cdh_toml)}\n'
    )
    pod = tmp_path / "pod.yaml"
    pod.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gp-local"},
        "spec": {"runtimeClassName": "coco-local", "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "app", "image": test_images.busybox,
                                 "command": ["/bin/sh", "-c", "echo policy-checked; exit 3"]}]},
    }))  # fmt: skip
    r = coco("policy", "generate", str(pod), "--settings", str(settings), "--initdata", str(base),
             "--src-tls-verify=false", "--allow-logs")  # fmt: skip
    assert r.returncode == 0, r.stderr
    run = ["pod", "run", str(pod), "--runtime-endpoint", containerd.endpoint, "--log-root",
           str(logs), "--state-dir", str(tmp_path / "state"), "--tls-verify=false"]  # fmt: skip
    r = coco(*run)
    assert (r.returncode, r.stdout) == (3, "policy-checked\n"), r.stderr

    # the owner's command changed after the policy was made: the agent refuses the container
    doc = yaml.safe_load(pod.read_text())
    doc["spec"]["containers"][0]["command"][2] = "echo altered"
    pod.write_text(yaml.safe_dump(doc))
    r = coco(*run)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("coco: error: pod default/gp-local: container app did not start:"), last
    assert (
        "CreateContainerRequest is blocked by policy: rule args: OCI.Process.Args[2] expected "
        "echo policy-checked; exit 3, got echo altered" in last
    )
    assert "altered" not in r.stdout
    assert sandboxes(containerd) == []
    assert leftovers(tmp_path) == []
