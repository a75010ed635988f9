"""The cloud-api-adaptor: ``hypervisor.Hypervisor`` and ``podvminfo.PodVMInfo`` on one socket.

The kata shim's remote hypervisor calls CreateVM (the CAA prepares the sandbox: instance name,
size, TLS certificate, userdata; no VM yet), StartVM (the provider creates the VM; the agent proxy
starts and StartVM returns once the forwarder in the VM answers) and StopVM (proxy stopped, VM
deleted, always success). Names, fields, the ``0.0.0`` version and the paths are upstream's.

Beyond upstream: the sandboxes are persisted (:mod:`.state`), so a restarted CAA serves the pods
it had; every VM is tagged with this CAA's id and its sandbox id; a reconcile at start and every
``reconcile_interval`` seconds deletes the VMs tagged with this CAA that no sandbox owns (a CAA
killed during a create leaves one); a provider failure during StartVM deletes whatever the
provider made before the shim hears the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from coco.errors import CocoError
from coco.host.peerpods import cloudconfig
from coco.host.peerpods.provider import (
    Instance,
    InstanceType,
    InstanceTypeSpec,
    PeerPodError,
    Provider,
    ProviderError,
    Tags,
    instance_name,
    select_instance_type,
)
from coco.host.peerpods.proxy import SOCKET_NAME, AgentProxy
from coco.host.peerpods.state import Sandbox, Store, check_sandbox_id
from coco.host.peerpods.tls import Certs, tls_version
from coco.integrity import initdata as initdata_doc
from coco.rpc import services
from coco.rpc.protos import hypervisor_pb2, podvminfo_pb2
from coco.rpc.server import CallContext, Server
from coco.rpc.status import Code, RpcError

log = logging.getLogger(__name__)

VERSION = "0.0.0"
DEFAULT_PODS_DIR = Path("/run/peerpod/pods")
A = "io.katacontainers.config.hypervisor."
ANN_MACHINE_TYPE = A + "machine_type"
ANN_IMAGE = A + "image"
ANN_VCPUS = A + "default_vcpus"
ANN_MEMORY = A + "default_memory"
ANN_GPUS = A + "default_gpus"
ANN_INITDATA = A + "cc_init_data"
ANN_POD_NAME = "io.kubernetes.cri.sandbox-name"
ANN_POD_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CAA_ID_FILE = "caa-id"
MANUAL_SERVER_NAME = "podvm-server"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the NUL
STOPPED_POLL = 1.0  # seconds between asking the provider whether a booting VM stopped


@dataclass
class CaaConfig:
    socket: Path = Path(services.HYPERVISOR_SOCKET)
    pods_dir: Path = DEFAULT_PODS_DIR
    forwarder_port: int = 15150
    proxy_timeout: float = 300.0
    initdata: str = ""  # the global default, gzip + base64 (INITDATA)
    disable_tls: bool = False
    # manual TLS (upstream's CACERT_FILE / CERT_FILE / CERT_KEY): the forwarders' certificates are
    # baked into the pod VM image for the name "podvm-server"; nothing secret goes in userdata
    ca_cert_file: Path | None = None
    cert_file: Path | None = None
    cert_key: Path | None = None
    tls_skip_verify: bool = False  # insecure: any forwarder certificate is accepted
    tls_min_version: str = "TLSv1.2"
    reconcile_interval: float = 60.0
    caa_id: str = ""  # default: made once and kept in <pods-dir>/caa-id
    instance_types: list[InstanceType] = field(default_factory=list)
    default_instance_type: str = ""
    authfile: Path | None = None  # registry credentials handed to every VM (auth.json)


def _int_annotation(annotations: dict[str, str], key: str) -> int:
    value = annotations.get(key, "")
    if value == "":
        return 0
    if not value.isdigit():
        raise RpcError(
            Code.INVALID_ARGUMENT, f"annotation {key}: expected a decimal number, found {value!r}"
        )
    return int(value)


def _pod_name(annotations: dict[str, str]) -> str:
    """The pod name; cri-o's ``k8s_<pod>_<ns>_<uid>_0`` form gives field 1, as upstream."""
    name = annotations.get(ANN_POD_NAME, "")
    parts = name.split("_")
    if name.startswith("k8s_") and len(parts) >= 3:
        return parts[1]
    return name


class Caa:
    """The adaptor; :meth:`start` loads state, reconciles, serves; :meth:`stop` leaves VMs up."""

    def __init__(self, config: CaaConfig, provider: Provider) -> None:
        self.config = config
        self.provider = provider
        self.store = Store(config.pods_dir)
        self.sandboxes: dict[str, Sandbox] = {}
        self.proxies: dict[str, AgentProxy] = {}
        self.caa_id = config.caa_id
        self.certs: Certs | None = None
        self._busy: dict[str, asyncio.Lock] = {}
        self._creating: set[str] = set()
        self._changed = asyncio.Condition()
        self._server: Server | None = None
        self._timer: asyncio.Task | None = None

    # -- life ------------------------------------------------------------------------------------

    async def start(self) -> None:
        pods = self.config.pods_dir
        pods.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.caa_id:
            id_file = pods / CAA_ID_FILE
            if not id_file.exists():
                id_file.write_text(secrets.token_hex(8) + "\n")
            self.caa_id = id_file.read_text().strip()
        if self.config.cert_file is not None or self.config.cert_key is not None:
            self._manual_context()  # fail at start, not at the first StartVM
        elif not self.config.disable_tls:
            self.certs = await asyncio.to_thread(Certs.load_or_create, pods / ".tls")
        self.sandboxes = self.store.load_all()
        for sb in self.sandboxes.values():
            if sb.state == "starting":
                log.warning(
                    "sandbox %s: the CAA stopped during its VM's creation; reverting", sb.id
                )
                sb.state, sb.instance_id, sb.ips = "created", "", []
                self.store.save(sb)
        present = {i.id for i in await asyncio.to_thread(self.provider.list_instances, self.caa_id)}
        for sb in self.sandboxes.values():
            if sb.state == "running" and sb.instance_id not in present:
                log.warning("sandbox %s: its VM %s is gone; StartVM makes a new one",
                            sb.id, sb.instance_name)  # fmt: skip
                sb.state, sb.instance_id, sb.ips, sb.forwarder_port = "created", "", [], 0
                self.store.save(sb)
        await self.reconcile()
        for sb in list(self.sandboxes.values()):
            if sb.state == "running":
                await self._start_proxy(sb)
        server = Server()
        server.register(services.HYPERVISOR, self)
        server.register(services.PODVMINFO, {"GetInfo": self.GetInfo})
        self.config.socket.parent.mkdir(parents=True, exist_ok=True)
        await server.listen(f"unix://{self.config.socket}")
        self._server = server
        if self.config.reconcile_interval > 0:
            self._timer = asyncio.create_task(self._reconcile_loop())
        log.info(
            "cloud-api-adaptor %s: provider %s, %d sandbox(es), serving %s",
            self.caa_id, self.provider.name, len(self.sandboxes), self.config.socket,
        )  # fmt: skip

    async def stop(self) -> None:
        """Stop serving; VMs and sandbox state stay for the next start."""
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        if self._server is not None:
            await self._server.stop(grace=2.0)
        for proxy in list(self.proxies.values()):
            await proxy.stop()
        self.proxies.clear()
        await asyncio.to_thread(self.provider.teardown)

    async def serve_forever(self) -> None:
        if self._server is not None:
            await self._server.serve_forever()

    # -- reconcile -------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reconcile_interval)
            try:
                await self.reconcile()
            except CocoError as e:
                log.error("reconcile: %s", e)

    async def reconcile(self) -> list[str]:
        """Delete the VMs tagged with this CAA that no running sandbox owns; return their ids."""
        instances = await asyncio.to_thread(self.provider.list_instances, self.caa_id)
        owned = {sb.instance_id for sb in self.sandboxes.values() if sb.state == "running"}
        deleted = []
        for inst in instances:
            sandbox = inst.tags.sandbox if inst.tags else ""
            if inst.id in owned or sandbox in self._creating:
                continue
            log.warning(
                "reconcile: deleting VM %s (%s) of sandbox %s: no live sandbox owns it",
                inst.name, inst.id, sandbox or "?",
            )  # fmt: skip
            try:
                await asyncio.to_thread(self.provider.delete_instance, inst.id)
                deleted.append(inst.id)
            except CocoError as e:
                log.error("reconcile: deleting VM %s: %s", inst.name, e)
        return deleted

    # -- hypervisor.Hypervisor -------------------------------------------------------------------

    async def Version(self, req: hypervisor_pb2.VersionRequest, ctx: CallContext):
        return hypervisor_pb2.VersionResponse(version=VERSION)

    def _lock(self, sid: str) -> asyncio.Lock:
        return self._busy.setdefault(sid, asyncio.Lock())

    async def CreateVM(self, req: hypervisor_pb2.CreateVMRequest, ctx: CallContext):
        sid = req.id
        if not sid:
            raise RpcError(Code.INVALID_ARGUMENT, "CreateVM: expected a sandbox id, found none")
        try:
            check_sandbox_id(sid)
        except PeerPodError as e:
            raise RpcError(Code.INVALID_ARGUMENT, f"CreateVM: {e}") from None
        annotations = dict(req.annotations)
        pod_name, namespace = _pod_name(annotations), annotations.get(ANN_POD_NAMESPACE, "")
        if not pod_name or not namespace:
            raise RpcError(
                Code.INVALID_ARGUMENT,
                f"CreateVM {sid}: expected the annotations {ANN_POD_NAME} and "
                f"{ANN_POD_NAMESPACE}, found {sorted(annotations)}",
            )
        spec = InstanceTypeSpec(
            instance_type=annotations.get(ANN_MACHINE_TYPE, ""),
            vcpus=_int_annotation(annotations, ANN_VCPUS),
            memory=_int_annotation(annotations, ANN_MEMORY),
            gpus=_int_annotation(annotations, ANN_GPUS),
            image=annotations.get(ANN_IMAGE, ""),
        )
        if spec.memory and spec.memory < 256:
            raise RpcError(
                Code.INVALID_ARGUMENT,
                f"annotation {ANN_MEMORY}: expected at least 256 (MiB), found {spec.memory}",
            )
        try:
            chosen = select_instance_type(
                spec, self.config.instance_types, self.config.default_instance_type
            )
        except PeerPodError as e:
            raise RpcError(Code.INVALID_ARGUMENT, f"CreateVM {sid}: {e}") from None
        if chosen is not None:
            spec = replace(spec, instance_type=chosen.name, vcpus=chosen.vcpus,
                           memory=chosen.memory, gpus=chosen.gpus)  # fmt: skip
        raw_initdata = annotations.get(ANN_INITDATA, "")
        try:
            if raw_initdata:
                packed = initdata_doc.encode(raw_initdata.encode(), f"annotation {ANN_INITDATA}")
            elif self.config.initdata:
                packed = self.config.initdata
                initdata_doc.decode(packed, "INITDATA")
            else:
                packed = ""
        except CocoError as e:
            raise RpcError(Code.INVALID_ARGUMENT, f"CreateVM {sid}: {e}") from None
        async with self._lock(sid):
            existing = self.sandboxes.get(sid)
            socket_path = self.store.pod_dir(sid) / SOCKET_NAME
            if existing is not None:
                return hypervisor_pb2.CreateVMResponse(agentSocketPath=str(socket_path))
            if len(str(socket_path).encode()) > MAX_SOCKET_PATH:
                raise RpcError(
                    Code.FAILED_PRECONDITION,
                    f"CreateVM {sid}: the agent socket {socket_path} is longer than a unix "
                    f"socket path can be ({MAX_SOCKET_PATH} bytes): use a shorter --pods-dir",
                )
            name = instance_name(pod_name, sid)
            sb = Sandbox(
                id=sid, pod_name=pod_name, pod_namespace=namespace, instance_name=name,
                netns=req.networkNamespacePath, vcpus=spec.vcpus, memory=spec.memory,
                gpus=spec.gpus, instance_type=spec.instance_type, image=spec.image,
                initdata=packed,
            )  # fmt: skip
            userdata = await asyncio.to_thread(self._userdata, sb, packed)
            self.store.save(sb, userdata)
            self.sandboxes[sid] = sb
        log.info("CreateVM %s: pod %s/%s, VM %s", sid, namespace, pod_name, name)
        return hypervisor_pb2.CreateVMResponse(agentSocketPath=str(socket_path))

    def _userdata(self, sb: Sandbox, packed_initdata: str) -> str:
        cert = self.certs.issue_server(sb.instance_name) if self.certs else None
        apf = cloudconfig.apf_config(
            sb.pod_name, sb.pod_namespace,
            server_key=cert.key_pem if cert else None,
            server_cert=cert.cert_pem if cert else None,
            client_ca=self.certs.client_cert_pem if self.certs else None,
            tls_min_version=self.config.tls_min_version if self.certs else "",
        )  # fmt: skip
        files = {cloudconfig.APF_JSON: apf}
        if self.config.authfile is not None:
            auth = self.config.authfile.read_text()
            if len(auth) <= cloudconfig.AUTHFILE_LIMIT:
                files[cloudconfig.AUTH_JSON] = auth
            else:
                log.warning("auth.json is over %d bytes; not sent", cloudconfig.AUTHFILE_LIMIT)
        if packed_initdata:
            files[cloudconfig.INITDATA] = packed_initdata
        return cloudconfig.cloud_config(files)

    async def StartVM(self, req: hypervisor_pb2.StartVMRequest, ctx: CallContext):
        sid = req.id
        async with self._lock(sid):
            sb = self.sandboxes.get(sid)
            if sb is None:
                raise RpcError(Code.NOT_FOUND, f"StartVM: no sandbox {sid!r} (CreateVM first)")
            if sb.state == "running":
                return hypervisor_pb2.StartVMResponse()
            started = time.monotonic()
            self._creating.add(sid)
            try:
                await self._start(sb)
            finally:
                self._creating.discard(sid)
        async with self._changed:
            self._changed.notify_all()
        log.info(
            "StartVM %s: VM %s ready in %.1f s", sid, sb.instance_name, time.monotonic() - started
        )
        return hypervisor_pb2.StartVMResponse()

    async def _start(self, sb: Sandbox) -> None:
        sb.state = "starting"
        self.store.save(sb)
        spec = InstanceTypeSpec(sb.instance_type, sb.vcpus, sb.memory, sb.gpus, "", sb.image)
        tags = Tags(self.caa_id, sb.id)
        raw_initdata = initdata_doc.decode(sb.initdata).raw if sb.initdata else None
        try:
            inst = await asyncio.to_thread(
                self.provider.create_instance,
                sb.pod_name, sb.id, self.store.userdata(sb.id), spec, tags, raw_initdata,
            )  # fmt: skip
            if not inst.ips:
                raise ProviderError(f"VM {inst.name} has no IP address", inst.id)
            sb.instance_id, sb.ips = inst.id, list(inst.ips)
            sb.forwarder_port = inst.forwarder_port or self.config.forwarder_port
            self.store.save(sb)  # still starting: a CAA that dies now leaves an orphan to delete
            proxy = await self._start_proxy(sb)
            await self._wait_ready(proxy, inst)
            sb.state = "running"
            self.store.save(sb)
        except (CocoError, OSError) as e:
            await self._undo_start(sb, getattr(e, "instance_id", "") or sb.instance_id)
            raise RpcError(
                Code.UNKNOWN, f"StartVM {sb.id}: creating VM {sb.instance_name}: {e}"
            ) from None
        except BaseException:
            await self._undo_start(sb, sb.instance_id)
            raise

    async def _wait_ready(self, proxy: AgentProxy, inst: Instance) -> None:
        """Wait for the forwarder; a VM that stops meanwhile fails at once, with its reason."""
        ready = asyncio.create_task(proxy.wait_ready(self.config.proxy_timeout))
        try:
            while not (await asyncio.wait({ready}, timeout=STOPPED_POLL))[0]:
                why = await asyncio.to_thread(self.provider.stopped, inst.id)
                if why is not None:
                    raise ProviderError(
                        f"VM {inst.name} stopped before its forwarder answered: {why}", inst.id
                    )
            ready.result()
        finally:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError, CocoError):
                await ready

    async def _undo_start(self, sb: Sandbox, instance_id: str) -> None:
        """Remove whatever the failed start made: the proxy, the VM (by id and by tag)."""
        proxy = self.proxies.pop(sb.id, None)
        if proxy is not None:
            await proxy.stop()
        ids = {instance_id} if instance_id else set()
        try:
            found = await asyncio.to_thread(self.provider.list_instances, self.caa_id)
            ids |= {i.id for i in found if i.tags and i.tags.sandbox == sb.id}
        except CocoError as e:
            log.error("sandbox %s: listing VMs to clean up: %s", sb.id, e)
        for iid in ids:
            try:
                await asyncio.to_thread(self.provider.delete_instance, iid)
            except CocoError as e:
                log.error("sandbox %s: deleting VM %s after a failed start: %s", sb.id, iid, e)
        sb.state, sb.instance_id, sb.ips, sb.forwarder_port = "created", "", [], 0
        self.store.save(sb)

    async def _start_proxy(self, sb: Sandbox) -> AgentProxy:
        if self.config.cert_file is not None:
            ssl_context, server_name = self._manual_context(), MANUAL_SERVER_NAME
        else:
            ssl_context = (
                self.certs.client_context(self.config.tls_min_version) if self.certs else None
            )
            server_name = sb.instance_name
        proxy = AgentProxy(
            self.store.pod_dir(sb.id) / SOCKET_NAME,
            sb.ips[0],
            sb.forwarder_port or self.config.forwarder_port,
            ssl_context,
            server_name,
        )
        await proxy.start()
        self.proxies[sb.id] = proxy
        return proxy

    def _manual_context(self) -> ssl.SSLContext:
        c = self.config
        if c.cert_file is None or c.cert_key is None:
            raise PeerPodError("manual TLS: expected both --cert-file and --cert-key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = tls_version(c.tls_min_version)
        try:
            ctx.load_cert_chain(c.cert_file, c.cert_key)
            if c.tls_skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif c.ca_cert_file is not None:
                ctx.load_verify_locations(c.ca_cert_file)
            else:
                ctx.load_default_certs()
        except (OSError, ssl.SSLError) as e:
            raise PeerPodError(
                f"manual TLS: cannot load {c.cert_file}, {c.cert_key} or {c.ca_cert_file}: {e}"
            ) from None
        return ctx

    async def StopVM(self, req: hypervisor_pb2.StopVMRequest, ctx: CallContext):
        sid = req.id
        async with self._lock(sid):
            proxy = self.proxies.pop(sid, None)
            if proxy is not None:
                await proxy.stop()
            sb = self.sandboxes.get(sid)
            if sb is not None and sb.instance_id:
                try:
                    await asyncio.to_thread(self.provider.delete_instance, sb.instance_id)
                except CocoError as e:
                    log.error("StopVM %s: deleting VM %s: %s", sid, sb.instance_name, e)
            if sb is not None:
                self.sandboxes.pop(sid, None)
                with contextlib.suppress(PeerPodError):
                    self.store.remove(sid)
        self._busy.pop(sid, None)
        log.info("StopVM %s", sid)
        return hypervisor_pb2.StopVMResponse()

    # -- podvminfo.PodVMInfo ---------------------------------------------------------------------

    async def GetInfo(self, req: podvminfo_pb2.GetInfoRequest, ctx: CallContext):
        def find() -> str | None:
            for sb in self.sandboxes.values():
                same = sb.pod_name == req.PodName and sb.pod_namespace == req.PodNamespace
                if same and (sb.instance_id or not req.Wait):
                    return sb.instance_id
            return None

        vmid = find()
        while vmid is None and req.Wait:
            async with self._changed:
                await self._changed.wait()
            vmid = find()
        if vmid is None:
            raise RpcError(
                Code.NOT_FOUND, f"GetInfo: no pod {req.PodNamespace}/{req.PodName} on this node"
            )
        return podvminfo_pb2.GetInfoResponse(VMID=vmid)


__all__ = ["Caa", "CaaConfig", "Instance"]
