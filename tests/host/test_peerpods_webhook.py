"""coco peerpods webhook: real AdmissionReview v1 requests over HTTPS; the JSONPatch answers are
applied with the `jsonpatch` library (not ours) and the resulting pods checked; malformed reviews
get a reason, never a crash."""

from __future__ import annotations

import base64
import copy
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonpatch
import pytest
import yaml

from coco.host.peerpods.tls import Certs
from coco.host.peerpods.webhook import PATH, WebhookServer, manifests

A = "io.katacontainers.config.hypervisor."


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ssl.SSLContext]]:
    d = tmp_path_factory.mktemp("webhook")
    certs = Certs.load_or_create(d / "ca")
    server_cert = certs.issue_server("localhost")
    (d / "tls.crt").write_bytes(server_cert.cert_pem)
    (d / "tls.key").write_bytes(server_cert.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "tls.crt", d / "tls.key")
    server = WebhookServer("127.0.0.1", 0, ctx)
    server.start()
    client_ctx = ssl.create_default_context(cadata=certs.ca_cert_pem.decode())
    try:
        yield f"https://localhost:{server.port}", client_ctx
    finally:
        server.stop()


def _review(
    pod: dict, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002", op: str = "CREATE"
) -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default", "operation": op, "object": pod,
            "userInfo": {"username": "admin"}, "dryRun": False,
        },
    }  # fmt: skip


def _pod(runtime_class: str | None = "kata-remote", annotations: dict | None = None) -> dict:
    spec = {
        "containers": [
            {"name": "app", "image": "nginx",
             "resources": {"requests": {"cpu": "500m", "memory": "100Mi"},
                           "limits": {"cpu": "1", "memory": "1Gi"}}},
            {"name": "side", "image": "busybox",
             "resources": {"requests": {"cpu": "250m", "memory": "64Mi", "nvidia.com/gpu": "1"}}},
        ],
        "initContainers": [{"name": "init", "image": "busybox",
                            "resources": {"limits": {"memory": "1.5G"}}}],
    }  # fmt: skip
    if runtime_class:
        spec["runtimeClassName"] = runtime_class
    meta: dict = {"name": "web", "namespace": "default"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def _post(
    webhook: tuple[str, ssl.SSLContext], body: bytes | dict, path: str = PATH
) -> httpx.Response:
    url, ctx = webhook
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(verify=ctx) as c:
        return c.post(url + path, content=data, headers={"Content-Type": "application/json"})


def _apply(pod: dict, response: dict) -> dict:
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(copy.deepcopy(pod), ops)


def test_peer_pod_resources_move_to_vm_annotations(webhook) -> None:
    pod = _pod()
    r = _post(webhook, _review(pod))
    assert r.status_code == 200
    review = r.json()
    assert review["apiVersion"] == "admission.k8s.io/v1" and review["kind"] == "AdmissionReview"
    resp = review["response"]
    assert resp["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002" and resp["allowed"] is True
    out = _apply(pod, resp)
    # cpu: requests 0.75 <= limits 1 -> 1; memory: limits 1Gi + 1.5G >= requests 164Mi -> MiB up
    assert out["metadata"]["annotations"] == {
        A + "default_vcpus": "1",
        A + "default_memory": str(-(-(2**30 + 1_500_000_000) // 2**20)),
        A + "default_gpus": "1",
    }
    assert out["spec"]["containers"][0]["resources"] == {
        "requests": {"kata.peerpods.io/vm": "1"}, "limits": {"kata.peerpods.io/vm": "1"}
    }  # fmt: skip
    assert out["spec"]["containers"][1]["resources"] == {}
    assert out["spec"]["initContainers"][0]["resources"] == {}


def test_existing_annotations_are_kept_and_keys_escaped(webhook) -> None:
    pod = _pod(annotations={"keep/me": "yes"})
    out = _apply(pod, _post(webhook, _review(pod)).json()["response"])
    assert out["metadata"]["annotations"]["keep/me"] == "yes"
    assert out["metadata"]["annotations"][A + "default_vcpus"] == "1"


@pytest.mark.parametrize("pod", [_pod(None), _pod("kata-qemu")])
def test_other_pods_are_untouched(webhook, pod: dict) -> None:
    resp = _post(webhook, _review(pod)).json()["response"]
    assert resp == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_updates_and_other_kinds_pass(webhook) -> None:
    assert _post(webhook, _review(_pod(), op="UPDATE")).json()["response"]["allowed"] is True


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"not json", 400, "AdmissionReview"),
        (b"[" * 100_000, 400, "AdmissionReview"),
        ({"kind": "Pod"}, 400, "expected an AdmissionReview, found 'Pod'"),
        ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1"}, 400,
         "expected apiVersion admission.k8s.io/v1, found 'admission.k8s.io/v1beta1'"),
        ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}}, 400,
         "expected request.uid, found none"),
        ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": []}, 400,
         "expected request.uid"),
    ],
)  # fmt: skip
def test_unreadable_reviews_get_400_with_a_reason(webhook, body, status: int, message: str) -> None:
    r = _post(webhook, body)
    assert r.status_code == status
    resp = r.json()["response"]
    assert resp["allowed"] is False and message in resp["status"]["message"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.update(spec=[]), "pod spec: expected an object"),
        (lambda p: p["spec"].update(containers={}), "spec.containers: expected a list"),
        (lambda p: p["spec"].update(containers=[]), "expected at least one container"),
        (lambda p: p["spec"]["containers"][0]["resources"]["requests"].update(cpu="lots"),
         "spec.containers[0].resources.requests.cpu: expected a quantity such as 500m"),
        (lambda p: p["spec"]["containers"][1].update(resources=[1]),
         "spec.containers[1].resources: expected an object"),
        (lambda p: p["spec"]["initContainers"][0]["resources"].update(limits={"memory": True}),
         "initContainers[0].resources.limits.memory: expected a quantity, found bool"),
        (lambda p: p["spec"]["containers"][0]["resources"]["limits"].update(memory="-1Gi"),
         "expected a quantity from 0"),
        (lambda p: p.update(metadata="x"), "pod metadata: expected an object"),
    ],
)  # fmt: skip
def test_malformed_pods_are_denied_with_a_reason(webhook, mutate, message: str) -> None:
    pod = _pod()
    mutate(pod)
    r = _post(webhook, _review(pod))
    assert r.status_code == 200
    resp = r.json()["response"]
    assert resp["allowed"] is False and "patch" not in resp
    assert message in resp["status"]["message"]


def test_wrong_path_and_oversized_body(webhook) -> None:
    assert _post(webhook, _review(_pod()), "/other").status_code == 404
    assert _post(webhook, b" " * (3 * 1024 * 1024 + 1)).status_code == 413
    assert _post(webhook, _review(_pod())).status_code == 200  # still serving


def test_manifests(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all(manifests("pp-system", "reg/coco:1")))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Namespace", "Issuer", "Certificate", "Service", "Deployment",
                     "MutatingWebhookConfiguration"]  # fmt: skip
    hook = docs[-1]["webhooks"][0]
    assert (
        hook["name"] == "mwebhook.peerpods.io" and hook["clientConfig"]["service"]["path"] == PATH
    )
    assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
    assert hook["rules"][0]["operations"] == ["CREATE"]
    assert docs[4]["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/coco:1"
