"""``coco pod``: run a Kubernetes pod on this machine through a CRI runtime (containerd), as the
kubelet would, and list, inspect, exec into and delete it."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import (
    Commands,
    Parser,
    add_tls_verify,
    env_default,
    int_range,
    path,
    run_group,
    shown,
)

DESCRIPTION = (
    "Run a Kubernetes pod through a CRI runtime (containerd) as the kubelet would: images, "
    "sandbox, init containers, containers, logs, exec, clean-up."
)

_ENDPOINT_HELP = (
    "The CRI socket as crictl spells it (default: $CONTAINER_RUNTIME_ENDPOINT, else "
    "unix:///run/containerd/containerd.sock)."
)


def _say(text: str) -> None:
    sys.stderr.write(f"pod: {text}\n")
    sys.stderr.flush()


def _add_endpoint(p: Parser) -> None:
    p.add_argument(
        "--runtime-endpoint",
        dest="endpoint",
        default=env_default("CONTAINER_RUNTIME_ENDPOINT"),
        metavar="unix:///PATH",
        help=_ENDPOINT_HELP,
    )


def _add_pod(p: Parser) -> None:
    p.add_argument("name", metavar="POD", help="The pod's name (metadata.name).")
    p.add_argument(
        "-n",
        "--namespace",
        default="default",
        metavar="NS",
        help=shown("The pod's namespace.", "default"),
    )
    _add_endpoint(p)


def _add_container(p: Parser) -> None:
    p.add_argument(
        "-c",
        "--container",
        metavar="NAME",
        help="The container (needed when the pod has several).",
    )


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: stop and clean up as on Ctrl-C."""


def _on_signal(signum: int, frame: Any) -> None:
    raise _Stopped(signal.Signals(signum).name)


# --- run


def _build_run(p: Parser) -> None:
    p.description = (
        "Run the pod of POD_YAML (a Pod, or the pod template of a Deployment, StatefulSet, Job, "
        "...; ConfigMaps and Secrets in the same file feed env, volumes and imagePullSecrets) "
        "through the CRI: pull its images, create the sandbox with the pod's metadata, labels, "
        "annotations (the agent policy of `coco policy generate` among them) and runtime class, "
        "run the init containers one by one to completion, start the containers and copy their "
        "logs here (prefixed [NAME] when there are several), then stop and remove everything "
        "when they have exited, on Ctrl-C or on failure."
        "\n\nThe exit status is the container's (with several: the first non-zero one). A "
        "container that cannot be created or started (a policy deny, an image the guest cannot "
        "pull) ends the run with one line that carries the runtime's reason."
        "\n\nSupported: command, args, workingDir, env (value, fieldRef, configMapKeyRef, "
        "secretKeyRef, resourceFieldRef), envFrom, resources (cpu, memory), securityContext, "
        "volumeMounts of emptyDir, configMap, secret (from the same file) and hostPath volumes, "
        "hostPort, hostNetwork/PID/IPC, dnsConfig. restartPolicy is taken as Never; probes, "
        "lifecycle hooks and service account tokens are ignored."
        "\n\nWith a runtime that pulls in the guest (coco-*), the host reads each image's config "
        "from its registry and gives containerd a layerless placeholder under the image's name "
        "(see --guest-pull); the guest pulls, checks and decrypts the real image."
    )
    p.add_argument("pod_file", metavar="POD_YAML", type=path(exists=True, dir_okay=False))
    p.add_argument(
        "--runtime-class",
        metavar="NAME",
        help="The runtime handler, e.g. coco-qemu, coco-local or runc (default: the pod's "
        "runtimeClassName, else the runtime's default).",
    )
    _add_endpoint(p)
    p.add_argument(
        "--creds",
        metavar="USER[:PASS]",
        help="Registry credentials for every image of the pod.",
    )
    p.add_argument(
        "--authfile",
        type=path(dir_okay=False),
        metavar="FILE",
        help="auth.json with registry credentials (used after --creds and imagePullSecrets).",
    )
    p.add_argument(
        "--guest-pull",
        choices=["auto", "always", "never"],
        default="auto",
        metavar="[auto|always|never]",
        help=shown(
            "Pull the images in the guest only: the host reads their configs and gives containerd "
            "a placeholder with no layers (containerd 1.6 would unpack them on the host, which "
            "fails for encrypted images). auto: for runtime classes named coco-*.",
            "auto",
        ),
    )
    add_tls_verify(p, "--tls-verify", "")
    p.add_argument(
        "--log-root",
        type=path(file_okay=False),
        default=Path("/var/log/pods"),
        metavar="DIR",
        help=shown(
            "Where the pod's log directory <ns>_<name>_<uid> is made. The upstream agent policy "
            "expects the default.",
            "/var/log/pods",
        ),
    )
    p.add_argument(
        "--state-dir",
        type=path(file_okay=False),
        default=Path("/var/lib/coco/pods"),
        metavar="DIR",
        help=shown(
            "Where the pod's volume directories <uid>/volumes/... are made.", "/var/lib/coco/pods"
        ),
    )
    p.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="Start the pod and return; `coco pod logs`, `exec` and `delete` reach it by name.",
    )
    p.add_argument(
        "--grace-period",
        type=int_range(0, 3600),
        metavar="S",
        help="Seconds a container has to stop after SIGTERM on Ctrl-C (default: the pod's "
        "terminationGracePeriodSeconds, else 30).",
    )
    p.set_defaults(func=run_cmd)


def run_cmd(
    pod_file: Path,
    runtime_class: str | None,
    endpoint: str | None,
    creds: str | None,
    authfile: Path | None,
    log_root: Path,
    state_dir: Path,
    detach: bool,
    grace_period: int | None,
    guest_pull: str,
    tls_verify: bool,
) -> None:
    from coco.host.pod import manifest
    from coco.host.pod.runner import PodFailed, RunOptions, run

    pod = manifest.load(pod_file)
    credentials = None
    if creds is not None:
        from coco.oci.auth import parse_creds

        c = parse_creds(creds)
        credentials = (c.username, c.password)
    opts = RunOptions(
        endpoint=endpoint,
        runtime_class=runtime_class,
        log_root=log_root.absolute(),
        state_root=state_dir.absolute(),
        credentials=credentials,
        authfile=authfile,
        detach=detach,
        grace=grace_period,
        guest_pull=guest_pull,
        tls_verify=tls_verify,
        stdout=sys.stdout.buffer,
        stderr=sys.stderr.buffer,
        say=_say,
    )
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code = run(pod, opts)
    except PodFailed as e:
        sys.stdout.flush()
        sys.stderr.write(f"coco: error: {' '.join(str(e).split())}\n")
        sys.exit(e.exit_code)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if detach:
        print(pod.name)
    if code:
        sys.exit(code)


# --- list


def _build_list(p: Parser) -> None:
    p.description = "List the pods (sandboxes) of the CRI runtime and their containers."
    _add_endpoint(p)
    p.add_argument("--quiet", "-q", action="store_true", help="Only the pod names.")
    p.set_defaults(func=list_cmd)


def list_cmd(endpoint: str | None, quiet: bool) -> None:
    from coco.host.pod.runner import list_pods

    pods = list_pods(endpoint)
    if quiet:
        for pd in pods:
            print(pd.name)
        return
    rows = [("NAMESPACE", "NAME", "STATE", "RUNTIME", "AGE", "ID", "CONTAINERS")]
    now = time.time()
    for pd in pods:
        rows.append(
            (
                pd.namespace,
                pd.name,
                pd.state,
                pd.runtime_handler or "(default)",
                _age(now - pd.created_at),
                pd.id[:13],
                ", ".join(f"{n}:{s}" for n, s in pd.containers) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(f"{v:<{w}}" for v, w in zip(r, widths, strict=False)) + "  " + r[-1])


def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


# --- logs, exec, delete


def _build_logs(p: Parser) -> None:
    p.description = "Print a container's log (stdout to stdout, stderr to stderr)."
    _add_pod(p)
    _add_container(p)
    p.add_argument("-f", "--follow", action="store_true", help="Keep printing until it exits.")
    p.set_defaults(func=logs_cmd)


def logs_cmd(
    name: str, namespace: str, endpoint: str | None, container: str | None, follow: bool
) -> None:
    from coco.host.pod.runner import logs

    logs(
        endpoint,
        name,
        namespace,
        container,
        follow=follow,
        stdout=sys.stdout.buffer,
        stderr=sys.stderr.buffer,
    )


def _build_exec(p: Parser) -> None:
    p.description = (
        "Run CMD in a running container of the pod (CRI ExecSync) and print its output; the exit "
        "status is the command's."
    )
    p.usage = "coco pod exec [OPTIONS] POD [-c NAME] -- CMD [ARG]..."
    _add_pod(p)
    _add_container(p)
    p.add_argument(
        "--timeout",
        type=int_range(0, 86400),
        default=0,
        metavar="S",
        help=shown("Seconds before the command is killed (0: none).", 0),
    )
    p.add_argument("cmd", nargs="+", metavar="CMD")
    p.set_defaults(func=exec_cmd)


def exec_cmd(
    name: str,
    namespace: str,
    endpoint: str | None,
    container: str | None,
    timeout: int,
    cmd: list[str],
) -> None:
    from coco.host.pod.runner import exec_sync

    out, err, code = exec_sync(endpoint, name, namespace, container, cmd, timeout)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.stderr.buffer.write(err)
    sys.stderr.flush()
    if code:
        sys.exit(code)


def _build_delete(p: Parser) -> None:
    p.description = (
        "Stop and remove the pod: its containers (SIGTERM, SIGKILL after the grace period), its "
        "sandbox, and the log and volume directories `coco pod run` made for it."
    )
    _add_pod(p)
    p.add_argument(
        "--grace-period",
        type=int_range(0, 3600),
        default=30,
        metavar="S",
        help=shown("Seconds a container has to stop after SIGTERM.", 30),
    )
    p.set_defaults(func=delete_cmd)


def delete_cmd(name: str, namespace: str, endpoint: str | None, grace_period: int) -> None:
    from coco.host.pod.runner import delete

    delete(endpoint, name, namespace, grace_period, _say)
    _say(f"pod {namespace}/{name} deleted")


COMMANDS: Commands = {
    "run": ("Run a pod from Kubernetes YAML until its containers exit.", _build_run),
    "list": ("List the pods of the CRI runtime.", _build_list),
    "logs": ("Print a container's log.", _build_logs),
    "exec": ("Run a command in a running container.", _build_exec),
    "delete": ("Stop and remove a pod.", _build_delete),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
