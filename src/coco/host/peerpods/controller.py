"""The peer-pods cleanup controller: deletes a pod's VM when the CAA could not (kopf).

Upstream's peerpod-ctrl: the CAA creates a ``PeerPod`` (``confidentialcontainers.org/v1alpha1``,
spec ``{cloudProvider, instanceID}``) owned by the pod, with the finalizer ``peer.pod/finalizer``,
and removes the finalizer itself once it deleted the VM. When the pod is deleted and the PeerPod
is still held by the finalizer (the CAA crashed, the node died), this controller deletes
``instanceID`` through the provider named ``cloudProvider`` and then removes the finalizer, so
Kubernetes can let the PeerPod go. A provider error leaves the finalizer in place: the next event
for the object (or the controller's next start, which lists every PeerPod) tries again.
PeerPods of another provider are left to that provider's controller.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from coco.errors import CocoError
from coco.host.peerpods.provider import PeerPodError, Provider

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "confidentialcontainers.org", "v1alpha1", "peerpods"
FINALIZER = "peer.pod/finalizer"


def crd() -> dict:
    """The PeerPod CustomResourceDefinition (upstream's schema, ``cleand`` included)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {"kind": "PeerPod", "listKind": "PeerPodList", "plural": PLURAL,
                      "singular": "peerpod"},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "PeerPod: the VM a peer pod runs in (deleted with the pod).",
                    "properties": {
                        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": {"type": "object", "properties": {
                            "cloudProvider": {"type": "string"},
                            "instanceID": {"type": "string"}}},
                        "status": {"type": "object", "properties": {
                            "cleand": {"type": "boolean"}}},
                    },
                }},
            }],
        },
    }  # fmt: skip


def manifests() -> str:
    import yaml

    return yaml.safe_dump(crd(), sort_keys=False)


async def reconcile(body: dict, provider: Provider) -> list[str] | None:
    """For one PeerPod: the finalizers to keep (the VM deleted), or ``None`` to change nothing."""
    meta = body.get("metadata") or {}
    finalizers = list(meta.get("finalizers") or [])
    if not meta.get("deletionTimestamp") or FINALIZER not in finalizers:
        return None
    spec = body.get("spec") or {}
    where = f"PeerPod {meta.get('namespace')}/{meta.get('name')}"
    if spec.get("cloudProvider") != provider.name:
        log.info(
            "%s: provider %r is not ours (%s)", where, spec.get("cloudProvider"), provider.name
        )
        return None
    instance = spec.get("instanceID")
    if isinstance(instance, str) and instance:
        log.info("%s: deleting VM %s (the CAA did not)", where, instance)
        await asyncio.to_thread(provider.delete_instance, instance)
    return [f for f in finalizers if f != FINALIZER]


def _kopf() -> Any:
    try:
        import kopf
    except ImportError:
        raise PeerPodError(
            "peerpods controller: the Python package kopf is missing: install the `peerpods` "
            "extra (pip install 'confidential-containers[peerpods]')"
        ) from None
    return kopf


def registry(provider: Provider, server: str | None = None) -> Any:
    """A kopf registry with the PeerPod handler; ``server``: an API URL without credentials
    (tests), else kopf's in-cluster or kubeconfig login."""
    kopf = _kopf()

    reg = kopf.OperatorRegistry()

    @kopf.on.login(registry=reg)
    def login(**kwargs: Any) -> Any:
        if server is not None:
            return kopf.ConnectionInfo(server=server, insecure=True)
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=reg)
    def configure(settings: Any, **_: Any) -> None:
        settings.posting.enabled = False
        settings.watching.server_timeout = 60

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=reg)
    async def peerpod(event: dict, body: Any, patch: Any, **_: Any) -> None:
        if event.get("type") == "DELETED":
            return
        try:
            keep = await reconcile(dict(body), provider)
        except CocoError as e:
            meta = body.get("metadata") or {}
            log.error("PeerPod %s/%s: %s (finalizer kept; retried on the next event)",
                      meta.get("namespace"), meta.get("name"), e)  # fmt: skip
            return
        if keep is not None:
            patch.setdefault("metadata", {})["finalizers"] = keep

    return reg


async def run(provider: Provider, server: str | None = None,
              stop: asyncio.Event | None = None) -> None:  # fmt: skip
    """Run the controller until ``stop`` is set (cluster-wide, no peering)."""
    kopf = _kopf()

    stop_flag: asyncio.Future | asyncio.Event = stop or asyncio.Event()
    await kopf.operator(registry=registry(provider, server), clusterwide=True, standalone=True,
                        stop_flag=stop_flag)  # fmt: skip
