"""coco peerpods controller (kopf) against kmock's Kubernetes emulator, deleting real libvirt
domains of the test's own libvirtd: a PeerPod deleted while the CAA's finalizer is still on it
gets its VM deleted and is let go; another provider's PeerPod and a provider failure keep the
finalizer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import kmock
import pytest
import yaml

from coco.host.peerpods import controller
from coco.host.peerpods.provider import InstanceTypeSpec, Tags
from coco.host.peerpods.providers.libvirt import LibvirtConfig, LibvirtProvider
from tests.host.peerpods_fixtures import Libvirtd, make_tiny_image, start_libvirtd
from tests.rpc.conftest import arun

BASE = "/apis/confidentialcontainers.org/v1alpha1/namespaces/default/peerpods"


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    with start_libvirtd() as lv:
        yield lv


def _peerpod(name: str, provider: str, instance: str) -> dict:
    return {
        "apiVersion": "confidentialcontainers.org/v1alpha1", "kind": "PeerPod",
        "metadata": {"name": name, "namespace": "default",
                     "finalizers": [controller.FINALIZER, "other/keep"]},
        "spec": {"cloudProvider": provider, "instanceID": instance},
    }  # fmt: skip


async def _with_controller(provider, scenario) -> None:
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as srv:
        info = kmock.ResourceInfo
        k8s.resources["confidentialcontainers.org/v1alpha1/peerpods"] = info(
            kind="PeerPod",
            namespaced=True,
            verbs={"list", "watch", "get", "patch", "create", "delete"},
        )
        k8s.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False,
                                              verbs={"list", "watch", "get"})  # fmt: skip
        k8s.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
            kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch", "get"}
        )
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(provider, str(srv.url), stop))
        try:
            await scenario(k8s)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def _until(predicate, what: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.1)


async def _get(k8s, name: str) -> tuple[int, dict]:
    r = await k8s.get(f"{BASE}/{name}")
    return r.status, await r.json()


def test_controller_deletes_the_vm_the_caa_left(libvirtd: Libvirtd) -> None:
    tiny = make_tiny_image(libvirtd.base / "tiny")
    provider = LibvirtProvider(
        LibvirtConfig(uri=libvirtd.uri, image=tiny, data_dir=libvirtd.data_dir)
    )
    xml = provider.domain_xml("podvm-web-12345678", InstanceTypeSpec(), Tags("caa", "s1"),
                              libvirtd.base, 0, False)  # fmt: skip
    uuid = provider.conn().defineXML(xml).UUIDString()

    async def scenario(k8s) -> None:
        for body in (_peerpod("web-resource-aaaaa", "libvirt", uuid),
                     _peerpod("db-resource-bbbbb", "aws", "i-0123")):  # fmt: skip
            assert (await k8s.post(BASE, json=body)).status == 200
        await asyncio.sleep(1)
        assert "podvm-web-12345678" in libvirtd.domains()  # not deleted while the pod lives
        for name in ("web-resource-aaaaa", "db-resource-bbbbb"):
            assert (await k8s.delete(f"{BASE}/{name}")).status == 200

        async def finalized() -> bool:
            status, body = await _get(k8s, "web-resource-aaaaa")
            return status == 200 and body["metadata"]["finalizers"] == ["other/keep"]

        await _until(finalized, "the finalizer removed")
        assert "podvm-web-12345678" not in libvirtd.domains()
        status, body = await _get(k8s, "db-resource-bbbbb")  # another provider's: untouched
        assert status == 200 and controller.FINALIZER in body["metadata"]["finalizers"]

    try:
        arun(_with_controller(provider, scenario), timeout=120)
    finally:
        provider.teardown()


def test_provider_failure_keeps_the_finalizer(libvirtd: Libvirtd, tmp_path: Path) -> None:
    broken = LibvirtProvider(LibvirtConfig(uri=f"qemu:///session?socket={tmp_path}/none",
                                           data_dir=tmp_path))  # fmt: skip

    async def scenario(k8s) -> None:
        assert (
            await k8s.post(BASE, json=_peerpod("x-resource-ccccc", "libvirt", "u-1"))
        ).status == 200
        await asyncio.sleep(1)
        assert (await k8s.delete(f"{BASE}/x-resource-ccccc")).status == 200
        await asyncio.sleep(2)
        status, body = await _get(k8s, "x-resource-ccccc")
        assert status == 200 and body["metadata"].get("deletionTimestamp")
        assert controller.FINALIZER in body["metadata"]["finalizers"]

    arun(_with_controller(broken, scenario), timeout=120)


def test_crd() -> None:
    doc = yaml.safe_load(controller.manifests())
    assert doc["metadata"]["name"] == "peerpods.confidentialcontainers.org"
    version = doc["spec"]["versions"][0]
    assert doc["spec"]["scope"] == "Namespaced" and version["subresources"] == {"status": {}}
    props = version["schema"]["openAPIV3Schema"]["properties"]
    assert set(props["spec"]["properties"]) == {"cloudProvider", "instanceID"}
    assert set(props["status"]["properties"]) == {"cleand"}
