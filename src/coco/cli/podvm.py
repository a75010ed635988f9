"""``coco podvm``: build the pod VM image and boot it under QEMU with a vTPM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Commands, Parser, env_default, int_range, path, run_group, shown
from coco.errors import CocoError, PodVmError

DESCRIPTION = "The pod VM: build its image, boot it under QEMU with a vTPM."


def _say(text: str) -> None:
    sys.stderr.write(f"podvm: {text}\n")
    sys.stderr.flush()


def _add_cache(p: Parser) -> None:
    p.add_argument(
        "--cache-dir",
        type=path(dir_okay=True, file_okay=False),
        default=env_default("COCO_PODVM_CACHE"),
        metavar="DIR",
        help="Where built images are kept (default: $COCO_PODVM_CACHE, /var/cache/coco/podvm "
        "for root, else $XDG_CACHE_HOME/coco/podvm).",
    )
    p.add_argument(
        "--source",
        type=path(exists=True, dir_okay=True, file_okay=False),
        metavar="DIR",
        help="The coco source tree to install in the image (default: the one running).",
    )


def _build_build(p: Parser) -> None:
    p.description = (
        "Build the pod VM image from Debian's packages and this project: Debian's kernel, a "
        "busybox initramfs and an ext4 root with Python, coco, runc, cryptsetup and tpm2-tools."
        "\n\nThe image is cached by a hash of everything that goes into it: a second build with "
        "the same inputs returns at once. Prints the image directory."
    )
    p.add_argument(
        "-o",
        "--output",
        type=path(dir_okay=True, file_okay=False),
        metavar="DIR",
        help="Also put the image's files (vmlinuz, initrd.img, root.img, manifest.json) here.",
    )
    p.add_argument(
        "--package",
        dest="packages",
        action="append",
        default=[],
        metavar="NAME",
        help="An extra Debian package for the root image (repeatable).",
    )
    _add_cache(p)
    p.set_defaults(func=build_cmd)


def build_cmd(
    output: Path | None, packages: list[str], cache_dir: Path | None, source: Path | None
) -> None:
    from coco.host.podvm.build import build

    start = time.monotonic()
    image = build(cache_dir=cache_dir, source=source, packages=packages, output=output, say=_say)
    state = "cached" if image.cached else f"built in {time.monotonic() - start:.1f} s"
    _say(f"image {image.dir.name} ({state})")
    print(output if output is not None else image.dir)


def _build_boot(p: Parser) -> None:
    p.description = (
        "Boot the pod VM under QEMU (KVM where it works, else TCG) with a vTPM from swtpm, the "
        "agent's channel on virtio-serial and user networking; wait for the guest to be ready, "
        "print where the agent socket is, and run until interrupted (or, with --command, run "
        "the command and power the VM off). Without --image the image is built (or found in "
        "the cache) first."
        "\n\nThe command sees COCO_PODVM_AGENT_SOCKET, COCO_PODVM_CONSOLE_LOG and "
        "COCO_PODVM_PCR8 in its environment; its exit status becomes ours."
    )
    p.add_argument(
        "--image",
        type=path(exists=True, dir_okay=True, file_okay=False),
        metavar="DIR",
        help="A built image directory (from `coco podvm build -o DIR`).",
    )
    p.add_argument(
        "--initdata",
        type=path(exists=True, dir_okay=False),
        metavar="FILE",
        help="An initdata TOML to hand to the guest as its config disk.",
    )
    p.add_argument(
        "--memory",
        type=int_range(256, 1 << 20),
        default=1024,
        metavar="MIB",
        help=shown("Guest memory in MiB.", 1024),
    )
    p.add_argument(
        "--cpus", type=int_range(1, 64), default=1, metavar="N", help=shown("Guest vCPUs.", 1)
    )
    p.add_argument(
        "--accel",
        choices=["auto", "kvm", "tcg"],
        default="auto",
        metavar="[auto|kvm|tcg]",
        help=shown("auto: KVM only when /dev/kvm opens and the CPU has vmx/svm.", "auto"),
    )
    p.add_argument(
        "--timeout",
        type=int_range(1, 86400),
        default=300,
        metavar="S",
        help=shown("Seconds to wait for the guest to be ready.", 300),
    )
    p.add_argument(
        "--forward",
        dest="forwards",
        action="append",
        default=[],
        type=_forward,
        metavar="HOST:GUEST",
        help="Forward 127.0.0.1:HOST to the guest's TCP port GUEST (repeatable).",
    )
    p.add_argument(
        "--console-log",
        type=path(dir_okay=False),
        metavar="FILE",
        help="Keep the serial console here (default: in the run directory, removed at exit).",
    )
    p.add_argument(
        "--command",
        metavar="CMD",
        help="Once ready, run CMD with the shell, then power the VM off.",
    )
    _add_cache(p)
    p.set_defaults(func=boot_cmd)


def _forward(text: str) -> tuple[int, int]:
    import argparse

    host, sep, guest = text.partition(":")
    try:
        pair = (int(host), int(guest))
    except ValueError:
        pair = (0, 0)
    if not sep or not all(0 < n < 65536 for n in pair):
        raise argparse.ArgumentTypeError(
            f"expected HOSTPORT:GUESTPORT (ports 1-65535), found {text!r}"
        )
    return pair


class _Stopped(CocoError):
    pass


def _on_signal(signum: int, frame: Any) -> None:
    raise _Stopped(signal.Signals(signum).name)


def boot_cmd(
    image: Path | None,
    initdata: Path | None,
    memory: int,
    cpus: int,
    accel: str,
    timeout: int,
    forwards: list[tuple[int, int]],
    console_log: Path | None,
    command: str | None,
    cache_dir: Path | None,
    source: Path | None,
) -> None:
    from coco.host.podvm.boot import PodVm
    from coco.host.podvm.build import Image, build

    built = (
        Image.open(image)
        if image is not None
        else build(cache_dir=cache_dir, source=source, say=_say)
    )
    raw = None
    if initdata is not None:
        try:
            raw = initdata.read_bytes()
        except OSError as e:
            raise PodVmError(f"--initdata {initdata}: cannot read it: {e.strerror}") from None
    vm = PodVm(
        built,
        initdata=raw,
        memory=memory,
        cpus=cpus,
        accel=accel,
        forwards=forwards,
        console_log=console_log,
    )
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    status = 0
    try:
        with vm:
            start = time.monotonic()
            _say(f"booting {built.dir.name} under {vm.accel} ({memory} MiB, {cpus} vCPU)")
            ready = vm.wait_ready(timeout)
            _say(
                f"ready in {time.monotonic() - start:.1f} s: services {ready.get('services')}, "
                f"tpm {ready.get('tpm')}, pcr8 {ready.get('pcr8')}"
            )
            print(f"agent socket: {vm.agent_socket}", flush=True)
            print(f"console log: {vm.console_log}", flush=True)
            if command is not None:
                status = _run_command(command, vm, ready)
            else:
                _say("running; Ctrl-C or SIGTERM stops it")
                status = vm.wait()
                _say(f"the guest powered off (qemu status {status})")
    except _Stopped as e:
        _say(f"stopped by {e}")
        status = 143
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if status:
        sys.exit(status)


def _run_command(command: str, vm: Any, ready: dict[str, str]) -> int:
    env = {
        **os.environ,
        "COCO_PODVM_AGENT_SOCKET": str(vm.agent_socket),
        "COCO_PODVM_CONSOLE_LOG": str(vm.console_log),
        "COCO_PODVM_PCR8": ready.get("pcr8", ""),
    }
    return subprocess.run(command, shell=True, env=env, check=False).returncode


COMMANDS: Commands = {
    "boot": ("Boot the pod VM under QEMU with a vTPM and wait until it is ready.", _build_boot),
    "build": ("Build the pod VM image (cached by content).", _build_build),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
