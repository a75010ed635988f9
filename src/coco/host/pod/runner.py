"""Running one pod over the CRI as the kubelet would, and the commands around it.

:func:`run` pulls the images, creates the sandbox, runs the init containers one by one to
completion, creates and starts the containers, copies their logs to our stdout and stderr
(prefixed ``[name]`` when the pod has several containers) and, when they have all exited (or on
Ctrl-C, or on any failure), stops and removes the sandbox, its containers, the log directory and
the volume directory. Interrupted while the runtime is still making the sandbox or a container
(RunPodSandbox or CreateContainer in flight), the clean-up waits for that call's answer (up to
:data:`SETTLE` s) instead of cancelling it, so that what the runtime made is removed; after a
RunPodSandbox that failed or was given up, it looks for the pod's sandbox by its name, namespace and
uid. The exit status is the app container's (with several: the first non-zero
one in the pod's order). A container that cannot be created or started (a policy deny, an image the
guest cannot pull) ends the run with one line that carries the runtime's reason.

:func:`list_pods`, :func:`logs`, :func:`exec_sync` and :func:`delete` find a pod by name through
the sandbox labels ``io.kubernetes.pod.name``/``namespace`` the kubelet (and :func:`run`) set.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from coco.errors import CocoError
from coco.host.pod import PodError, guestpull
from coco.host.pod import translate as tr
from coco.host.pod.cri import Call, CriClient
from coco.host.pod.logs import LogReader
from coco.host.pod.manifest import Container, Pod
from coco.rpc.protos import cri_pb2 as pb

STATE_ROOT = Path("/var/lib/coco/pods")
"""Where pods' volume directories live: ``<root>/<uid>/volumes/kubernetes.io~<kind>/<name>``."""

POLL = 0.1  # seconds between looks at the log files and container states
SETTLE = 60.0
"""Seconds the clean-up waits for a sandbox or container the runtime is still making."""


class PodFailed(PodError):
    """The pod ran but did not succeed; ``exit_code`` is what ``coco pod run`` exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunOptions:
    endpoint: str | None = None
    runtime_class: str | None = None
    log_root: Path = tr.LOG_ROOT
    state_root: Path = STATE_ROOT
    credentials: tuple[str, str] | None = None  # (user, password) for every image
    authfile: Path | None = None
    detach: bool = False
    guest_pull: str = "auto"  # always | never | auto: for runtime classes named coco-*
    tls_verify: bool = True  # for the registry, when the host reads a guest-pulled image's config
    grace: int | None = None  # seconds; default the pod's terminationGracePeriodSeconds or 30
    stdout: BinaryIO | None = None
    stderr: BinaryIO | None = None
    say: Callable[[str], None] = field(default=lambda text: None)


def _handler(pod: Pod, opts: RunOptions) -> str:
    return opts.runtime_class or str(pod.spec.get("runtimeClassName") or "")


def find_sandboxes(client: CriClient, name: str, namespace: str, uid: str = "") -> list[Any]:
    labels = {tr.LABEL_POD_NAME: name, tr.LABEL_POD_NAMESPACE: namespace}
    if uid:
        labels[tr.LABEL_POD_UID] = uid
    return client.list_sandboxes(labels)


# --- run


class _Run:
    def __init__(self, pod: Pod, opts: RunOptions, client: CriClient) -> None:
        self.pod = pod
        self.opts = opts
        self.client = client
        self.handler = _handler(pod, opts)
        self.log_dir = tr.log_directory(pod, opts.log_root)
        self.pod_dir = opts.state_root / pod.uid
        self.volume_dir = self.pod_dir / "volumes"
        self.sandbox_id = ""
        self.sandbox_asked = False  # RunPodSandbox was sent
        self.pending: tuple[str, Call] | None = None  # (what, call) the runtime is still making
        self.sandbox_config: Any = None
        self.created_dirs: list[Path] = []
        self.containers: dict[str, str] = {}  # name -> container id
        self.prefix = len(pod.all_containers) > 1
        self.out = opts.stdout
        self.err = opts.stderr
        self.guest_pull = opts.guest_pull == "always" or (
            opts.guest_pull == "auto" and self.handler.startswith("coco-")
        )

    # pulling

    def _auth(self, image: str) -> Any | None:
        """The credentials for ``image`` (--creds, then imagePullSecrets, then --authfile). No
        server_address: containerd 1.6 parses it as a URL and refuses a bare host:port; the
        credentials are chosen per image here anyway."""
        from coco.oci.auth import AuthFile
        from coco.oci.reference import parse_docker

        ref = parse_docker(image)
        registry = ref.registry
        if self.opts.credentials is not None:
            user, password = self.opts.credentials
            return pb.AuthConfig(username=user, password=password)
        for name, data in self.pod.pull_secrets.items():
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                f.write(data)
                f.flush()
                try:
                    creds = AuthFile.load(f.name).lookup(registry, ref.repository)
                except CocoError as e:
                    raise PodError(
                        f"{self.pod.where}: imagePullSecret {name}: {str(e).replace(f.name, '.dockerconfigjson')}"
                    ) from None
            if creds is not None:
                return pb.AuthConfig(username=creds.username, password=creds.password)
        if self.opts.authfile is not None:
            creds = AuthFile.load(self.opts.authfile).lookup(registry, ref.repository)
            if creds is not None:
                return pb.AuthConfig(username=creds.username, password=creds.password)
        return None

    def pull(self) -> dict[str, str]:
        """image as written -> the image id to create containers from."""
        refs: dict[str, str] = {}
        for c in self.pod.all_containers:
            if c.image in refs:
                continue
            policy = str(c.spec.get("imagePullPolicy") or "")
            if not policy:
                tagged = ":" in c.image.rpartition("/")[2] or "@" in c.image
                policy = "IfNotPresent" if tagged and not c.image.endswith(":latest") else "Always"
            if self.guest_pull and policy != "Never":
                refs[c.image] = self._placeholder(c)
                continue
            present = self.client.image_status(c.image)
            if present is not None and guestpull.is_placeholder(self.client, c.image):
                present = None  # a guest-pull placeholder: no rootfs for a host runtime
            if present is not None and policy != "Always":
                refs[c.image] = present.id
                continue
            if policy == "Never":
                raise PodError(
                    f"pod {self.pod.full_name}: container {c.name}: image {c.image} is not present "
                    "and imagePullPolicy is Never"
                )
            self.opts.say(f"pulling {c.image}")
            try:
                refs[c.image] = self.client.pull_image(
                    c.image, self._auth(c.image), self.sandbox_config, self.handler
                )
            except CocoError as e:
                raise PodError(
                    f"pod {self.pod.full_name}: container {c.name}: pulling {c.image}: {e}"
                ) from None
        return refs

    def _placeholder(self, c: Container) -> str:
        """The image of ``c`` as a guest-pull placeholder (see :mod:`.guestpull`)."""
        from coco.oci.auth import Credentials
        from coco.oci.transport import Access

        auth = self._auth(c.image)
        creds = Credentials(auth.username, auth.password) if auth is not None else None
        access = Access(credentials=creds, tls_verify=self.opts.tls_verify)
        self.opts.say(f"{c.image}: guest pull (the host reads its config, never its layers)")
        try:
            return guestpull.ensure(
                self.client, guestpull.socket_path(self.client.endpoint), c.image, access
            )
        except CocoError as e:
            raise PodError(f"pod {self.pod.full_name}: container {c.name}: {e}") from None

    # files on the host

    def _mkdir(self, path: Path, mode: int = 0o755) -> None:
        if not path.exists():
            top = path
            while not top.parent.exists():
                top = top.parent
            path.mkdir(mode=mode, parents=True)
            path.chmod(mode)
            self.created_dirs.append(top)

    def make_volumes(self) -> None:
        for name, v in self.pod.volumes.items():
            if "hostPath" in v:
                hp = v["hostPath"] or {}
                if hp.get("type") == "DirectoryOrCreate":
                    Path(str(hp.get("path"))).mkdir(parents=True, exist_ok=True)
                continue
            path = tr.volume_path(self.volume_dir, name, v)
            self._mkdir(self.pod_dir, 0o750)
            if "emptyDir" in v:
                self._mkdir(path, 0o777)
                continue
            kind = "configMap" if "configMap" in v else "secret"
            src = v[kind] or {}
            ref = str(src.get("name") if kind == "configMap" else src.get("secretName"))
            store = self.pod.config_maps if kind == "configMap" else self.pod.secrets
            data = store.get(ref)
            if data is None and not src.get("optional"):
                raise PodError(
                    f"{self.pod.where}: volume {name}: {kind} {ref!r} is not in the pod file"
                )
            self._mkdir(path, 0o755)
            items = src.get("items")
            files = (
                {str(i["path"]): data.get(str(i["key"]), "") for i in items}
                if items and data is not None
                else dict(data or {})
            )
            for rel, content in files.items():
                if rel.startswith("/") or ".." in rel.split("/"):
                    raise PodError(
                        f"{self.pod.where}: volume {name}: item path {rel!r} leaves the volume"
                    )
                target = path / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
                target.chmod(int(src.get("defaultMode", 0o644)) & 0o777)

    # the pod

    def start(self) -> None:
        pod = self.pod
        existing = find_sandboxes(self.client, pod.name, pod.namespace)
        if existing:
            raise PodError(
                f"pod {pod.full_name} already exists at {self.client.endpoint} (sandbox "
                f"{existing[0].id[:13]}): delete it first with `coco pod delete {pod.name}"
                + (f" -n {pod.namespace}" if pod.namespace != "default" else "")
                + "`"
            )
        self.sandbox_config = tr.sandbox_config(
            pod, log_dir=self.log_dir, volume_dir=self.volume_dir
        )
        refs = self.pull()
        self._mkdir(self.log_dir, 0o755)
        self.make_volumes()
        kind = f"runtime class {self.handler}" if self.handler else "the default runtime"
        self.opts.say(f"creating pod {pod.full_name} with {kind}")
        self.sandbox_asked = True
        try:
            self.sandbox_id = self._answer(
                f"the sandbox of pod {pod.full_name}",
                self.client.run_sandbox(self.sandbox_config, self.handler),
            )
        except CocoError as e:
            raise PodError(f"pod {pod.full_name}: the sandbox did not start: {e}") from None
        self.refs = refs

    def pod_ip(self) -> str:
        status = self.client.sandbox_status(self.sandbox_id)
        return status.network.ip if status.HasField("network") else ""

    def create(self, c: Container, pod_ip: str) -> str:
        env = tr.environment(self.pod, c, pod_ip=pod_ip, node_name=_node_name())
        cfg = tr.container_config(
            self.pod, c, image_ref=self.refs[c.image], volume_dir=self.volume_dir, env=env
        )
        kind = "init container" if c.init else "container"
        try:
            cid = self._answer(
                f"{kind} {c.name} of pod {self.pod.full_name}",
                self.client.create_container(self.sandbox_id, cfg, self.sandbox_config),
            )
        except CocoError as e:
            raise PodFailed(
                f"pod {self.pod.full_name}: {kind} {c.name} was not created: {e}"
            ) from None
        self.containers[c.name] = cid
        try:
            self.client.start_container(cid)
        except CocoError as e:
            raise PodFailed(
                f"pod {self.pod.full_name}: {kind} {c.name} did not start: {e}"
            ) from None
        return cid

    def _answer(self, what: str, call: Call) -> Any:
        """The answer of ``call``, which makes ``what``. Interrupted meanwhile (Ctrl-C, SIGTERM),
        the call stays pending: the clean-up waits for what it makes, to remove it."""
        self.pending = (what, call)
        try:
            answer = call.result()
        except CocoError:
            self.pending = None
            raise
        self.pending = None
        return answer

    def _settle(self, warn: Callable[[str], None]) -> None:
        """Wait (up to :data:`SETTLE` s) for the call the run stopped waiting for; a sandbox it
        made becomes ours to remove (a container goes with its sandbox)."""
        if self.pending is None:
            return
        (what, call), self.pending = self.pending, None
        warn(f"{what} is still being made: waiting for it (up to {SETTLE:g} s) to remove it")
        try:
            answer = call.result(timeout=SETTLE)
        except TimeoutError:
            call.cancel()
            warn(f"{what} was not made within {SETTLE:g} s: the call is cancelled")
            return
        except CocoError:
            return  # the runtime did not make it
        if call.method == "RunPodSandbox":
            self.sandbox_id = answer

    def follow(self, names: list[str]) -> dict[str, int]:
        """Copy the logs of ``names`` until they have all exited; their exit codes."""
        readers = {n: LogReader(self.log_dir / f"{n}/0.log") for n in names}
        codes: dict[str, int] = {}
        while True:
            for n in names:
                if n in codes:
                    continue
                status = self.client.container_status(self.containers[n])
                exited = status.state == pb.CONTAINER_EXITED
                self._copy(n, readers[n], final=exited)
                if exited:
                    codes[n] = status.exit_code
                    if status.exit_code != 0 and status.reason not in ("", "Completed", "Error"):
                        self.opts.say(f"{n}: {status.reason} {status.message}".strip())
            if len(codes) == len(names):
                return codes
            time.sleep(POLL)

    def _copy(self, name: str, reader: LogReader, *, final: bool) -> None:
        prefix = f"[{name}] ".encode() if self.prefix else b""
        for line in reader.read(final=final):
            out = self.err if line.stream == "stderr" else self.out
            if out is not None:
                out.write(prefix + line.text + b"\n")
                out.flush()

    def cleanup(self, warn: Callable[[str], None]) -> None:
        grace = self.opts.grace
        if grace is None:
            grace = int(self.pod.spec.get("terminationGracePeriodSeconds", 30) or 0)
        self._settle(warn)
        ids = [self.sandbox_id] if self.sandbox_id else []
        if not ids and self.sandbox_asked:  # RunPodSandbox failed or was given up
            try:
                pod = self.pod
                ids = [s.id for s in find_sandboxes(self.client, pod.name, pod.namespace, pod.uid)]
            except CocoError as e:
                warn(f"looking for the sandbox of pod {self.pod.full_name}: {e}")
        for sandbox_id in ids:
            remove_sandbox(self.client, sandbox_id, grace, warn)
        for d in reversed(self.created_dirs):
            shutil.rmtree(d, ignore_errors=True)


def run(pod: Pod, opts: RunOptions) -> int:
    """Run ``pod`` to completion (see the module docstring); its exit status."""
    with CriClient(opts.endpoint) as client:
        client.version()
        r = _Run(pod, opts, client)
        done = False
        try:
            r.start()
            pod_ip = r.pod_ip()
            for c in pod.init_containers:
                r.create(c, pod_ip)
                code = r.follow([c.name])[c.name]
                if code != 0:
                    raise PodFailed(
                        f"pod {pod.full_name}: init container {c.name} exited with code {code}",
                        code,
                    )
            for c in pod.containers:
                r.create(c, pod_ip)
            if opts.detach:
                done = True
                opts.say(f"pod {pod.full_name} is running (sandbox {r.sandbox_id})")
                return 0
            codes = r.follow([c.name for c in pod.containers])
            done = True
            return next((codes[c.name] for c in pod.containers if codes[c.name] != 0), 0)
        finally:
            if not (done and opts.detach):
                with _no_interrupts():
                    r.cleanup(opts.say)


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Let a clean-up finish even if Ctrl-C is pressed again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _node_name() -> str:
    import socket

    return socket.gethostname()


def remove_sandbox(
    client: CriClient, sandbox_id: str, grace: int, warn: Callable[[str], None]
) -> None:
    """Stop the running containers (SIGTERM, then SIGKILL after ``grace`` s), stop and remove
    the sandbox; problems are warnings (a clean-up goes on)."""
    try:
        for c in client.list_containers(sandbox_id):
            if c.state == pb.CONTAINER_RUNNING:
                client.stop_container(c.id, grace)
    except CocoError as e:
        warn(f"stopping the containers of sandbox {sandbox_id[:13]}: {e}")
    for step in (client.stop_sandbox, client.remove_sandbox):
        try:
            step(sandbox_id)
        except CocoError as e:
            warn(f"removing sandbox {sandbox_id[:13]}: {e}")


# --- list, logs, exec, delete


def _one(client: CriClient, name: str, namespace: str) -> Any:
    found = find_sandboxes(client, name, namespace)
    if not found:
        raise PodError(f"no pod {namespace}/{name} at {client.endpoint} (see `coco pod list`)")
    ready = [s for s in found if s.state == pb.SANDBOX_READY]
    return max(ready or found, key=lambda s: s.created_at)


def _container(client: CriClient, sandbox: Any, name: str | None) -> Any:
    pod = f"{sandbox.metadata.namespace}/{sandbox.metadata.name}"
    cs = sorted(client.list_containers(sandbox.id), key=lambda c: c.created_at)
    if name is not None:
        hit = [c for c in cs if c.metadata.name == name]
        if not hit:
            names = ", ".join(c.metadata.name for c in cs) or "none"
            raise PodError(f"pod {pod}: no container {name!r} (containers: {names})")
        return hit[-1]
    names = sorted({c.metadata.name for c in cs})
    if len(names) != 1:
        raise PodError(
            f"pod {pod}: expected one container, found {len(names)} ({', '.join(names) or 'none'}):"
            " choose one with -c"
        )
    return cs[-1]


@dataclass
class PodSummary:
    name: str
    namespace: str
    id: str
    state: str
    runtime_handler: str
    created_at: float
    containers: list[tuple[str, str]]  # (name, state)


_CONTAINER_STATES = {
    pb.CONTAINER_CREATED: "created",
    pb.CONTAINER_RUNNING: "running",
    pb.CONTAINER_EXITED: "exited",
    pb.CONTAINER_UNKNOWN: "unknown",
}


def list_pods(endpoint: str | None) -> list[PodSummary]:
    with CriClient(endpoint) as client:
        out = []
        containers = client.list_containers()
        for s in sorted(client.list_sandboxes(), key=lambda s: s.created_at):
            mine = sorted(
                (c for c in containers if c.pod_sandbox_id == s.id), key=lambda c: c.created_at
            )
            out.append(
                PodSummary(
                    s.metadata.name,
                    s.metadata.namespace,
                    s.id,
                    "ready" if s.state == pb.SANDBOX_READY else "notready",
                    s.runtime_handler,
                    s.created_at / 1e9,
                    [(c.metadata.name, _CONTAINER_STATES.get(c.state, "?")) for c in mine],
                )
            )
        return out


def logs(
    endpoint: str | None,
    name: str,
    namespace: str,
    container: str | None,
    *,
    follow: bool,
    stdout: BinaryIO,
    stderr: BinaryIO,
) -> None:
    with CriClient(endpoint) as client:
        sandbox = _one(client, name, namespace)
        c = _container(client, sandbox, container)
        status = client.container_status(c.id)
        reader = LogReader(Path(status.log_path))
        while True:
            try:
                status = client.container_status(c.id)
                running = status.state in (pb.CONTAINER_RUNNING, pb.CONTAINER_CREATED)
            except CocoError:
                running = False  # removed meanwhile: print what is left
            for line in reader.read(final=not (follow and running)):
                out = stderr if line.stream == "stderr" else stdout
                out.write(line.text + b"\n")
                out.flush()
            if not (follow and running):
                return
            time.sleep(POLL)


def exec_sync(
    endpoint: str | None,
    name: str,
    namespace: str,
    container: str | None,
    cmd: list[str],
    timeout: int = 0,
) -> tuple[bytes, bytes, int]:
    with CriClient(endpoint) as client:
        sandbox = _one(client, name, namespace)
        c = _container(client, sandbox, container)
        if c.state != pb.CONTAINER_RUNNING:
            raise PodError(
                f"pod {namespace}/{name}: container {c.metadata.name} is "
                f"{_CONTAINER_STATES.get(c.state, '?')}, not running"
            )
        resp = client.exec_sync(c.id, cmd, timeout)
        return resp.stdout, resp.stderr, resp.exit_code


def delete(
    endpoint: str | None, name: str, namespace: str, grace: int, warn: Callable[[str], None]
) -> int:
    """Stop and remove every sandbox of pod ``namespace/name`` and the host files :func:`run`
    made for it; the number of sandboxes removed."""
    with CriClient(endpoint) as client:
        found = find_sandboxes(client, name, namespace)
        if not found:
            raise PodError(f"no pod {namespace}/{name} at {client.endpoint} (see `coco pod list`)")
        for s in found:
            dirs = []
            try:
                ann = client.sandbox_status(s.id).annotations
                uid = s.metadata.uid
                log_dir = Path(ann.get(tr.ANNOTATION_LOG_DIR, "/"))
                vol_dir = Path(ann.get(tr.ANNOTATION_VOLUME_DIR, "/"))
                # only what run() made: named after this pod, never anything else
                if log_dir.name == f"{namespace}_{name}_{uid}":
                    dirs.append(log_dir)
                if vol_dir.name == "volumes" and vol_dir.parent.name == uid:
                    dirs.append(vol_dir.parent)
            except CocoError as e:
                warn(f"pod {namespace}/{name}: {e}")
            remove_sandbox(client, s.id, grace, warn)
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
        return len(found)
