"""A CRI client: gRPC calls of ``runtime.v1.RuntimeService`` and ``runtime.v1.ImageService``.

The endpoint is spelled as crictl spells it (``unix:///run/containerd/containerd.sock``; a bare
absolute path means a Unix socket too), taken from ``--runtime-endpoint``, then
``CONTAINER_RUNTIME_ENDPOINT``, then containerd's default socket. Messages come from
:mod:`coco.rpc.protos.cri_pb2` (compiled from ``cri.proto``); methods are called by their path
with grpcio's generic unary calls, so no generated stubs are needed.

Every failure is a :class:`~coco.host.pod.CriError` of one line that names the call and carries
the runtime's own text (for a pod whose policy denied a container, that text is the agent's).
"""

from __future__ import annotations

import os
from typing import Any

import grpc

from coco.host.pod import CriError
from coco.rpc.protos import cri_pb2 as pb

DEFAULT_ENDPOINT = "unix:///run/containerd/containerd.sock"
ENDPOINT_ENV = "CONTAINER_RUNTIME_ENDPOINT"
MAX_MESSAGE = 16 << 20  # containerd's own gRPC limit

_RUNTIME = "/runtime.v1.RuntimeService/"
_IMAGE = "/runtime.v1.ImageService/"

# method -> (service path, response type)
_METHODS: dict[str, tuple[str, Any]] = {
    "Version": (_RUNTIME, pb.VersionResponse),
    "Status": (_RUNTIME, pb.StatusResponse),
    "RunPodSandbox": (_RUNTIME, pb.RunPodSandboxResponse),
    "StopPodSandbox": (_RUNTIME, pb.StopPodSandboxResponse),
    "RemovePodSandbox": (_RUNTIME, pb.RemovePodSandboxResponse),
    "PodSandboxStatus": (_RUNTIME, pb.PodSandboxStatusResponse),
    "ListPodSandbox": (_RUNTIME, pb.ListPodSandboxResponse),
    "CreateContainer": (_RUNTIME, pb.CreateContainerResponse),
    "StartContainer": (_RUNTIME, pb.StartContainerResponse),
    "StopContainer": (_RUNTIME, pb.StopContainerResponse),
    "RemoveContainer": (_RUNTIME, pb.RemoveContainerResponse),
    "ListContainers": (_RUNTIME, pb.ListContainersResponse),
    "ContainerStatus": (_RUNTIME, pb.ContainerStatusResponse),
    "ExecSync": (_RUNTIME, pb.ExecSyncResponse),
    "ListImages": (_IMAGE, pb.ListImagesResponse),
    "ImageStatus": (_IMAGE, pb.ImageStatusResponse),
    "PullImage": (_IMAGE, pb.PullImageResponse),
    "RemoveImage": (_IMAGE, pb.RemoveImageResponse),
}


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The endpoint to use: ``endpoint``, else $CONTAINER_RUNTIME_ENDPOINT, else containerd's."""
    text = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
    if text.startswith("/"):
        text = "unix://" + text
    if not text.startswith("unix://") or len(text) <= len("unix://"):
        raise CriError(
            f"runtime endpoint: expected unix:///PATH (or an absolute socket path), found {text!r}"
        )
    return text


class CriClient:
    """One gRPC channel to a CRI runtime. Use as a context manager, or call :meth:`close`."""

    def __init__(self, endpoint: str | None = None, *, timeout: float = 120.0) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            self.endpoint,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _stub(self, method: str, request: Any) -> Any:
        service, response = _METHODS[method]
        return self._channel.unary_unary(
            service + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )

    def call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """Call ``method`` (e.g. ``RunPodSandbox``) with ``request``; its response message."""
        try:
            return self._stub(method, request)(
                request, timeout=self.timeout if timeout is None else timeout
            )
        except grpc.RpcError as e:
            raise self._error(method, e) from None

    def begin(self, method: str, request: Any, *, timeout: float | None = None) -> Call:
        """Send ``method`` with ``request`` without waiting: the :class:`Call` waits."""
        future = self._stub(method, request).future(
            request, timeout=self.timeout if timeout is None else timeout
        )
        return Call(self, method, future)

    def _error(self, method: str, e: grpc.RpcError) -> CriError:
        code = e.code() if hasattr(e, "code") else None
        details = (e.details() if hasattr(e, "details") else "") or str(code)
        name = code.name if code is not None else "UNKNOWN"
        if code == grpc.StatusCode.UNAVAILABLE:
            return CriError(
                f"CRI {method} at {self.endpoint}: the runtime is unreachable ({_one_line(details)});"
                " is containerd running there?",
                name,
            )
        return CriError(f"CRI {method}: {_one_line(details)}", name)

    # --- the calls coco pod makes, with their request messages built here

    def version(self) -> Any:
        return self.call("Version", pb.VersionRequest(version="v1"), timeout=10)

    def list_sandboxes(self, labels: dict[str, str] | None = None) -> list[Any]:
        flt = pb.PodSandboxFilter(label_selector=labels or {})
        return list(self.call("ListPodSandbox", pb.ListPodSandboxRequest(filter=flt)).items)

    def sandbox_status(self, sandbox_id: str) -> Any:
        req = pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)
        return self.call("PodSandboxStatus", req).status

    def run_sandbox(self, config: Any, handler: str) -> Call:
        """RunPodSandbox, sent; the call's result is the sandbox id."""
        req = pb.RunPodSandboxRequest(config=config, runtime_handler=handler)
        return self.begin("RunPodSandbox", req, timeout=max(self.timeout, 600))

    def stop_sandbox(self, sandbox_id: str) -> None:
        self.call("StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))

    def remove_sandbox(self, sandbox_id: str) -> None:
        self.call("RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))

    def create_container(self, sandbox_id: str, config: Any, sandbox_config: Any) -> Call:
        """CreateContainer, sent; the call's result is the container id."""
        req = pb.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config
        )
        return self.begin("CreateContainer", req, timeout=max(self.timeout, 600))

    def start_container(self, container_id: str) -> None:
        req = pb.StartContainerRequest(container_id=container_id)
        self.call("StartContainer", req, timeout=max(self.timeout, 600))

    def stop_container(self, container_id: str, grace: int) -> None:
        req = pb.StopContainerRequest(container_id=container_id, timeout=grace)
        self.call("StopContainer", req, timeout=self.timeout + grace)

    def list_containers(self, sandbox_id: str = "") -> list[Any]:
        flt = pb.ContainerFilter(pod_sandbox_id=sandbox_id)
        return list(self.call("ListContainers", pb.ListContainersRequest(filter=flt)).containers)

    def container_status(self, container_id: str) -> Any:
        req = pb.ContainerStatusRequest(container_id=container_id)
        return self.call("ContainerStatus", req).status

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 0) -> Any:
        req = pb.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout)
        return self.call("ExecSync", req, timeout=(timeout + 30) if timeout else 24 * 3600)

    def image_status(self, image: str) -> Any | None:
        resp = self.call("ImageStatus", pb.ImageStatusRequest(image=pb.ImageSpec(image=image)))
        return resp.image if resp.HasField("image") else None

    def pull_image(
        self, image: str, auth: Any | None, sandbox_config: Any | None, handler: str = ""
    ) -> str:
        req = pb.PullImageRequest(
            image=pb.ImageSpec(image=image, runtime_handler=handler),
            auth=auth,
            sandbox_config=sandbox_config,
        )
        return self.call("PullImage", req, timeout=max(self.timeout, 1800)).image_ref


class Call:
    """A call sent and not answered yet. Its answer can still be waited for after the caller
    was interrupted, so that what the runtime goes on making (a sandbox, a container) is known
    and can be removed: the call is only cancelled by :meth:`cancel` or by closing the client."""

    _ID_FIELDS = {"RunPodSandbox": "pod_sandbox_id", "CreateContainer": "container_id"}

    def __init__(self, client: CriClient, method: str, future: Any) -> None:
        self.client = client
        self.method = method
        self._future = future

    def result(self, timeout: float | None = None) -> Any:
        """The answer (for RunPodSandbox and CreateContainer: the id made); a CriError if the
        runtime refused; TimeoutError if there is no answer within ``timeout`` s (the call goes
        on)."""
        try:
            response = self._future.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TimeoutError(f"CRI {self.method}: no answer within {timeout:g} s") from None
        except grpc.FutureCancelledError:
            raise CriError(f"CRI {self.method}: cancelled", "CANCELLED") from None
        except grpc.RpcError as e:
            raise self.client._error(self.method, e) from None
        field = self._ID_FIELDS.get(self.method)
        return getattr(response, field) if field else response

    def cancel(self) -> None:
        self._future.cancel()


def _one_line(text: str) -> str:
    return " ".join(text.split())
