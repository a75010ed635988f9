"""The agent's pieces on their own: config precedence, the OCI spec converter, verify_id, the
policy gate's cache, and the tardev/dm-verity storage (the real path needs device-mapper: it runs
in the pod VM, tests/host/test_qemu_agent.py; here the clear error)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from coco.guest.agent.config import load_config
from coco.guest.agent.errors import AgentError, StorageError
from coco.guest.agent.ocispec import policy_input, spec_from_json, spec_to_json
from coco.guest.agent.policy import PolicyGate
from coco.guest.agent.sandbox import verify_id
from coco.guest.agent.storage import Storages
from coco.integrity.agent_policy import AgentPolicy
from coco.rpc.protos import agent_pb2 as pb

CRI = Path("/work/shared/vectors/cri")
HAS_DM = os.path.exists("/dev/mapper/control")


@pytest.mark.parametrize("kind", ["sandbox", "container"])
def test_spec_round_trip_of_containerd_specs(kind: str) -> None:
    doc = json.loads((CRI / f"containerd-1.6-{kind}.config.json").read_text())
    back = spec_to_json(spec_from_json(doc))
    doc["process"].pop("oomScoreAdj", None)  # 0: a zero value, left out as omitempty does
    assert back == doc


def test_policy_input_shape() -> None:
    doc = json.loads((CRI / "containerd-1.6-container.config.json").read_text())
    body = policy_input(pb.CreateContainerRequest(container_id="c1", OCI=spec_from_json(doc)))
    assert body["string_user"] is None and body["storages"] == []
    assert body["OCI"]["Mounts"][0] == {
        "destination": "/proc", "source": "proc", "type_": "proc",
        "options": ["nosuid", "noexec", "nodev"],
    }  # fmt: skip
    assert body["OCI"]["Hooks"] is None and body["OCI"]["Linux"]["Seccomp"] is None


@pytest.mark.parametrize("cid", ["ab", "a.b-c_d", "é1", "0" * 64])
def test_verify_id_accepts(cid: str) -> None:
    verify_id(cid)


@pytest.mark.parametrize("cid", ["", "a", "-ab", ".ab", "a/b", "a b", "../x"])
def test_verify_id_refuses(cid: str) -> None:
    with pytest.raises(AgentError, match="invalid container ID"):
        verify_id(cid)


def test_server_addr_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('server_addr = "unix:///file.sock"\n')
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("quiet agent.server_addr=serial:///dev/virtio-ports/agent.0 x=1\n")
    env = {"KATA_AGENT_SERVER_ADDR": "tcp://127.0.0.1:15150"}
    assert load_config(str(cfg), cmdline=str(cmdline), environ={}).server_addr == (
        "serial:///dev/virtio-ports/agent.0"
    )
    assert load_config(str(cfg), cmdline=str(cmdline), environ=env).server_addr == (
        "tcp://127.0.0.1:15150"
    )
    got = load_config(str(cfg), server_addr="unix:///x", cmdline=str(cmdline), environ=env)
    assert got.server_addr == "unix:///x"
    assert load_config(str(cfg), cmdline="/nonexistent", environ={}).server_addr == (
        "unix:///file.sock"
    )


def test_config_refuses_unknown_keys_and_types(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('server_adr = "unix:///x"\n')
    with pytest.raises(AgentError, match="unknown key 'server_adr'"):
        load_config(str(cfg), environ={})
    cfg.write_text("image_pull_timeout = true\n")
    with pytest.raises(AgentError, match="image_pull_timeout: expected int or float, got bool"):
        load_config(str(cfg), environ={})


def test_gate_remembers_decisions() -> None:
    data = json.loads(Path("/work/shared/vectors/genpolicy/pod-one-container.policy_data.json")
                      .read_text())  # fmt: skip
    gate = PolicyGate(AgentPolicy.from_data(data))
    body = {"container_id": "c", "exec_id": "c", "len": 100}
    assert gate.check_quietly("ReadStreamRequest", body) is True  # azl1 data: logs allowed
    assert gate.check_quietly("ReadStreamRequest", body) is True
    assert (gate.stats.evaluations, gate.stats.cache_hits) == (1, 1)


def _layer_storage(tmp_path: Path, root_hash: str, layer: Path | None = None) -> pb.Storage:
    if layer is None:
        layer = tmp_path / "layer.img"
        layer.write_bytes(b"\0" * 16384)
    return pb.Storage(
        driver="blk", source=str(layer), fstype="tar",
        mount_point="/run/kata-containers/sandbox/layers/" + "a" * 64,
        options=["ro", "io.katacontainers.fs-opt.block_device=file",
                 "io.katacontainers.fs-opt.is-layer",
                 f"io.katacontainers.fs-opt.root-hash={root_hash}"],
    )  # fmt: skip


def _storages(tmp_path: Path) -> Storages:
    from coco.guest.agent.config import AgentConfig

    async def no_pull(image: str, bundle: str) -> str:
        raise AssertionError("no pull expected")

    return Storages(AgentConfig(container_root=str(tmp_path / "kata")), no_pull)


@pytest.mark.skipif(HAS_DM, reason="device-mapper present: the real path runs (test below)")
def test_tardev_layer_without_device_mapper_is_a_clear_error(tmp_path: Path) -> None:
    s = _storages(tmp_path)
    with pytest.raises(StorageError, match=r"dm-verity needs the kernel's device-mapper"):
        asyncio.run(s.add(_layer_storage(tmp_path, "0" * 64), "c1", {}))
    assert not (tmp_path / "kata/sandbox/layers").exists()  # nothing made


def test_tardev_layer_root_hash_must_be_hex(tmp_path: Path) -> None:
    s = _storages(tmp_path)
    with pytest.raises(StorageError, match=r"expected one option .*root-hash=<64 hex digits>"):
        asyncio.run(s.add(_layer_storage(tmp_path, "xyz"), "c1", {}))
