"""The ``remote`` sandbox: a VM from a cloud-api-adaptor (peer pods), over ``hypervisor.Hypervisor``.

As kata's remote hypervisor does: CreateVM (sandbox id, the annotations the adaptor reads, the pod
netns path) returns the agent's socket, StartVM returns once the VM's forwarder answers, StopVM
ends it. One connection per call, to ``remote_hypervisor_socket``; StartVM and StopVM may take
``remote_hypervisor_timeout`` seconds. The initdata reaches the adaptor raw (TOML) in the
``cc_init_data`` annotation, which it hands to the VM in its userdata.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

from coco.host.runtime import SandboxError
from coco.host.runtime.config import RuntimeConfig
from coco.host.runtime.sandbox import Sandbox
from coco.integrity.initdata import ANNOTATION as INITDATA_ANNOTATION
from coco.rpc import Client, RpcError, Stub
from coco.rpc.protos import hypervisor_pb2
from coco.rpc.service import Service

log = logging.getLogger(__name__)

HYPERVISOR = Service.from_proto(hypervisor_pb2, "Hypervisor")
DEFAULT_SOCKET = "/run/peerpod/hypervisor.sock"
FORWARDED = (  # the pod annotations kata hands to CreateVM
    "io.kubernetes.cri.sandbox-name",
    "io.kubernetes.cri.sandbox-namespace",
    "io.kubernetes.cri.sandbox-uid",
    "io.katacontainers.config.hypervisor.machine_type",
    "io.katacontainers.config.hypervisor.image",
    "io.katacontainers.config.hypervisor.default_vcpus",
    "io.katacontainers.config.hypervisor.default_memory",
    "io.katacontainers.config.hypervisor.default_gpus",
    "io.katacontainers.config.hypervisor.default_gpu_model",
)


def _call(socket: str, method: str, request: Any, timeout: float) -> Any:
    async def once() -> Any:
        client = await Client.connect(f"unix://{socket}", timeout=10)
        try:
            return await getattr(Stub(client, HYPERVISOR, timeout=timeout), method)(request)
        finally:
            await client.close()

    try:
        return asyncio.run(once())
    except RpcError as e:
        raise SandboxError(f"remote sandbox: {method} at unix://{socket}: {e}") from None


class RemoteSandbox(Sandbox):
    kind = "remote"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.created = False

    @property
    def socket(self) -> str:
        return self.config.sandbox.get("remote_hypervisor_socket", DEFAULT_SOCKET)

    @property
    def timeout(self) -> float:
        return max(60.0, float(self.config.sandbox.get("remote_hypervisor_timeout", 600)))

    def start(self, initdata: bytes | None, annotations: dict[str, str]) -> str:
        fwd = {k: annotations[k] for k in FORWARDED if k in annotations}
        fwd.setdefault(
            "io.kubernetes.cri.sandbox-name",
            annotations.get("io.kubernetes.cri.sandbox-name", self.sid),
        )
        fwd.setdefault(
            "io.kubernetes.cri.sandbox-namespace",
            annotations.get("io.kubernetes.cri.sandbox-namespace", "default"),
        )
        for key in ("default_vcpus", "default_memory"):
            fwd.setdefault(f"io.katacontainers.config.hypervisor.{key}", "0")
        if initdata is not None:
            fwd[INITDATA_ANNOTATION] = initdata.decode()
        netns = annotations.get("coco.netns", "")
        self.save_state(socket=self.socket)
        reply = _call(
            self.socket,
            "CreateVM",
            hypervisor_pb2.CreateVMRequest(
                id=self.sid, annotations=fwd, networkNamespacePath=netns
            ),
            60.0,
        )
        self.created = True
        try:
            _call(self.socket, "StartVM", hypervisor_pb2.StartVMRequest(id=self.sid), self.timeout)
        except SandboxError:
            self.stop()
            raise
        if not reply.agentSocketPath:
            self.stop()
            raise SandboxError(f"remote sandbox {self.sid}: CreateVM returned no agent socket")
        return f"unix://{reply.agentSocketPath}"

    def status(self) -> str:
        return "running" if self.created else "stopped"

    def stop(self) -> None:
        if self.created:
            self.created = False
            try:
                _call(
                    self.socket, "StopVM", hypervisor_pb2.StopVMRequest(id=self.sid), self.timeout
                )
            except SandboxError as e:
                log.error("%s", e)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    @classmethod
    def cleanup(cls, state_dir: Path, state: dict[str, Any], config: RuntimeConfig) -> None:
        socket = state.get("socket", DEFAULT_SOCKET)
        try:
            _call(socket, "StopVM", hypervisor_pb2.StopVMRequest(id=state["sid"]), 600.0)
        except SandboxError as e:
            log.error("%s", e)
        shutil.rmtree(state_dir, ignore_errors=True)


SANDBOX = RemoteSandbox
