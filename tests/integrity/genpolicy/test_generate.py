"""genpolicy end to end: images in a real docker-registry, policies checked with our rules."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from coco.integrity import tardev
from coco.integrity.agent_policy import AgentPolicy
from coco.integrity.genpolicy import generate
from tests.conftest import Registry
from tests.imagekit import tar_layer
from tests.integrity.conftest import ZERO_SALT, root_of, veritysetup
from tests.integrity.genpolicy.helpers import (
    Images,
    chain_layer_ids,
    create_container_request,
    opts,
    pod,
    policy_of,
)


def test_policy_binds_layers_to_independently_computed_roots(
    images: Images, open_registry: Registry, tmp_path: Path
) -> None:
    res = generate(pod(images.app), "pod.yaml", opts(images))
    text, data = policy_of(res.yaml)
    assert text.startswith("# Agent policy rules of the coco project")
    assert [
        c["OCI"]["Annotations"]["io.kubernetes.cri.container-type"] for c in data["containers"]
    ] == ["sandbox", "container"]
    app = data["containers"][1]
    overlay = app["storages"][-1]
    assert overlay["driver"] == "overlayfs"
    ids, hashes = overlay["options"][0].split(":"), overlay["options"][1].split(":")
    # Roots computed from the compressed blobs the registry stores, by the tardev module, and for
    # the bottom layer also by veritysetup over the indexed tar: topmost first in the policy.
    diff_ids = [tardev_diff for tardev_diff in _diff_ids(images.app_layers)]
    assert ids == list(reversed(chain_layer_ids(diff_ids)))
    expected = []
    for i, layer in enumerate(images.app_layers):
        raw = tmp_path / f"l{i}.tar"
        raw.write_bytes(layer)
        expected.append(tardev.layer_root_hash(raw).hex())
    assert hashes == list(reversed(expected))
    indexed = tmp_path / "l0.indexed"
    res0 = tardev.convert(tmp_path / "l0.tar", indexed, index_only=True)
    vs = veritysetup(
        "format",
        "--no-superblock",
        "--format=1",
        "--hash=sha256",
        "--data-block-size=4096",
        "--hash-block-size=4096",
        f"--salt={ZERO_SALT}",
        indexed,
        tmp_path / "l0.tree",
    )
    assert vs.returncode == 0, vs.stderr
    assert root_of(vs.stdout) == hashes[-1] == res0.root_hash.hex()
    assert [s["options"] for s in app["storages"][:2]] == [["$(hash0)"], ["$(hash1)"]]
    # image config applied: entrypoint + cmd, env, cwd, user from /etc/passwd
    proc = app["OCI"]["Process"]
    assert proc["Args"] == ["/usr/bin/python3", "/srv/app.py"]
    assert proc["Cwd"] == "/srv"
    assert proc["User"]["UID"] == 1234 and proc["User"]["GID"] == 4321
    assert "LANG=C.UTF-8" in proc["Env"]
    pause = data["containers"][0]["OCI"]["Process"]
    assert pause["User"]["UID"] == 65535 and pause["Args"] == ["/pause"]


def _diff_ids(layers: list[bytes]) -> list[str]:
    import hashlib

    return ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]


def test_matching_requests_allowed_altered_denied_with_field(images: Images) -> None:
    res = generate(
        pod(images.app, args=["--port", "8080"], env=[{"name": "MODE", "value": "prod"}]),
        "pod.yaml",
        opts(images),
    )
    _, data = policy_of(res.yaml)
    pol = AgentPolicy.from_data(data)
    for i in (0, 1):
        d = pol.evaluate("CreateContainerRequest", create_container_request(data, i))
        assert d.allowed, d.message()
    req = create_container_request(data, 1)
    assert req["OCI"]["Process"]["Args"] == ["/usr/bin/python3", "--port", "8080"]

    bad = copy.deepcopy(req)
    h = bad["storages"][0]["options"][3]
    bad["storages"][0]["options"][3] = h[:-1] + ("0" if h[-1] != "0" else "1")
    msg = pol.evaluate("CreateContainerRequest", bad).message()
    assert msg.startswith(
        "denied: CreateContainerRequest: rule storages: storages[0].options[3] expected "
        "io.katacontainers.fs-opt.root-hash="
    )

    bad = copy.deepcopy(req)
    bad["OCI"]["Process"]["Args"][2] = "9090"
    assert pol.evaluate("CreateContainerRequest", bad).message() == (
        "denied: CreateContainerRequest: rule args: OCI.Process.Args[2] expected 8080, got 9090"
    )

    bad = copy.deepcopy(req)
    bad["OCI"]["Process"]["Env"].append("MODE=debug")
    assert "rule env: OCI.Process.Env[" in pol.evaluate("CreateContainerRequest", bad).message()

    bad = copy.deepcopy(req)
    bad["OCI"]["Annotations"]["io.kubernetes.cri.image-name"] = "evil/app:latest"
    msg = pol.evaluate("CreateContainerRequest", bad).message()
    assert "rule image: OCI.Annotations[io.kubernetes.cri.image-name] expected" in msg
    assert msg.endswith("got evil/app:latest")

    bad = copy.deepcopy(req)
    bad["OCI"]["Process"]["User"]["UID"] = 0
    assert pol.evaluate("CreateContainerRequest", bad).message() == (
        "denied: CreateContainerRequest: rule user: OCI.Process.User.UID expected 1234, got 0"
    )

    bad = copy.deepcopy(req)
    bad["OCI"]["Mounts"].append(
        {"destination": "/host", "source": "/", "type_": "bind", "options": ["rbind"]}
    )
    assert "rule mounts: OCI.Mounts[" in pol.evaluate("CreateContainerRequest", bad).message()

    bad = copy.deepcopy(req)
    bad["OCI"]["Process"]["Capabilities"]["Bounding"].append("CAP_SYS_ADMIN")
    assert (
        "rule capabilities: OCI.Process.Capabilities.Bounding"
        in pol.evaluate("CreateContainerRequest", bad).message()
    )


def test_exec_and_logs_denied_unless_allowed_explicitly(images: Images) -> None:
    probe = {"exec": {"command": ["cat", "/tmp/healthy"]}}
    _, data = policy_of(
        generate(pod(images.app, livenessProbe=probe), "pod.yaml", opts(images)).yaml
    )
    pol = AgentPolicy.from_data(data)
    d = pol.evaluate("ExecProcessRequest", {"container_id": "x", "process": {"Args": ["/bin/sh"]}})
    assert not d.allowed
    assert d.message() == (
        "denied: ExecProcessRequest: rule exec: process.Args expected "
        '["cat /tmp/healthy"], got /bin/sh'
    )
    assert pol.evaluate(
        "ExecProcessRequest", {"process": {"Args": ["cat", "/tmp/healthy"]}}
    ).allowed
    assert not pol.evaluate("ReadStreamRequest", {"container_id": "x", "len": 10}).allowed
    assert not pol.evaluate("SetPolicyRequest", {"policy": ""}).allowed

    _, data = policy_of(
        generate(
            pod(images.app), "pod.yaml", opts(images, allow_exec=("/bin/sh",), allow_logs=True)
        ).yaml
    )
    pol = AgentPolicy.from_data(data)
    assert pol.evaluate("ExecProcessRequest", {"process": {"Args": ["/bin/sh"]}}).allowed
    assert not pol.evaluate(
        "ExecProcessRequest", {"process": {"Args": ["/bin/sh", "-c", "id"]}}
    ).allowed
    assert pol.evaluate("ReadStreamRequest", {}).allowed


def test_layers_cache_second_run_downloads_nothing(images: Images, tmp_path: Path) -> None:
    cache = tmp_path / "layers-cache.json"
    first = generate(pod(images.app), "pod.yaml", opts(images, layers_cache=cache))
    assert first.layers_downloaded == 3  # pause + two app layers
    entries = json.loads(cache.read_text())
    assert sorted(e["diff_id"] for e in entries) == sorted(
        _diff_ids(images.app_layers + images.pause_layers)
    )
    second = generate(pod(images.app), "pod.yaml", opts(images, layers_cache=cache))
    assert second.layers_downloaded == 0
    assert second.yaml == first.yaml
    # The cache really is what the second run used: a changed entry shows up in the policy.
    for e in entries:
        e["verity_hash"] = "ab" * 32
    cache.write_text(json.dumps(entries))
    _, data = policy_of(
        generate(pod(images.app), "pod.yaml", opts(images, layers_cache=cache)).yaml
    )
    assert data["containers"][1]["storages"][-1]["options"][1] == ":".join(["ab" * 32] * 2)


def test_zstd_layers_and_plain_cmd(images: Images, tmp_path: Path) -> None:
    _, data = policy_of(generate(pod(images.zstd), "pod.yaml", opts(images)).yaml)
    c = data["containers"][1]
    assert c["OCI"]["Process"]["Args"] == ["/z"]
    tar = tar_layer({"z": b"zstd layer"})
    (tmp_path / "z.tar").write_bytes(tar)
    assert c["storages"][-1]["options"][1] == tardev.layer_root_hash(tmp_path / "z.tar").hex()


WORKLOADS = {
    "Deployment": {"replicas": 2, "selector": {"matchLabels": {"a": "b"}}},
    "ReplicaSet": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}}},
    "StatefulSet": {"serviceName": "s", "selector": {"matchLabels": {"a": "b"}}},
    "DaemonSet": {"selector": {"matchLabels": {"a": "b"}}},
    "Job": {"backoffLimit": 1},
}


@pytest.mark.parametrize("kind", [*WORKLOADS, "CronJob", "List"])
def test_workload_kinds_annotate_the_pod_template(images: Images, kind: str) -> None:
    template = {
        "metadata": {"labels": {"a": "b"}},
        "spec": {"containers": [{"name": "app", "image": images.app}], "restartPolicy": "Never"},
    }
    if kind == "CronJob":
        doc = {
            "apiVersion": "batch/v1",
            "kind": kind,
            "metadata": {"name": "web"},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}},
        }
    elif kind == "List":
        doc = {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "svc"},
                    "spec": {"ports": []},
                },
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "web"},
                    "spec": {"selector": {}, "template": template},
                },
            ],
        }
    else:
        doc = {
            "apiVersion": "apps/v1",
            "kind": kind,
            "metadata": {"name": "web"},
            "spec": {**WORKLOADS[kind], "template": template},
        }
    out = yaml.safe_load(generate(yaml.safe_dump(doc), "w.yaml", opts(images)).yaml)
    if kind == "CronJob":
        tmeta = out["spec"]["jobTemplate"]["spec"]["template"]["metadata"]
    elif kind == "List":
        tmeta = out["items"][1]["spec"]["template"]["metadata"]
    else:
        tmeta = out["spec"]["template"]["metadata"]
    text, data = policy_of(yaml.safe_dump({"metadata": tmeta}))
    pol = AgentPolicy(text)
    # The pod name is generated by the controller: any generated suffix is accepted.
    req = create_container_request(data, 1, sandbox_name="web-7d9f8b6c5-x2x7k")
    assert pol.evaluate("CreateContainerRequest", req).allowed
    req = create_container_request(data, 1, sandbox_name="other-7d9f8b6c5-x2x7k")
    assert "io.kubernetes.cri.sandbox-name" in pol.evaluate("CreateContainerRequest", req).message()


def test_env_from_config_file_and_field_refs(images: Images, tmp_path: Path) -> None:
    cm = tmp_path / "cm.yaml"
    cm.write_text(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "cfg", "namespace": "shop"},
                    "data": {"COLOR": "blue"},
                },
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "sec", "namespace": "shop"},
                    "data": {"TOKEN": base64.b64encode(b"s3cret").decode()},
                },
            ]
        )
    )
    env = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "GREETING", "value": "hello $(POD)"},
    ]
    res = generate(
        pod(images.app, env=env, envFrom=[{"configMapRef": {"name": "cfg"}}]),
        "pod.yaml",
        opts(images, config_files=(cm,)),
    )
    _, data = policy_of(res.yaml)
    envs = data["containers"][1]["OCI"]["Process"]["Env"]
    assert {
        "COLOR=blue",
        "TOKEN=s3cret",
        "POD=$(sandbox-name)",
        "GREETING=hello $(sandbox-name)",
    } <= set(envs)
    pol = AgentPolicy.from_data(data)
    assert pol.evaluate("CreateContainerRequest", create_container_request(data, 1)).allowed


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real ``coco`` entry point (exit codes and one-line errors come from it)."""
    exe = Path(sys.executable).with_name("coco")
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, check=False, timeout=120)
    r.exit_code = r.returncode  # type: ignore[attr-defined]
    return r


def test_cli_generate_then_evaluate(images: Images, tmp_path: Path) -> None:
    src = tmp_path / "pod.yaml"
    src.write_text(pod(images.app))
    out = tmp_path / "out.yaml"
    r = run_cli(
        "policy",
        "generate",
        str(src),
        "-o",
        str(out),
        "--settings",
        str(images.settings),
        "--src-tls-verify=false",
        "--layers-cache",
        str(tmp_path / "c.json"),
        "--raw-out",
        str(tmp_path / "policy.rego"),
        "--layers",
        "tardev",
        "--annotation",
        "policy",
    )
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "policy.rego").read_text() == policy_of(out.read_text())[0]
    assert "--src-tls-verify=false" in r.stderr  # the insecure option warns
    _, data = policy_of(out.read_text())
    req = tmp_path / "req.json"
    req.write_text(json.dumps(create_container_request(data, 1)))
    for policy in (out, tmp_path / "policy.rego"):  # the pod YAML, or the raw Rego text
        r = run_cli(
            "policy", "evaluate", "--policy", str(policy), "CreateContainerRequest", str(req)
        )
        assert (r.exit_code, r.stdout) == (0, "allowed\n")
    exe = tmp_path / "exec.json"
    exe.write_text(json.dumps({"process": {"Args": ["sh"]}}))
    r = run_cli("policy", "evaluate", "--policy", str(out), "ExecProcessRequest", str(exe))
    assert r.exit_code == 1
    assert r.stdout == "denied: ExecProcessRequest: rule exec: process.Args expected [], got sh\n"


BAD_DOCS = [
    (
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x"},
            "spec": {
                "containers": [{"name": "a", "image": "i"}],
                "volumes": [{"name": "data.*", "emptyDir": {}}],
            },
        },
        "document 1 (Pod x): spec.volumes[0].name: expected a DNS label ([a-z0-9-], at most 63), "
        "got 'data.*'",
    ),
    (
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x"},
            "spec": {
                "containers": [{"name": "a", "image": "i", "env": [{"name": "A", "vlaue": "1"}]}]
            },
        },
        "document 1 (Pod x): spec.containers[0].env[0]: unsupported field 'vlaue'",
    ),
    (
        {"apiVersion": "v1", "kind": "Frobnicator", "metadata": {"name": "x"}},
        "document 1 (Frobnicator x): unsupported kind 'Frobnicator'",
    ),
    (
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x"},
            "spec": {"dnsPolicy": "None", "containers": [{"name": "a", "image": "i", "bogus": 1}]},
        },
        "document 1 (Pod x): spec.containers[0]: unsupported field 'bogus'",
    ),
    (
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x"},
            "spec": {"hostPID": True, "containers": []},
        },
        "document 1 (Pod x): spec: unsupported field 'hostPID'",
    ),
    (
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {
                "template": {
                    "spec": {
                        "containers": [{"name": "a", "image": "i", "securityContext": {"x": 1}}]
                    }
                }
            },
        },
        "document 1 (Deployment d): spec.template.spec.containers[0].securityContext: unsupported field 'x'",
    ),
    (
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x"},
            "spec": {"containers": "nope"},
        },
        "document 1 (Pod x): spec.containers: expected an array, found a string",
    ),
]


@pytest.mark.parametrize(("doc", "message"), BAD_DOCS)
def test_bad_input_one_line_error_no_output(
    doc: dict[str, Any], message: str, tmp_path: Path
) -> None:
    src = tmp_path / "pod.yaml"
    src.write_text(yaml.safe_dump(doc))
    before = src.read_text()
    out = tmp_path / "out.yaml"
    r = run_cli("policy", "generate", str(src), "-o", str(out))
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1
    assert message in r.stderr
    assert r.stderr.startswith(f"coco: error: {src}: document 1 (")
    assert not out.exists() and src.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pod.yaml"]


def test_bad_yaml_and_missing_config_map(images: Images, tmp_path: Path) -> None:
    src = tmp_path / "pod.yaml"
    src.write_text("kind: Pod\nmetadata: {name: [unclosed\n")
    r = run_cli("policy", "generate", str(src), "-o", str(tmp_path / "o.yaml"))
    assert r.exit_code == 1 and "not valid YAML" in r.stderr and r.stderr.count("\n") == 1
    src.write_text(pod(images.app, envFrom=[{"configMapRef": {"name": "missing"}}]))
    r = run_cli(
        "policy",
        "generate",
        str(src),
        "-o",
        str(tmp_path / "o.yaml"),
        "--settings",
        str(images.settings),
        "--src-tls-verify=false",
    )
    assert r.exit_code == 1
    assert "container app: envFrom[0].configMapRef: 'missing' not found" in r.stderr
    assert not (tmp_path / "o.yaml").exists()


def test_volumes_emptydir_and_configmap(images: Images) -> None:
    doc = yaml.safe_load(
        pod(
            images.app,
            volumeMounts=[
                {"name": "scratch", "mountPath": "/scratch"},
                {"name": "cfg", "mountPath": "/etc/app", "readOnly": True},
            ],
        )
    )
    doc["spec"]["volumes"] = [
        {"name": "scratch", "emptyDir": {}},
        {"name": "cfg", "configMap": {"name": "app-config"}},
    ]
    _, data = policy_of(generate(yaml.safe_dump(doc), "pod.yaml", opts(images)).yaml)
    c = data["containers"][1]
    assert [s["driver"] for s in c["storages"]] == ["blk", "blk", "overlayfs", "local"]
    mounts = {m["destination"]: m for m in c["OCI"]["Mounts"]}
    assert mounts["/etc/app"]["source"] == "$(sfprefix)cfg$"
    assert mounts["/etc/app"]["options"] == ["rbind", "rprivate", "ro"]
    assert mounts["/scratch"]["source"] == "^$(cpath)/$(sandbox-id)/rootfs/local/scratch$"
    pol = AgentPolicy.from_data(data)
    req = create_container_request(data, 1)
    assert pol.evaluate("CreateContainerRequest", req).allowed
    bad = copy.deepcopy(req)
    bad["storages"][-1]["mount_point"] = "/run/kata-containers/shared/containers/elsewhere"
    assert "rule storages: storages[3]" in pol.evaluate("CreateContainerRequest", bad).message()
