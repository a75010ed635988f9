"""The pod VM's init (pid 1 inside the guest), copied into the root image by ``coco podvm build``.

Standard library only: it runs under the guest's ``python3 -I -S`` before anything else, and the
host side never imports it except to test its pieces. In order it:

1. mounts ``/proc``, ``/sys``, ``/dev/pts``, ``/dev/shm``, ``/run``, ``/tmp`` and cgroup v2;
2. loads the kernel modules listed in ``/usr/lib/coco-podvm/modules`` (modprobe);
3. brings up ``lo`` and ``eth0`` (QEMU user networking: ``coco.ip=ADDR/PREFIX,GATEWAY,DNS``);
4. links ``/dev/virtio-ports/<name>`` for each virtio-serial port (no udev here);
5. reads the initdata from a disk that starts with the ``initdata`` magic (or from
   ``coco.initdata=<base64 gzip>`` on the kernel command line), checks it, and writes its files
   and the whole TOML under ``/run/confidential-containers/initdata/``;
6. starts ``coco aa serve`` (given the initdata TOML and ``aa.toml``; it binds the digest at
   start, which for a vTPM extends PCR 8 once with the digest fitted to 32 bytes) and waits for
   its socket, then ``coco cdh serve``, ``coco api-server serve`` and ``coco agent serve
   --server-addr serial:///dev/virtio-ports/agent.0``, each only if this build's ``coco`` has the
   group, as upstream's agent launches them; without an AA it extends PCR 8 itself, so the
   digest is bound exactly once; it reads PCR 8 back for the report; it waits for the AA's
   socket, and for the agent to hold its port open (a host that writes before that waits in
   QEMU's buffer, but one that gives up and reconnects leaves stale frames in the one stream);
7. prints :data:`READY` with what it found, then reaps children until the VM is powered off.

In peer-pod mode (``coco.peerpod=1``, or a ``cidata`` config drive: a VM of the
cloud-api-adaptor) step 6 is :func:`start_peerpod`: the AA binds the launch initdata, then ``coco
process-user-data`` checks the userdata's initdata against PCR 8 and writes ``/run/peerpod``
(a mismatch is an error: the VM powers off), then the CDH, the api-server, the agent on
``unix:///run/kata-containers/agent.sock`` and ``coco forwarder serve`` on 15150.

Every report goes to the serial console as ``coco-podvm: <what> key=value ...``; a failure prints
``coco-podvm: error: ...`` and powers the VM off, so the host sees it at once.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
import tomllib
import zlib
from pathlib import Path

PREFIX = "coco-podvm:"
READY = f"{PREFIX} ready"
INITDATA_DIR = Path("/run/confidential-containers/initdata")
MODULES_FILE = Path("/usr/lib/coco-podvm/modules")
COCO = "/usr/local/bin/coco"
TPM_DEVICE = "/dev/tpmrm0"
INITDATA_PCR = 8
MAGIC = b"initdata"
MAX_INITDATA = 16 * 1024 * 1024
VERSION = "0.1.0"
ALGORITHMS = ("sha256", "sha384", "sha512")
DEFAULT_IP = "10.0.2.15/24,10.0.2.2,10.0.2.3"  # QEMU user networking's defaults
AGENT_PORT = "/dev/virtio-ports/agent.0"
AA_SOCKET = "/run/confidential-containers/attestation-agent/attestation-agent.sock"
SERVICE_TIMEOUT = 300.0  # seconds for a service to listen (Python under TCG is slow)
SERVICES = ("aa", "cdh", "api-server", "agent")  # the coco groups started, in this order


class InitError(Exception):
    """Something the guest cannot start without; the message is printed and the VM powers off."""


def say(what: str, **fields: object) -> None:
    tail = "".join(f" {k.replace('_', '-')}={v}" for k, v in fields.items())
    sys.stdout.write(f"{PREFIX} {what}{tail}\n")
    sys.stdout.flush()


# --- pieces (tested on the host) ----------------------------------------------------------------


def parse_cmdline(text: str) -> dict[str, str]:
    """The ``key=value`` words of a kernel command line (a bare word maps to "")."""
    out: dict[str, str] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        out[key] = value
    return out


def read_initdata_image(head: bytes, where: str) -> bytes | None:
    """The TOML inside an initdata disk image, or None if ``head`` does not start with the magic.

    ``head`` is the start of the device (at least the header and the gzip bytes it announces)."""
    if not head.startswith(MAGIC):
        return None
    if len(head) < len(MAGIC) + 8:
        raise InitError(f"initdata {where}: truncated header")
    length = int.from_bytes(head[len(MAGIC) : len(MAGIC) + 8], "little")
    body = head[len(MAGIC) + 8 : len(MAGIC) + 8 + length]
    if length > MAX_INITDATA or len(body) != length:
        raise InitError(
            f"initdata {where}: the header announces {length} bytes of gzip, "
            f"the device holds {len(body)}"
        )
    return gunzip(body, where)


def gunzip(data: bytes, where: str) -> bytes:
    try:
        d = zlib.decompressobj(wbits=31)
        out = d.decompress(data, MAX_INITDATA + 1)
    except zlib.error as e:
        raise InitError(f"initdata {where}: expected gzip data: {e}") from None
    if len(out) > MAX_INITDATA or not d.eof:
        raise InitError(f"initdata {where}: the gzip data is truncated or too large")
    return out


def read_initdata_cmdline(value: str) -> bytes:
    """``coco.initdata=`` holds base64(gzip(TOML)), as the pod annotation does."""
    try:
        packed = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InitError(
            "initdata kernel command line: expected base64 after coco.initdata="
        ) from None
    return gunzip(packed, "kernel command line")


def check_initdata(raw: bytes, where: str) -> tuple[str, dict[str, str]]:
    """(algorithm, data) of an initdata TOML, refused unless it is version 0.1.0 with a known
    algorithm and a table of strings whose names are plain file names."""
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InitError(f"initdata {where}: expected UTF-8 TOML: {e}") from None
    if doc.get("version") != VERSION:
        raise InitError(
            f"initdata {where}: version: expected {VERSION!r}, found {doc.get('version')!r}"
        )
    algorithm = doc.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise InitError(
            f"initdata {where}: algorithm: expected one of {', '.join(ALGORITHMS)}, found {algorithm!r}"
        )
    data = doc.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise InitError(f"initdata {where}: data: expected a table of strings")
    for name in data:
        if name in ("", ".", "..", "initdata.toml") or "/" in name or "\0" in name:
            raise InitError(f"initdata {where}: data: {name!r} is not a plain file name")
    return algorithm, data


def write_initdata(raw: bytes, data: dict[str, str], directory: Path) -> list[str]:
    """Write each data entry and the whole TOML (``initdata.toml``) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = {**{k: v.encode() for k, v in data.items()}, "initdata.toml": raw}
    for name, content in files.items():
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
    return sorted(files)


def fit32(digest: bytes) -> bytes:
    """The digest as PCR 8 takes it: truncated or zero-padded to 32 bytes."""
    return digest[:32].ljust(32, b"\0")


def coco_groups(help_text: str) -> set[str]:
    """The command groups listed under ``Commands:`` in ``coco --help``."""
    groups: set[str] = set()
    listing = False
    for line in help_text.splitlines():
        if line.strip() == "Commands:":
            listing = True
        elif listing and line.startswith("  ") and line.strip():
            groups.add(line.split()[0])
        elif listing and line.strip():
            listing = False
    return groups


# --- boot steps ---------------------------------------------------------------------------------


def sh(*cmd: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", env=env, check=False
    )
    if check and proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise InitError(f"{' '.join(cmd)}: {reason}")
    return proc.stdout


def mount_all() -> None:
    mounts = [
        ("proc", "/proc", "proc", "nosuid,nodev,noexec"),
        ("sysfs", "/sys", "sysfs", "nosuid,nodev,noexec"),
        ("devpts", "/dev/pts", "devpts", "nosuid,noexec,gid=5,mode=620,ptmxmode=666"),
        ("tmpfs", "/dev/shm", "tmpfs", "nosuid,nodev"),
        ("tmpfs", "/run", "tmpfs", "nosuid,nodev,mode=755"),
        ("tmpfs", "/tmp", "tmpfs", "nosuid,nodev,mode=1777"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", "nosuid,nodev,noexec"),
    ]
    if not os.path.ismount("/dev"):
        mounts.insert(0, ("devtmpfs", "/dev", "devtmpfs", "nosuid,mode=755"))
    for source, target, fstype, options in mounts:
        os.makedirs(target, exist_ok=True)
        sh("mount", "-t", fstype, "-o", options, source, target)
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("ptmx", "pts/ptmx")):  # fmt: skip
        with contextlib.suppress(FileExistsError):
            os.symlink(target, f"/dev/{link}")


def load_modules() -> None:
    names = MODULES_FILE.read_text().split() if MODULES_FILE.exists() else []
    if names:
        sh("modprobe", "-a", *names)
    say("modules", loaded=",".join(names) or "none")


def network(spec: str) -> None:
    sh("ip", "link", "set", "lo", "up")
    if not Path("/sys/class/net/eth0").exists():
        say("network", eth0="none")
        return
    try:
        address, gateway, dns = spec.split(",")
    except ValueError:
        raise InitError(f"coco.ip: expected ADDR/PREFIX,GATEWAY,DNS, found {spec!r}") from None
    sh("ip", "link", "set", "eth0", "up")
    sh("ip", "addr", "add", address, "dev", "eth0")
    sh("ip", "route", "add", "default", "via", gateway)
    Path("/etc/resolv.conf").unlink(missing_ok=True)
    Path("/etc/resolv.conf").write_text(f"nameserver {dns}\n")
    say("network", eth0=address, gateway=gateway, dns=dns)


def virtio_ports() -> list[str]:
    names = []
    ports = Path("/sys/class/virtio-ports")
    for port in sorted(ports.iterdir()) if ports.is_dir() else []:
        name = (port / "name").read_text().strip()
        if name and "/" not in name:
            Path("/dev/virtio-ports").mkdir(exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.symlink(f"../{port.name}", f"/dev/virtio-ports/{name}")
            names.append(name)
    say("virtio-ports", names=",".join(names) or "none")
    return names


def find_initdata(cmdline: dict[str, str]) -> tuple[bytes, str] | None:
    if "coco.initdata" in cmdline:
        return read_initdata_cmdline(cmdline["coco.initdata"]), "kernel-command-line"
    for dev in sorted(Path("/dev").glob("vd*")) + sorted(Path("/dev").glob("sd*")):
        if dev.name[-1].isdigit():  # a partition
            continue
        try:
            with open(dev, "rb") as f:
                head = f.read(len(MAGIC) + 8)
                if not head.startswith(MAGIC) or len(head) < len(MAGIC) + 8:
                    continue
                length = int.from_bytes(head[len(MAGIC) :], "little")
                head += f.read(min(length, MAX_INITDATA + 1))
        except OSError:
            continue
        raw = read_initdata_image(head, str(dev))
        if raw is not None:
            return raw, str(dev)
    return None


def extend_pcr8(digest: bytes) -> None:
    env = {**os.environ, "TPM2TOOLS_TCTI": f"device:{TPM_DEVICE}"}
    sh("tpm2_pcrextend", f"{INITDATA_PCR}:sha256={fit32(digest).hex()}", env=env)


def read_pcr8() -> str:
    env = {**os.environ, "TPM2TOOLS_TCTI": f"device:{TPM_DEVICE}"}
    out = Path("/run/coco-podvm/pcr8.bin")
    out.parent.mkdir(parents=True, exist_ok=True)
    sh("tpm2_pcrread", f"sha256:{INITDATA_PCR}", "-o", str(out), env=env)
    return out.read_bytes().hex()


def load_initdata(cmdline: dict[str, str]) -> tuple[bytes, set[str]] | None:
    """Find, check and write the initdata; its digest and the names of the files written."""
    found = find_initdata(cmdline)
    if found is None:
        say("initdata", source="none")
        return None
    raw, source = found
    algorithm, data = check_initdata(raw, source)
    files = write_initdata(raw, data, INITDATA_DIR)
    digest = hashlib.new(algorithm, raw).digest()
    say("initdata", source=source, algorithm=algorithm, digest=digest.hex(), files=",".join(files))
    return digest, set(files)


def service_plan(
    groups: set[str], files: set[str], directory: Path = INITDATA_DIR
) -> list[tuple[str, list[str], str | None]]:
    """(name, coco arguments, path to wait for) of each service this build has, in start order:
    a socket the service creates, or the character device it must hold open.

    As upstream's agent launches them: the AA gets the initdata TOML (it binds the digest to the
    TEE at start: PCR 8 of a vTPM) and the initdata's ``aa.toml``; the CDH its ``cdh.toml``; the
    agent its ``policy.rego`` and the virtio-serial port."""
    plan: list[tuple[str, list[str], str | None]] = []
    if "aa" in groups:
        args = ["aa", "serve", "--attestation_sock", f"unix://{AA_SOCKET}"]
        if "initdata.toml" in files:
            args += ["--initdata-toml", str(directory / "initdata.toml")]
        if "aa.toml" in files:
            args += ["--config-file", str(directory / "aa.toml")]
        plan.append(("aa", args, AA_SOCKET))
    if "cdh" in groups:
        args = ["cdh", "serve"]
        if "cdh.toml" in files:
            args += ["--config", str(directory / "cdh.toml")]
        plan.append(("cdh", args, None))
    if "api-server" in groups:
        plan.append(("api-server", ["api-server", "serve"], None))
    if "agent" in groups:
        args = ["agent", "serve", "--server-addr", f"serial://{AGENT_PORT}"]
        if "policy.rego" in files:
            args += ["--policy", str(directory / "policy.rego")]
        plan.append(("agent", args, AGENT_PORT))
    return plan


def holds_open(pid: int, path: str, proc_root: Path = Path("/proc")) -> bool:
    """Whether process ``pid`` has ``path`` (after symlinks) open."""
    target = os.path.realpath(path)
    try:
        fds = list((proc_root / str(pid) / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd) == target:
                return True
    return False


def listening(pid: int, path: str) -> bool:
    """A socket path exists, or a character device is held open by ``pid``."""
    if Path(path).is_char_device():
        return holds_open(pid, path)
    return Path(path).exists()


def start_service(
    name: str, args: list[str], socket: str | None, wrap: tuple[str, ...] = ()
) -> int:
    """Start ``coco ARGS`` (behind ``wrap``, e.g. ``ip netns exec NS``); with ``socket``, wait
    until it listens there (see :func:`listening`)."""
    proc = subprocess.Popen([*wrap, COCO, *args], stdin=subprocess.DEVNULL, start_new_session=True)
    start = time.monotonic()
    while socket is not None and not listening(proc.pid, socket):
        if proc.poll() is not None:
            raise InitError(f"coco {name} exited with status {proc.returncode} before listening")
        if time.monotonic() - start > SERVICE_TIMEOUT:
            raise InitError(f"coco {name} did not listen on {socket} within {SERVICE_TIMEOUT:g} s")
        time.sleep(0.02)
    waited = f"{time.monotonic() - start:.1f}" if socket is not None else "-"
    say("service", name=name, state="started", pid=proc.pid, listening_after_s=waited)
    return proc.pid


def start_all(loaded: tuple[bytes, set[str]] | None) -> tuple[dict[int, str], dict[str, str]]:
    """Start the services and bind the initdata once (by the AA, else here); report PCR 8."""
    groups = coco_groups(sh(COCO, "--help", check=False)) if os.access(COCO, os.X_OK) else set()
    digest, files = loaded if loaded is not None else (None, set())
    services: dict[int, str] = {}
    plan = service_plan(groups, files)
    for name in SERVICES:
        if name not in groups:
            say("service", name=name, state="absent")
    bound_by = "none"
    for name, args, socket in plan:
        services[start_service(name, args, socket)] = name
        if name == "aa" and digest is not None:
            bound_by = "aa"
    tpm = Path(TPM_DEVICE).exists()
    if digest is not None and bound_by == "none" and tpm:
        extend_pcr8(digest)
        bound_by = "init"
    pcr = read_pcr8() if tpm else "none"
    say("tpm", device=TPM_DEVICE if tpm else "none", pcr8=pcr, bound_by=bound_by)
    report = {
        "initdata": digest.hex() if digest is not None else "none",
        "tpm": TPM_DEVICE if tpm else "none",
        "pcr8": pcr,
        "bound_by": bound_by,
        "services": ",".join(services.values()) or "none",
    }
    return services, report


# --- peer-pod mode ------------------------------------------------------------------------------
# A VM the cloud-api-adaptor created (``coco.peerpod=1`` on the kernel command line, or a ``cidata``
# config drive): the AA binds the launch initdata first, ``coco process-user-data`` checks the
# userdata's initdata against that measurement and writes the forwarder's config, then the CDH,
# the api-server, the agent on a Unix socket and ``coco forwarder serve`` on 15150 start.

PEERPOD_DIR = Path("/run/peerpod")
AGENT_SOCKET = "/run/kata-containers/agent.sock"
FORWARDER_PORT = 15150
CDH_AUTH_ENV = "CDH_DEFAULT_IMAGE_AUTHENTICATED_REGISTRY_CREDENTIALS"
ISO_SECTOR = 2048


def is_config_drive(head: bytes) -> bool:
    """``head`` (the first 17 sectors of a device) holds an ISO 9660 volume labelled cidata."""
    pvd = head[16 * ISO_SECTOR : 17 * ISO_SECTOR]
    return pvd[:6] == b"\x01CD001" and pvd[40:72].strip().lower() == b"cidata"


def has_config_drive() -> bool:
    devices = sorted(Path("/dev").glob("vd*")) + sorted(Path("/dev").glob("sr*"))
    for dev in devices:
        if dev.name.startswith("vd") and dev.name[-1].isdigit():  # a partition
            continue
        with contextlib.suppress(OSError), open(dev, "rb") as f:
            if is_config_drive(f.read(17 * ISO_SECTOR)):
                return True
    return False


def peerpod_mode(cmdline: dict[str, str]) -> bool:
    return cmdline.get("coco.peerpod") == "1" or has_config_drive()


POD_NETNS = "podns"  # the pod's network namespace, /run/netns/podns (the forwarder's default)


def pod_netns_wrap(name: str) -> tuple[str, ...]:
    """What a peer pod's service ``name`` runs behind: the api-server in the pod's network
    namespace, where the forwarder puts the containers, so that they reach it at
    127.0.0.1:8006 as in a pod VM of coco-qemu (upstream's podvm does the same)."""
    return ("ip", "netns", "exec", POD_NETNS) if name == "api-server" else ()


def make_pod_netns() -> None:
    """``/run/netns/podns`` with ``lo`` up (the forwarder finds it made)."""
    if not Path(f"/run/netns/{POD_NETNS}").exists():
        sh("ip", "netns", "add", POD_NETNS)
    sh("ip", "-n", POD_NETNS, "link", "set", "lo", "up")


def peerpod_plan(
    groups: set[str], files: set[str], directory: Path = INITDATA_DIR
) -> list[tuple[str, list[str], str | None]]:
    """:func:`service_plan` as a peer pod runs it: the agent on :data:`AGENT_SOCKET` (the
    forwarder's side), then ``coco forwarder serve`` (waited for on ``tcp:15150``)."""
    plan = []
    for name, args, wait in service_plan(groups, files, directory):
        if name == "agent":
            args[args.index("--server-addr") + 1] = f"unix://{AGENT_SOCKET}"
            wait = AGENT_SOCKET
        plan.append((name, args, wait))
    if "forwarder" in groups:
        args = ["forwarder", "serve", "--config", str(PEERPOD_DIR / "apf.json")]
        plan.append(("forwarder", args, f"tcp:{FORWARDER_PORT}"))
    return plan


def userdata_args(tpm: bool) -> list[str]:
    """``coco process-user-data``: checked against PCR 8 when there is a vTPM."""
    return ["process-user-data", "--tee", "tpm" if tpm else "none"]


def tcp_listening(port: int, tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> bool:
    """Some socket listens on TCP ``port`` (state 0A in ``/proc/net/tcp``)."""
    for table in tables:
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == "0A" and fields[1].endswith(f":{port:04X}"):
                return True
    return False


def wait_tcp(name: str, pid: int, port: int) -> None:
    start = time.monotonic()
    while not tcp_listening(port):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            raise InitError(f"coco {name} exited with status {code} before listening")
        if time.monotonic() - start > SERVICE_TIMEOUT:
            raise InitError(
                f"coco {name} did not listen on tcp {port} within {SERVICE_TIMEOUT:g} s"
            )
        time.sleep(0.05)
    say("service", name=name, state="listening", port=port,
        listening_after_s=f"{time.monotonic() - start:.1f}")  # fmt: skip


def process_userdata(tpm: bool) -> None:
    """Run ``coco process-user-data``; its last error line becomes the init's error."""
    if not tpm:
        say("userdata", check="none", reason="no-vTPM", initdata_checked="no-INSECURE")
    start = time.monotonic()
    proc = subprocess.run(
        [COCO, *userdata_args(tpm)], capture_output=True, text=True, errors="replace", check=False
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise InitError(
            f"process-user-data: {lines[-1] if lines else f'exit status {proc.returncode}'}"
        )
    sys.stdout.write(proc.stderr)  # which files it wrote, from where
    took = f"{time.monotonic() - start:.1f}"
    say("userdata", state="written", initdata_check="pcr8" if tpm else "none", took_s=took)


def start_peerpod(loaded: tuple[bytes, set[str]] | None) -> tuple[dict[int, str], dict[str, str]]:
    """The peer-pod start: AA (binds PCR 8 once), userdata checked against it, then the rest."""
    groups = coco_groups(sh(COCO, "--help", check=False)) if os.access(COCO, os.X_OK) else set()
    digest, files = loaded if loaded is not None else (None, set())
    tpm = Path(TPM_DEVICE).exists()
    Path(AGENT_SOCKET).parent.mkdir(parents=True, exist_ok=True)
    services: dict[int, str] = {}
    bound_by = "none"
    plan = peerpod_plan(groups, files)
    for name in (*SERVICES, "forwarder", "process-user-data"):
        if name not in groups:
            raise InitError(f"peer pod: this image's coco has no {name} command")
    for name, args, wait in plan:
        if name == "cdh" and (PEERPOD_DIR / "auth.json").exists():
            os.environ[CDH_AUTH_ENV] = f"file://{PEERPOD_DIR / 'auth.json'}"
        wrap = pod_netns_wrap(name)
        if wrap:
            make_pod_netns()
        if wait is not None and wait.startswith("tcp:"):
            pid = start_service(name, args, None, wrap)
            wait_tcp(name, pid, int(wait[4:]))
        else:
            pid = start_service(name, args, wait, wrap)
        services[pid] = name
        if name == "aa":
            if digest is not None:
                bound_by = "aa"
            process_userdata(tpm)  # after the binding, before anything reads the userdata
    pcr = read_pcr8() if tpm else "none"
    say("tpm", device=TPM_DEVICE if tpm else "none", pcr8=pcr, bound_by=bound_by)
    report = {
        "mode": "peerpod",
        "initdata": digest.hex() if digest is not None else "none",
        "tpm": TPM_DEVICE if tpm else "none",
        "pcr8": pcr,
        "bound_by": bound_by,
        "agent": f"unix://{AGENT_SOCKET}",
        "forwarder": FORWARDER_PORT,
        "services": ",".join(services.values()) or "none",
    }
    return services, report


def memory() -> dict[str, str]:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {
        "mem_total_kib": info["MemTotal"].split()[0],
        "mem_available_kib": info["MemAvailable"].split()[0],
    }


def poweroff() -> None:
    os.sync()
    for cmd in (["busybox", "poweroff", "-f"], ["poweroff", "-f"]):
        with contextlib.suppress(OSError):
            subprocess.run(cmd, check=False)
    time.sleep(10)


def reap(services: dict[int, str]) -> None:
    """Reap every child for ever, reporting when a service exits."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            signal.pause()
            continue
        if pid in services:
            say(
                "service",
                name=services.pop(pid),
                state="exited",
                status=os.waitstatus_to_exitcode(status),
            )


def main() -> None:
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    os.environ["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    signal.signal(signal.SIGTERM, lambda *_: poweroff())
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        mount_all()
        cmdline = parse_cmdline(Path("/proc/cmdline").read_text())
        with contextlib.suppress(OSError):
            Path("/proc/sys/kernel/hostname").write_text("coco-podvm")
        load_modules()
        network(cmdline.get("coco.ip", DEFAULT_IP))
        ports = virtio_ports()
        start = start_peerpod if peerpod_mode(cmdline) else start_all
        services, report = start(load_initdata(cmdline))
        uptime = Path("/proc/uptime").read_text().split()[0]
        say(
            "ready",
            uptime_s=uptime,
            agent_port=AGENT_PORT if "agent.0" in ports else "none",
            **report,
            **memory(),
        )
    except Exception as e:  # pid 1 must not die: report and power off
        say(f"error: {' '.join(str(e).split())}")
        poweroff()
        return
    reap(services)


if __name__ == "__main__":
    main()
