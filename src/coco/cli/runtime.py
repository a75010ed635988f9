"""``coco runtime``: install coco's containerd runtime handlers (what kata-deploy does on a node)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Commands, Parser, boolean, path, run_group, shown

DESCRIPTION = (
    "Install coco's runtime handlers (coco-qemu, coco-remote, coco-local: runtime "
    "io.containerd.coco.v2) into containerd's config, and remove them again."
)


def _say(text: str) -> None:
    sys.stderr.write(f"runtime: {text}\n")
    sys.stderr.flush()


def _add_common(p: Parser) -> None:
    p.add_argument(
        "--containerd-config",
        type=path(dir_okay=False),
        default=Path("/etc/containerd/config.toml"),
        metavar="FILE",
        help=shown("containerd's config (version 2).", "/etc/containerd/config.toml"),
    )
    p.add_argument(
        "--config-dir",
        type=path(file_okay=False),
        default=Path("/etc/coco"),
        metavar="DIR",
        help=shown(
            "Where the shim's configs (configuration-<kind>.toml) and the install record go.",
            "/etc/coco",
        ),
    )


def _build_install(p: Parser) -> None:
    p.description = (
        "Add to containerd's config the runtime handlers coco-qemu (the pod VM under QEMU with a "
        "vTPM), coco-remote (a peer-pod VM from a cloud-api-adaptor) and coco-local (INSECURE: "
        "the guest on this host, never a TEE), each with runtime_type io.containerd.coco.v2, the "
        "absolute path of containerd-shim-coco-v2, pod_annotations io.katacontainers.* and its "
        "shim config written to the config dir; restrict_oom_score_adj when this machine needs "
        "it; with --cni, a bridge + host-local pod network. The rest of the config is kept as it "
        "was; what changed is recorded for `coco runtime uninstall`. Idempotent. containerd reads "
        "its config at start: restart it afterwards."
    )
    _add_common(p)
    p.add_argument(
        "--shim",
        type=path(exists=True, dir_okay=False),
        metavar="FILE",
        help="The containerd-shim-coco-v2 to use (default: beside this Python, else on PATH).",
    )
    p.add_argument(
        "--shim-link-dir",
        type=path(file_okay=False),
        default=Path("/usr/local/bin"),
        metavar="DIR",
        help=shown(
            "Link containerd-shim-coco-v2 here, on containerd's PATH: containerd 1.6 ignores "
            "runtime_path and finds shims by name.",
            "/usr/local/bin",
        ),
    )
    p.add_argument("--no-shim-link", action="store_true", help="Do not link the shim anywhere.")
    p.add_argument(
        "--cni",
        action="store_true",
        help="Also write a pod network config (bridge coco0, host-local 10.88.0.0/16, portmap).",
    )
    p.add_argument(
        "--cni-conf-dir",
        type=path(file_okay=False),
        metavar="DIR",
        help="Where --cni writes 10-coco.conflist (default: the CRI's cni.conf_dir, else "
        "/etc/cni/net.d).",
    )
    p.add_argument(
        "--restrict-oom-score-adj",
        type=boolean,
        metavar="BOOL",
        help="Set the CRI's restrict_oom_score_adj (default: true when this machine cannot lower "
        "an OOM score, i.e. has no CAP_SYS_RESOURCE).",
    )
    p.add_argument(
        "--podvm-image",
        type=path(file_okay=False),
        metavar="DIR",
        help="The pod VM image directory for coco-qemu (default: the shim's own default).",
    )
    p.add_argument(
        "--remote-hypervisor-socket",
        default="/run/peerpod/hypervisor.sock",
        metavar="PATH",
        help=shown("The cloud-api-adaptor socket for coco-remote.", "/run/peerpod/hypervisor.sock"),
    )
    p.add_argument(
        "--snapshotter",
        nargs="?",
        const="/run/coco/snapshotter.sock",
        metavar="SOCKET",
        help="Make coco's snapshotter (`coco snapshotter serve`, listening on SOCKET, default "
        "/run/coco/snapshotter.sock) containerd's CRI snapshotter, with snapshot annotations on: "
        "images pulled in the guest (encrypted ones) are then not unpacked on this host. It must "
        "run whenever containerd does.",
    )
    p.add_argument(
        "--print-runtimeclasses",
        action="store_true",
        help="Print the Kubernetes RuntimeClass objects of the handlers (YAML) on stdout.",
    )
    p.set_defaults(func=install_cmd)


def install_cmd(
    containerd_config: Path,
    config_dir: Path,
    shim: Path | None,
    shim_link_dir: Path,
    no_shim_link: bool,
    cni: bool,
    cni_conf_dir: Path | None,
    restrict_oom_score_adj: bool | None,
    podvm_image: Path | None,
    remote_hypervisor_socket: str,
    print_runtimeclasses: bool,
    snapshotter: str | None = None,
) -> None:
    from coco.host import install

    opts = install.Options(
        containerd_config=containerd_config,
        config_dir=config_dir,
        shim=shim,
        link_dir=None if no_shim_link else shim_link_dir,
        cni=cni,
        cni_conf_dir=cni_conf_dir,
        restrict_oom_score_adj=restrict_oom_score_adj,
        podvm_image=podvm_image.absolute() if podvm_image else None,
        remote_socket=remote_hypervisor_socket,
        snapshotter=snapshotter,
        say=_say,
    )
    done = install.install(opts)
    for line in done:
        _say(line)
    _say(
        "installed; restart containerd to use coco-qemu, coco-remote, coco-local"
        if done
        else "already installed: nothing to do"
    )
    _say("coco-local is INSECURE (the guest runs on this host): never use it for real secrets")
    if print_runtimeclasses:
        sys.stdout.write(install.runtimeclasses())


def _build_uninstall(p: Parser) -> None:
    p.description = (
        "Remove what `coco runtime install` added: containerd's config back to its bytes before "
        "install when it was not changed since (else only coco's entries removed), and the files "
        "install wrote unless changed since. Idempotent."
    )
    _add_common(p)
    p.set_defaults(func=uninstall_cmd)


def uninstall_cmd(containerd_config: Path, config_dir: Path) -> None:
    from coco.host import install

    opts = install.Options(containerd_config=containerd_config, config_dir=config_dir, say=_say)
    done = install.uninstall(opts)
    for line in done:
        _say(line)
    if not done:
        _say(f"nothing installed into {containerd_config} (no record in {config_dir})")


def _build_runtimeclasses(p: Parser) -> None:
    p.description = "Print the Kubernetes RuntimeClass objects of coco's handlers (YAML)."
    p.set_defaults(func=runtimeclasses_cmd)


def runtimeclasses_cmd() -> None:
    from coco.host import install

    sys.stdout.write(install.runtimeclasses())


COMMANDS: Commands = {
    "install": ("Add coco's runtime handlers to containerd's config.", _build_install),
    "uninstall": ("Remove exactly what install added.", _build_uninstall),
    "runtimeclasses": ("Print the RuntimeClass YAML of the handlers.", _build_runtimeclasses),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
