"""``coco pod run`` against a real containerd with its stock runc runtime (the ``runc`` handler):
the kubelet stand-in proven on its own, independently of coco's shim."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from coco.host.pod.cri import CriClient
from tests.conftest import Registry
from tests.host.containerd_fixture import Containerd, CriImages

pytestmark = pytest.mark.timeout(300)


def coco(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coco.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def write_pod(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pod.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def pod_args(ctrd: Containerd, tmp_path: Path) -> list[str]:
    return [
        "--runtime-endpoint",
        ctrd.endpoint,
        "--runtime-class",
        "runc",
        "--log-root",
        str(tmp_path / "logs"),
        "--state-dir",
        str(tmp_path / "state"),
    ]


def sandboxes(ctrd: Containerd) -> list[str]:
    with CriClient(ctrd.endpoint) as c:
        return [f"{s.metadata.namespace}/{s.metadata.name}" for s in c.list_sandboxes()]


def leftovers(tmp_path: Path) -> list[str]:
    return [
        str(p.relative_to(tmp_path))
        for d in ("logs", "state")
        if (tmp_path / d).exists()
        for p in (tmp_path / d).rglob("*")
    ]


def test_one_container_output_env_and_exit_code(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata:
          name: hello
          labels: {{app: hello}}
          annotations: {{example.com/note: kept}}
        spec:
          terminationGracePeriodSeconds: 1
          containers:
          - name: app
            image: {test_images.busybox}
            command: ["/bin/sh", "-c"]
            args: ["echo hello $(GREETING) from $(hostname) in $POD_NS; echo oops >&2; exit 3"]
            env:
            - {{name: WHO, value: world}}
            - {{name: GREETING, value: "dear $(WHO)"}}
            - name: POD_NS
              valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
        """,
    )
    r = coco("pod", "run", str(pod), *pod_args(containerd, tmp_path))
    assert r.returncode == 3, r.stderr
    # $(GREETING) expanded by us as the kubelet does; $(hostname) is not a variable: the shell runs it
    assert r.stdout == "hello dear world from hello in default\n"
    assert "oops\n" in r.stderr
    assert sandboxes(containerd) == []
    assert leftovers(tmp_path) == []


def test_init_containers_volumes_and_prefixes(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: ConfigMap
        metadata: {{name: settings}}
        data:
          greeting.txt: "hi from a configmap\\n"
          MODE: fast
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: web}}
        spec:
          replicas: 3
          selector: {{matchLabels: {{app: web}}}}
          template:
            metadata:
              labels: {{app: web}}
            spec:
              terminationGracePeriodSeconds: 1
              volumes:
              - {{name: scratch, emptyDir: {{}}}}
              - {{name: cfg, configMap: {{name: settings}}}}
              initContainers:
              - name: prepare
                image: {test_images.busybox}
                command: ["/bin/sh", "-c", "echo prepared > /work/state; echo init-done"]
                volumeMounts: [{{name: scratch, mountPath: /work}}]
              containers:
              - name: main
                image: {test_images.busybox}
                command: ["/bin/sh", "-c", "cat /work/state /cfg/greeting.txt; echo mode=$MODE"]
                envFrom: [{{configMapRef: {{name: settings}}}}]
                workingDir: /work
                volumeMounts:
                - {{name: scratch, mountPath: /work}}
                - {{name: cfg, mountPath: /cfg}}
        """,
    )
    r = coco("pod", "run", str(pod), *pod_args(containerd, tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "[prepare] init-done",
        "[main] prepared",
        "[main] hi from a configmap",
        "[main] mode=fast",
    ]
    assert sandboxes(containerd) == []
    assert leftovers(tmp_path) == []


def test_failed_init_container_stops_the_pod(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: broken-init}}
        spec:
          initContainers:
          - {{name: check, image: {test_images.busybox}, command: ["/bin/sh", "-c", "exit 7"]}}
          containers:
          - {{name: app, image: {test_images.busybox}, command: ["/bin/echo", "never"]}}
        """,
    )
    r = coco("pod", "run", str(pod), *pod_args(containerd, tmp_path))
    assert r.returncode == 7
    assert "never" not in r.stdout
    assert r.stderr.strip().splitlines()[-1] == (
        "coco: error: pod default/broken-init: init container check exited with code 7"
    )
    assert sandboxes(containerd) == []
    assert leftovers(tmp_path) == []


def test_container_that_cannot_start_is_one_line_and_cleaned_up(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: nocmd}}
        spec:
          containers:
          - {{name: app, image: {test_images.busybox}, command: ["/no/such/program"]}}
        """,
    )
    r = coco("pod", "run", str(pod), *pod_args(containerd, tmp_path))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "coco: error: pod default/nocmd: container app did not start: CRI StartContainer:"
    )
    assert "/no/such/program" in last
    assert sandboxes(containerd) == []
    assert leftovers(tmp_path) == []


def test_image_that_cannot_be_pulled(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    registry = test_images.busybox.split("/")[0]
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: nopull}}
        spec:
          containers:
          - {{name: app, image: {registry}/coco-test/absent:1}}
        """,
    )
    r = coco("pod", "run", str(pod), *pod_args(containerd, tmp_path))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"coco: error: pod default/nopull: container app: pulling {registry}/coco-test/absent:1: "
        "CRI PullImage:"
    ), last
    assert "not found" in last
    assert sandboxes(containerd) == []
    assert leftovers(tmp_path) == []


def test_detached_pod_list_logs_exec_delete_and_same_name(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: svc, namespace: team}}
        spec:
          terminationGracePeriodSeconds: 1
          containers:
          - name: app
            image: {test_images.busybox}
            command: ["/bin/sh", "-c", "echo started; touch /tmp/ready; exec sleep 600"]
        """,
    )
    args = pod_args(containerd, tmp_path)
    ep = ["--runtime-endpoint", containerd.endpoint]
    r = coco("pod", "run", "-d", str(pod), *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "svc\n"
    try:
        r = coco("pod", "list", *ep)
        assert r.returncode == 0, r.stderr
        row = next(line for line in r.stdout.splitlines() if " svc " in line)
        assert row.split()[:4] == ["team", "svc", "ready", "runc"]
        assert row.endswith("app:running")

        # the same name again: refused, the first pod untouched
        again = coco("pod", "run", str(pod), *args)
        assert again.returncode == 1
        assert (
            again.stderr.strip()
            .splitlines()[-1]
            .startswith(
                f"coco: error: pod team/svc already exists at {containerd.endpoint} (sandbox "
            )
        )
        assert sandboxes(containerd) == ["team/svc"]

        deadline = time.monotonic() + 30
        while True:
            r = coco("pod", "exec", "svc", "-n", "team", *ep, "--", "cat", "/tmp/ready")
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.returncode == 0, r.stderr
        r = coco(
            "pod",
            "exec",
            "svc",
            "-n",
            "team",
            *ep,
            "--",
            "/bin/sh",
            "-c",
            "echo out; echo err >&2; exit 4",
        )
        assert (r.returncode, r.stdout, r.stderr) == (4, "out\n", "err\n")

        r = coco("pod", "logs", "svc", "-n", "team", *ep)
        assert (r.returncode, r.stdout) == (0, "started\n")

        r = coco("pod", "logs", "svc", "-n", "team", "-c", "nope", *ep)
        assert r.returncode == 1
        assert "no container 'nope' (containers: app)" in r.stderr
        r = coco("pod", "logs", "absent", *ep)
        assert r.returncode == 1
        assert f"no pod default/absent at {containerd.endpoint}" in r.stderr
    finally:
        r = coco("pod", "delete", "svc", "-n", "team", "--grace-period", "1", *ep)
    assert r.returncode == 0, r.stderr
    assert sandboxes(containerd) == []
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_removes_everything(
    containerd: Containerd, test_images: CriImages, tmp_path: Path, sig: signal.Signals
) -> None:
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: stopme}}
        spec:
          terminationGracePeriodSeconds: 1
          containers:
          - {{name: app, image: {test_images.busybox}, command: ["/bin/sh", "-c", "echo ready; exec sleep 600"]}}
        """,
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coco.cli.main",
            "pod",
            "run",
            str(pod),
            *pod_args(containerd, tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        assert sandboxes(containerd) == ["default/stopme"]
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "coco: interrupted"
    assert sandboxes(containerd) == []
    assert leftovers(tmp_path) == []


def test_interrupted_while_a_container_is_being_made_removes_it(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    """Ctrl-C while containerd is inside CreateContainer, held there because coco's snapshotter
    (which prepares the container's rootfs) is stopped: `coco pod run` waits for the container,
    then removes it with the sandbox; no container or sandbox of the pod is left."""
    assert containerd.snapshotter is not None and containerd.snapshotter.proc is not None
    snapshotter = containerd.snapshotter.proc.pid
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: heldpod}}
        spec:
          terminationGracePeriodSeconds: 1
          initContainers:
          - {{name: first, image: {test_images.busybox}, command: ["/bin/sh", "-c", "echo up; sleep 2"]}}
          containers:
          - {{name: held, image: {test_images.busybox}, command: ["/bin/echo", "never"]}}
        """,
    )
    log_start = containerd.log.stat().st_size
    proc = subprocess.Popen(
        [sys.executable, "-m", "coco.cli.main", "pod", "run", str(pod),
         *pod_args(containerd, tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stopped = False
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "[first] up\n"
        os.kill(snapshotter, signal.SIGSTOP)  # before the init container ends
        stopped = True
        deadline = time.monotonic() + 60
        with containerd.log.open() as f:  # containerd logs a CreateContainer as it begins
            f.seek(log_start)
            seen = ""
            while "CreateContainer within sandbox" not in seen or "Name:held," not in seen:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                seen += f.read()
                time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        err = ""  # until the clean-up says it waits for the container (or coco pod run ends)
        while "is still being made" not in err and (line := proc.stderr.readline()):
            err += line
        os.kill(snapshotter, signal.SIGCONT)
        stopped = False
        out, rest = proc.communicate(timeout=120)
        err += rest
    finally:
        if stopped:
            os.kill(snapshotter, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "container held of pod default/heldpod is still being made" in err, err
    assert "never" not in out
    with CriClient(containerd.endpoint) as c:
        left = [x.metadata.name for x in c.list_containers()
                if x.labels.get("io.kubernetes.pod.name") == "heldpod"]  # fmt: skip
    assert left == []
    assert sandboxes(containerd) == []
    assert leftovers(tmp_path) == []


def test_logs_follow_until_the_container_exits(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: ticker}}
        spec:
          containers:
          - name: app
            image: {test_images.busybox}
            command: ["/bin/sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.5; done; echo bye >&2"]
        """,
    )
    ep = ["--runtime-endpoint", containerd.endpoint]
    r = coco("pod", "run", "-d", str(pod), *pod_args(containerd, tmp_path))
    assert r.returncode == 0, r.stderr
    try:
        r = coco("pod", "logs", "-f", "ticker", *ep)
        assert (r.returncode, r.stdout, r.stderr) == (0, "line1\nline2\nline3\n", "bye\n")
    finally:
        d = coco("pod", "delete", "ticker", *ep)
    assert d.returncode == 0, d.stderr
    assert sandboxes(containerd) == [] and leftovers(tmp_path) == []


def test_unknown_runtime_class(
    containerd: Containerd, test_images: CriImages, tmp_path: Path
) -> None:
    pod = write_pod(
        tmp_path,
        f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: norc}}
        spec:
          runtimeClassName: no-such-handler
          containers: [{{name: app, image: {test_images.busybox}}}]
        """,
    )
    args = [a for a in pod_args(containerd, tmp_path) if a not in ("--runtime-class", "runc")]
    r = coco("pod", "run", str(pod), *args)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "coco: error: pod default/norc: the sandbox did not start: CRI RunPodSandbox:"
    )
    assert "no-such-handler" in last
    assert sandboxes(containerd) == [] and leftovers(tmp_path) == []


def test_registry_credentials(
    containerd: Containerd, test_images: CriImages, registry: Registry, tmp_path: Path
) -> None:
    """imagePullSecrets, --creds and --authfile reach CRI PullImage; none: a one-line refusal."""
    image = f"{registry.host}/coco-test/private:1"
    subprocess.run(
        ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false",
         "--dest-creds", registry.creds, f"docker://{test_images.busybox}", f"docker://{image}"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    hosts = containerd.base / "certs.d" / registry.host  # containerd reads it at each pull
    hosts.mkdir(parents=True, exist_ok=True)
    (hosts / "hosts.toml").write_text(
        f'server = "http://{registry.host}"\n\n[host."http://{registry.host}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    config = base64.b64encode(registry.authfile.read_bytes()).decode()
    secret = (
        "apiVersion: v1\nkind: Secret\nmetadata: {name: regcred}\n"
        f"type: kubernetes.io/dockerconfigjson\ndata: {{.dockerconfigjson: {config}}}\n---\n"
    )

    def pod(name: str, pull_secret: bool) -> Path:
        d = tmp_path / name
        d.mkdir()
        text = (
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n"
            + ("  imagePullSecrets: [{name: regcred}]\n" if pull_secret else "")
            + f"  containers:\n  - {{name: app, image: {image}, imagePullPolicy: Always, "
            f'command: ["/bin/echo", "{name}"]}}\n'
        )
        return write_pod(d, (secret if pull_secret else "") + text)

    args = pod_args(containerd, tmp_path)
    r = coco("pod", "run", str(pod("anon", False)), *args)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"coco: error: pod default/anon: container app: pulling {image}: CRI PullImage:"
    )
    for name, extra in [
        ("secret", []),
        ("creds", ["--creds", registry.creds]),
        ("authfile", ["--authfile", str(registry.authfile)]),
    ]:
        r = coco("pod", "run", str(pod(name, name == "secret")), *args, *extra)
        assert (r.returncode, r.stdout) == (0, f"{name}\n"), r.stderr
    assert sandboxes(containerd) == [] and leftovers(tmp_path) == []
