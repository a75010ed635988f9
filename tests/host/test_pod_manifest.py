"""The pieces of ``coco pod`` that need no runtime: the pod YAML reader, the kubelet's
translation into CRI messages, the CRI log format, the endpoint, and the CRI field numbers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from coco.host.pod import PodError
from coco.host.pod import translate as tr
from coco.host.pod.cri import resolve_endpoint
from coco.host.pod.logs import LogReader
from coco.host.pod.manifest import parse
from coco.rpc.protos import cri_pb2 as pb


def _pod(text: str):
    return parse(textwrap.dedent(text), "pod.yaml")


POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  uid: 3f0c5d1e-4b7a-4c2d-9e8f-0a1b2c3d4e5f
  labels: {app: web}
  annotations: {io.katacontainers.config.agent.policy: cGFja2FnZQ==}
spec:
  shareProcessNamespace: true
  securityContext: {runAsUser: 1000, supplementalGroups: [5]}
  dnsConfig: {nameservers: [10.0.0.10], searches: [svc.local], options: [{name: ndots, value: "2"}]}
  volumes: [{name: data, emptyDir: {}}]
  containers:
  - name: app
    image: registry.example/app:1
    command: [/bin/app, "$(MODE)", "$$(MODE)", "$(NOPE)"]
    env:
    - {name: MODE, value: fast}
    - {name: BOTH, value: "$(MODE)-$(UNSET)"}
    - name: IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
    - name: MEM
      valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}
    resources: {requests: {cpu: 250m}, limits: {cpu: "1.5", memory: 64Mi}}
    securityContext: {allowPrivilegeEscalation: false, capabilities: {add: [NET_ADMIN]}}
    ports: [{containerPort: 80, hostPort: 8080}]
    volumeMounts: [{name: data, mountPath: /data, subPath: sub}]
"""


def test_sandbox_config_as_the_kubelet_fills_it(tmp_path: Path) -> None:
    pod = _pod(POD)
    log_dir = tr.log_directory(pod, tr.LOG_ROOT)
    assert str(log_dir) == "/var/log/pods/shop_web_3f0c5d1e-4b7a-4c2d-9e8f-0a1b2c3d4e5f"
    cfg = tr.sandbox_config(pod, log_dir=log_dir, volume_dir=tmp_path / "v")
    assert (cfg.metadata.name, cfg.metadata.namespace, cfg.metadata.uid) == (
        "web",
        "shop",
        "3f0c5d1e-4b7a-4c2d-9e8f-0a1b2c3d4e5f",
    )
    assert cfg.hostname == "web"
    assert cfg.labels["app"] == "web" and cfg.labels["io.kubernetes.pod.name"] == "web"
    assert cfg.annotations["io.katacontainers.config.agent.policy"] == "cGFja2FnZQ=="
    ns = cfg.linux.security_context.namespace_options
    assert (ns.network, ns.pid, ns.ipc) == (pb.POD, pb.POD, pb.POD)  # shareProcessNamespace
    assert cfg.linux.security_context.run_as_user.value == 1000
    assert list(cfg.dns_config.servers) == ["10.0.0.10"]
    assert list(cfg.dns_config.options) == ["ndots:2"]
    assert [(p.container_port, p.host_port) for p in cfg.port_mappings] == [(80, 8080)]


def test_container_config_env_expansion_resources_security(tmp_path: Path) -> None:
    pod = _pod(POD)
    c = pod.containers[0]
    env = tr.environment(pod, c, pod_ip="10.1.2.3")
    assert env == [("MODE", "fast"), ("BOTH", "fast-$(UNSET)"), ("IP", "10.1.2.3"), ("MEM", "64")]
    cfg = tr.container_config(pod, c, image_ref="sha256:abc", volume_dir=tmp_path, env=env)
    # the kubelet's expansion: $$ is a literal $, an unknown reference stays as written
    assert list(cfg.command) == ["/bin/app", "fast", "$(MODE)", "$(NOPE)"]
    assert cfg.image.image == "sha256:abc"
    assert cfg.image.user_specified_image == "registry.example/app:1"
    assert cfg.log_path == "app/0.log"
    res = cfg.linux.resources
    assert (res.cpu_shares, res.cpu_quota, res.cpu_period) == (256, 150000, 100000)
    assert res.memory_limit_in_bytes == 64 << 20
    sc = cfg.linux.security_context
    assert sc.no_new_privs and list(sc.capabilities.add_capabilities) == ["NET_ADMIN"]
    assert sc.run_as_user.value == 1000 and list(sc.supplemental_groups) == [5]
    assert "/proc/kcore" in sc.masked_paths and "/proc/sys" in sc.readonly_paths
    (m,) = cfg.mounts
    assert m.container_path == "/data"
    assert m.host_path == str(tmp_path / "kubernetes.io~empty-dir" / "data" / "sub")


def test_workload_templates_and_inputs() -> None:
    pod = _pod(
        """\
        kind: Service
        metadata: {name: ignored}
        ---
        kind: Secret
        metadata: {name: creds}
        type: kubernetes.io/dockerconfigjson
        data: {.dockerconfigjson: eyJhdXRocyI6IHt9fQ==}
        ---
        kind: Job
        metadata: {name: batch}
        spec:
          template:
            spec:
              imagePullSecrets: [{name: creds}]
              containers: [{name: c, image: busybox}]
        """
    )
    assert (pod.name, pod.namespace) == ("batch", "default")
    assert pod.pull_secrets == {"creds": b'{"auths": {}}'}
    assert len(pod.uid) == 36


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Pod\nmetadata: {name: x}\nspec: {containers: []}\n",
         "pod.yaml: document 1 (Pod x): spec.containers: expected at least one container, found none"),
        ("kind: Pod\nmetadata: {name: Bad_Name}\nspec: {containers: [{name: a, image: b}]}\n",
         "expected a DNS subdomain name, found 'Bad_Name'"),
        ("kind: Pod\nmetadata: {name: x}\nspec:\n  containers: [{name: a, image: b}]\n"
         "  volumes: [{name: v, persistentVolumeClaim: {claimName: c}}]\n",
         "spec.volumes[0] (v): expected one of emptyDir, configMap, secret, hostPath, found "
         "persistentVolumeClaim"),
        ("kind: Pod\nmetadata: {name: x}\nspec:\n  containers:\n  - name: a\n    image: b\n"
         "    volumeMounts: [{name: nope, mountPath: /m}]\n",
         "spec.containers[0].volumeMounts[0].name: expected one of the pod's volumes [], found 'nope'"),
        ("kind: Pod\nmetadata: {name: x}\nspec:\n  volumes: [{name: v, emptyDir: {}}]\n"
         "  containers:\n  - name: a\n    image: b\n"
         "    volumeMounts: [{name: v, mountPath: /m, subPath: ../../etc}]\n",
         "subPath: expected a relative path inside the volume, found '../../etc'"),
        ("kind: Pod\nmetadata: {name: x, labels: {n: 1}}\nspec: {containers: [{name: a, image: b}]}\n",
         "metadata.labels['n']: expected a string value, found int (quote numbers and booleans)"),
        ("kind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: a, image: b}, {name: a, image: b}]}\n",
         "container name 'a' is used twice"),
        ("kind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: a, image: b}]}\n---\n"
         "kind: Pod\nmetadata: {name: y}\nspec: {containers: [{name: a, image: b}]}\n",
         "pod.yaml: expected exactly one Pod or workload, found Pod in pod.yaml: document 1, "
         "Pod in pod.yaml: document 2"),
        ("kind: Gadget\nmetadata: {name: x}\n", "pod.yaml: document 1: unsupported kind 'Gadget'"),
        ("kind: Pod\nmetadata: {name: x}\nspec:\n  imagePullSecrets: [{name: s}]\n"
         "  containers: [{name: a, image: b}]\n",
         "expected a Secret 's' of type kubernetes.io/dockerconfigjson in the same file, found none"),
        ("a: &a [*a]\n", "pod.yaml"),
    ],
)  # fmt: skip
def test_bad_pods_are_one_line(text: str, message: str) -> None:
    with pytest.raises(PodError) as e:
        parse(text, "pod.yaml")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_values_found_when_translating(tmp_path: Path) -> None:
    pod = _pod(
        """\
        kind: Pod
        metadata: {name: x}
        spec:
          containers:
          - name: a
            image: b
            resources: {limits: {memory: lots}}
            env: [{name: E, valueFrom: {fieldRef: {fieldPath: status.phase}}}]
        """
    )
    with pytest.raises(
        PodError, match=r"fieldRef.fieldPath: expected one of .*found 'status.phase'"
    ):
        tr.environment(pod, pod.containers[0])
    with pytest.raises(
        PodError, match=r"limits.memory: expected a resource quantity .* found 'lots'"
    ):
        tr.resources(pod, pod.containers[0])


def test_quantities() -> None:
    assert tr.quantity("500m") * 1000 == 500
    assert tr.quantity("1Gi") == 1 << 30
    assert tr.quantity("2k") == 2000
    assert tr.quantity("1e3") == 1000


def test_log_records_partial_lines_and_streams(tmp_path: Path) -> None:
    log = tmp_path / "0.log"
    log.write_bytes(
        b"2026-12-02T03:00:00.000000001Z stdout P hel\n"
        b"2026-12-02T03:00:00.000000002Z stderr F an error\n"
        b"2026-12-02T03:00:00.000000003Z stdout F lo world\n"
        b"2026-12-02T03:00:00.000000004Z stdout F \n"
        b"garbage line\n"
        b"2026-12-02T03:00:00.000000005Z stdout F incomp"
    )
    r = LogReader(log)
    got = [(x.stream, x.text) for x in r.read()]
    assert got == [("stderr", b"an error"), ("stdout", b"hello world"), ("stdout", b"")]
    with log.open("ab") as f:
        f.write(b"lete\n2026-12-02T03:00:00.000000006Z stdout P tail")
    assert [(x.stream, x.text) for x in r.read()] == [("stdout", b"incomplete")]
    assert [(x.stream, x.text) for x in r.read(final=True)] == [("stdout", b"tail")]


def test_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONTAINER_RUNTIME_ENDPOINT", raising=False)
    assert resolve_endpoint() == "unix:///run/containerd/containerd.sock"
    monkeypatch.setenv("CONTAINER_RUNTIME_ENDPOINT", "/tmp/x.sock")
    assert resolve_endpoint() == "unix:///tmp/x.sock"
    assert resolve_endpoint("unix:///a.sock") == "unix:///a.sock"
    with pytest.raises(PodError, match=r"expected unix:///PATH .* found 'tcp://1.2.3.4:1'"):
        resolve_endpoint("tcp://1.2.3.4:1")


# (message, field, number) from upstream's runtime/v1 api.proto
UPSTREAM = [
    ("PodSandboxConfig", "metadata", 1), ("PodSandboxConfig", "log_directory", 3),
    ("PodSandboxConfig", "annotations", 7), ("PodSandboxConfig", "linux", 8),
    ("LinuxSandboxSecurityContext", "run_as_group", 8),
    ("LinuxSandboxSecurityContext", "seccomp", 9),
    ("RunPodSandboxRequest", "runtime_handler", 2), ("ImageSpec", "user_specified_image", 18),
    ("ImageSpec", "runtime_handler", 19), ("ContainerConfig", "log_path", 11),
    ("ContainerConfig", "linux", 15), ("LinuxContainerSecurityContext", "run_as_group", 12),
    ("LinuxContainerSecurityContext", "no_new_privs", 11),
    ("LinuxContainerSecurityContext", "masked_paths", 13),
    ("LinuxContainerSecurityContext", "seccomp", 15), ("LinuxContainerResources", "unified", 9),
    ("ContainerStatus", "exit_code", 7), ("ContainerStatus", "log_path", 15),
    ("PodSandboxStatus", "runtime_handler", 9), ("PodSandbox", "runtime_handler", 7),
    ("ExecSyncResponse", "exit_code", 3), ("PullImageRequest", "sandbox_config", 3),
    ("AuthConfig", "registry_token", 6), ("Image", "pinned", 8),
]  # fmt: skip


def test_field_numbers_are_upstreams() -> None:
    for message, name, number in UPSTREAM:
        desc = pb.DESCRIPTOR.message_types_by_name[message]
        assert desc.fields_by_name[name].number == number, (message, name)
    assert pb.DESCRIPTOR.package == "runtime.v1"
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["ImageService"].methods] == [
        "ListImages",
        "ImageStatus",
        "PullImage",
        "RemoveImage",
    ]
    # a known encoding: RunPodSandboxRequest{config{metadata{name:"a"}}, runtime_handler:"h"}
    req = pb.RunPodSandboxRequest(
        config=pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="a")), runtime_handler="h"
    )
    assert req.SerializeToString() == bytes.fromhex("0a050a030a0161") + b"\x12\x01h"


def test_unreachable_runtime_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    pod = tmp_path / "pod.yaml"
    pod.write_text("kind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: a, image: b}]}\n")
    sock = tmp_path / "none.sock"
    r = subprocess.run(
        [sys.executable, "-m", "coco.cli.main", "pod", "run", str(pod), "--runtime-endpoint",
         f"unix://{sock}", "--log-root", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 1
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"coco: error: CRI Version at unix://{sock}: the runtime is unreachable")
    assert line.endswith("is containerd running there?")
    assert not (tmp_path / "logs").exists()
