"""The peer-pods mutating admission webhook (upstream's ``mwebhook.peerpods.io``).

For a pod whose ``runtimeClassName`` is the peer-pods class (``kata-remote``): the pod's resource
requests move into the pod VM annotations and the pod asks for one ``kata.peerpods.io/vm``
instead, so the scheduler counts VMs per node (the CAA advertises the capacity) and the CAA sizes
the VM. As upstream:

1. sum over all containers and init containers the cpu and memory requests and limits and the
   ``nvidia.com/gpu`` requests;
2. for cpu and memory take the limit when the request is non-zero and the limit is at least the
   request, else the request if non-zero; set ``...hypervisor.default_vcpus`` (whole vCPUs,
   rounded up), ``...default_memory`` (MiB, rounded up), ``...default_gpus``;
3. empty every container's and init container's ``resources``;
4. give the first container requests and limits of ``{<extended resource>: "1"}``.

Every other pod is allowed untouched. Input that is not an AdmissionReview v1 with a pod gets a
denial (or an HTTP 400 when not even the uid is known) with the reason; nothing raises out of
:func:`review`.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import math
import re
import ssl
import threading
from decimal import Decimal, InvalidOperation
from typing import Any

from coco import jsonio
from coco.host.peerpods.provider import PeerPodError

log = logging.getLogger(__name__)

A = "io.katacontainers.config.hypervisor."
VCPUS, MEMORY, GPUS = A + "default_vcpus", A + "default_memory", A + "default_gpus"
RUNTIME_CLASS = "kata-remote"
EXTENDED_RESOURCE = "kata.peerpods.io/vm"
GPU_RESOURCE = "nvidia.com/gpu"
PATH = "/mutate-v1-pod"
MAX_BODY = 3 * 1024 * 1024
MIB = 1 << 20
_SUFFIX = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_QUANTITY = re.compile(
    r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?"
)


class AdmissionError(PeerPodError):
    """A request the webhook cannot admit as asked (the reason goes back in the response)."""


def parse_quantity(value: Any, where: str) -> Decimal:
    """A Kubernetes resource quantity (``500m``, ``1.5``, ``128Mi``, ``1e3``) as a number."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise AdmissionError(f"{where}: expected a quantity, found {type(value).__name__}")
    text = str(value).strip()
    m = _QUANTITY.fullmatch(text)
    if m is None or len(text) > 64:
        raise AdmissionError(
            f"{where}: expected a quantity such as 500m or 128Mi, found {text[:64]!r}"
        )
    try:
        number = Decimal(m.group(1)) * Decimal(_SUFFIX[m.group(2) or ""])
    except InvalidOperation:
        raise AdmissionError(f"{where}: expected a quantity, found {text!r}") from None
    if number < 0 or number > Decimal(2) ** 63:
        raise AdmissionError(f"{where}: expected a quantity from 0 to 2^63, found {text!r}")
    return number


def _containers(spec: dict, key: str) -> list[dict]:
    items = spec.get(key)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
        raise AdmissionError(f"pod spec.{key}: expected a list of containers")
    return items


def _chosen(request: Decimal, limit: Decimal) -> Decimal:
    if request > 0 and limit >= request:
        return limit
    return request if request > 0 else Decimal(0)


def mutate_pod(pod: Any, runtime_class: str = RUNTIME_CLASS,
               resource: str = EXTENDED_RESOURCE) -> list[dict]:  # fmt: skip
    """The JSONPatch for ``pod`` (empty when it is not a peer pod)."""
    if not isinstance(pod, dict):
        raise AdmissionError("request.object: expected a pod object")
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise AdmissionError("pod spec: expected an object")
    if spec.get("runtimeClassName") != runtime_class:
        return []
    containers = _containers(spec, "containers")
    if not containers:
        raise AdmissionError("pod spec.containers: expected at least one container")
    init = _containers(spec, "initContainers")
    totals = {k: Decimal(0) for k in ("cpu_req", "cpu_lim", "mem_req", "mem_lim", "gpu")}
    for kind, items in (("containers", containers), ("initContainers", init)):
        for i, c in enumerate(items):
            res = c.get("resources") or {}
            if not isinstance(res, dict):
                raise AdmissionError(f"pod spec.{kind}[{i}].resources: expected an object")
            for part in ("requests", "limits"):
                table = res.get(part) or {}
                if not isinstance(table, dict):
                    raise AdmissionError(
                        f"pod spec.{kind}[{i}].resources.{part}: expected an object"
                    )
                where = f"pod spec.{kind}[{i}].resources.{part}"
                short = "req" if part == "requests" else "lim"
                if "cpu" in table:
                    totals[f"cpu_{short}"] += parse_quantity(table["cpu"], f"{where}.cpu")
                if "memory" in table:
                    totals[f"mem_{short}"] += parse_quantity(table["memory"], f"{where}.memory")
                if part == "requests" and GPU_RESOURCE in table:
                    totals["gpu"] += parse_quantity(table[GPU_RESOURCE], f"{where}.{GPU_RESOURCE}")
    annotations: dict[str, str] = {}
    cpu = _chosen(totals["cpu_req"], totals["cpu_lim"])
    mem = _chosen(totals["mem_req"], totals["mem_lim"])
    if cpu > 0:
        annotations[VCPUS] = str(math.ceil(cpu))
    if mem > 0:
        annotations[MEMORY] = str(math.ceil(mem / MIB))
    if totals["gpu"] > 0:
        annotations[GPUS] = str(math.ceil(totals["gpu"]))
    patch: list[dict] = []
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        raise AdmissionError("pod metadata: expected an object")
    existing = meta.get("annotations")
    if annotations:
        if isinstance(existing, dict):
            for key, value in annotations.items():
                path = "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")
                patch.append({"op": "add", "path": path, "value": value})
        else:
            patch.append({"op": "add", "path": "/metadata/annotations", "value": annotations})
    for kind, items in (("containers", containers), ("initContainers", init)):
        for i in range(len(items)):
            value: dict = {}
            if kind == "containers" and i == 0:
                value = {"requests": {resource: "1"}, "limits": {resource: "1"}}
            patch.append({"op": "add", "path": f"/spec/{kind}/{i}/resources", "value": value})
    return patch


def review(body: bytes, runtime_class: str = RUNTIME_CLASS,
           resource: str = EXTENDED_RESOURCE) -> tuple[int, dict]:  # fmt: skip
    """(HTTP status, AdmissionReview response) for a request body; never raises."""

    def answer(uid: str, allowed: bool, message: str = "", patch: list | None = None) -> dict:
        resp: dict[str, Any] = {"uid": uid, "allowed": allowed}
        if message:
            resp["status"] = {"code": 200 if allowed else 400, "message": message}
        if patch:
            resp["patchType"] = "JSONPatch"
            resp["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": resp}

    try:
        doc = jsonio.loads(body, what="AdmissionReview", error=AdmissionError)
    except AdmissionError as e:
        return 400, answer("", False, str(e))
    if not isinstance(doc, dict) or doc.get("kind") != "AdmissionReview":
        found = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        return 400, answer("", False, f"expected an AdmissionReview, found {found!r}")
    if doc.get("apiVersion") != "admission.k8s.io/v1":
        return 400, answer(
            "", False, f"expected apiVersion admission.k8s.io/v1, found {doc.get('apiVersion')!r}"
        )
    req = doc.get("request")
    uid = req.get("uid") if isinstance(req, dict) else None
    if not isinstance(uid, str) or not uid:
        return 400, answer("", False, "AdmissionReview: expected request.uid, found none")
    kind = req.get("kind") or {}
    if not isinstance(kind, dict) or kind.get("kind") != "Pod" or req.get("operation") != "CREATE":
        return 200, answer(uid, True)  # not ours: a pod CREATE is all this webhook mutates
    try:
        patch = mutate_pod(req.get("object"), runtime_class, resource)
    except AdmissionError as e:
        return 200, answer(uid, False, str(e))
    except Exception as e:  # never crash the API server's call
        log.exception("webhook: request %s", uid)
        return 200, answer(uid, False, f"internal error: {e}")
    return 200, answer(uid, True, patch=patch)


class WebhookServer:
    """HTTPS on ``host:port``, POST :data:`PATH` only; :meth:`stop` closes it."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None,
                 runtime_class: str = RUNTIME_CLASS, resource: str = EXTENDED_RESOURCE) -> None:  # fmt: skip
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("webhook: " + fmt, *args)

            def _send(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                if self.path.split("?")[0] != PATH:
                    self._send(404, {"message": f"expected POST {PATH}"})
                    return
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    self._send(411, {"message": "expected a Content-Length"})
                    return
                if not 0 <= length <= MAX_BODY:
                    self.close_connection = True
                    self._send(413, {"message": f"expected at most {MAX_BODY} bytes"})
                    return
                status, doc = review(self.rfile.read(length), outer.runtime_class, outer.resource)
                self._send(status, doc)

        self.runtime_class = runtime_class
        self.resource = resource
        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def manifests(namespace: str = "peer-pods-webhook-system", image: str = "coco:latest",
              runtime_class: str = RUNTIME_CLASS) -> str:  # fmt: skip
    """The webhook's Kubernetes objects as YAML: namespace, cert-manager issuer and certificate,
    service, deployment and the MutatingWebhookConfiguration (CA injected by cert-manager)."""
    import yaml

    name = "peer-pods-webhook"
    labels = {"app": name}
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Issuer",
         "metadata": {"name": f"{name}-selfsigned", "namespace": namespace},
         "spec": {"selfSigned": {}}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
         "metadata": {"name": f"{name}-cert", "namespace": namespace},
         "spec": {"secretName": f"{name}-tls",
                  "dnsNames": [f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"],
                  "issuerRef": {"kind": "Issuer", "name": f"{name}-selfsigned"}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
         "spec": {"selector": labels, "ports": [{"port": 443, "targetPort": 8443}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": name, "namespace": namespace, "labels": labels},
         "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "containers": [{
                          "name": "webhook", "image": image,
                          "args": ["peerpods", "webhook", "serve", "--listen", "0.0.0.0:8443",
                                   "--cert", "/etc/webhook/tls/tls.crt",
                                   "--key", "/etc/webhook/tls/tls.key"],
                          "env": [{"name": "TARGET_RUNTIMECLASS", "value": runtime_class},
                                  {"name": "POD_VM_EXTENDED_RESOURCE", "value": EXTENDED_RESOURCE}],
                          "ports": [{"containerPort": 8443}],
                          "volumeMounts": [{"name": "tls", "mountPath": "/etc/webhook/tls",
                                            "readOnly": True}]}],
                      "volumes": [{"name": "tls", "secret": {"secretName": f"{name}-tls"}}]}}}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
         "metadata": {"name": "mwebhook.peerpods.io",
                      "annotations": {"cert-manager.io/inject-ca-from": f"{namespace}/{name}-cert"}},
         "webhooks": [{
             "name": "mwebhook.peerpods.io", "admissionReviewVersions": ["v1"],
             "sideEffects": "None", "failurePolicy": "Fail", "reinvocationPolicy": "IfNeeded",
             "clientConfig": {"service": {"name": name, "namespace": namespace, "path": PATH}},
             "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                        "resources": ["pods"]}],
             "namespaceSelector": {"matchExpressions": [{
                 "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                 "values": [namespace, "kube-system"]}]}}]},
    ]  # fmt: skip
    return yaml.safe_dump_all(docs, sort_keys=False)
