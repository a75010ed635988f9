"""The CAA's pieces that need no VM: instance names, instance-type selection, sandbox records,
the userdata document (read back by the guest's parser)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coco.guest.userdata import parse_cloud_config
from coco.host.peerpods.cloudconfig import apf_config, cloud_config
from coco.host.peerpods.provider import (
    InstanceTypeSpec,
    PeerPodError,
    instance_name,
    parse_instance_types,
    select_instance_type,
)
from coco.host.peerpods.state import Sandbox, Store

TYPES = parse_instance_types("large=4x8192,small=1x512,medium=2x2048,gpu=4x8192x1", "t")


def test_instance_name_is_upstreams() -> None:
    assert instance_name("Web_App.v2", "0123456789abcdef") == "podvm-web-app-v2-01234567"
    long = instance_name("x" * 100, "0123456789abcdef")
    assert len(long) == 63 and long.endswith("-01234567") and long.startswith("podvm-xxx")


@pytest.mark.parametrize(
    ("spec", "default", "chosen"),
    [
        (InstanceTypeSpec(instance_type="medium"), "small", "medium"),
        (InstanceTypeSpec(vcpus=2, memory=1024), "small", "medium"),  # smallest that fits
        (InstanceTypeSpec(vcpus=1, memory=600), "large", "medium"),  # memory decides
        (InstanceTypeSpec(vcpus=3, memory=600), "small", "large"),  # GPU types are skipped
        (InstanceTypeSpec(gpus=1), "small", "gpu"),
        (InstanceTypeSpec(vcpus=2), "small", "small"),  # vCPUs without memory: the default
        (InstanceTypeSpec(), "", "small"),  # no default: the smallest
    ],
)
def test_instance_type_selection(spec: InstanceTypeSpec, default: str, chosen: str) -> None:
    assert [t.name for t in TYPES] == ["small", "medium", "large", "gpu"]
    picked = select_instance_type(spec, TYPES, default)
    assert picked is not None and picked.name == chosen


def test_instance_type_refusals() -> None:
    with pytest.raises(PeerPodError, match="expected one of small, medium, large, gpu, found 'xl'"):
        select_instance_type(InstanceTypeSpec(instance_type="xl"), TYPES, "small")
    with pytest.raises(PeerPodError, match="no instance type has 8 vCPUs and 1024 MiB"):
        select_instance_type(InstanceTypeSpec(vcpus=8, memory=1024), TYPES, "small")
    with pytest.raises(PeerPodError, match="no instance types are configured"):
        select_instance_type(InstanceTypeSpec(instance_type="small"), [], "")
    assert select_instance_type(InstanceTypeSpec(vcpus=2, memory=512), [], "") is None
    for bad, message in (("small", "expected NAME=VCPUSxMEMORY_MIB"), ("a=1x128", "256 MiB"),
                         ("a=0x512", "at least 1 vCPU"), ("a=1xbig", "found 'a=1xbig'")):  # fmt: skip
        with pytest.raises(PeerPodError, match=message):
            parse_instance_types(bad, "--instance-types")


def test_sandbox_records_round_trip_and_bad_ones_are_named(tmp_path: Path) -> None:
    store = Store(tmp_path / "pods")
    sb = Sandbox("abc", "web", "default", "podvm-web-abc", state="running", instance_id="u-1",
                 ips=["127.0.0.1"], forwarder_port=4000)  # fmt: skip
    store.save(sb, "#cloud-config\n")
    assert store.load_all() == {"abc": sb}
    assert store.userdata("abc") == "#cloud-config\n"
    assert (tmp_path / "pods/abc").stat().st_mode & 0o777 == 0o700
    record = tmp_path / "pods/abc/sandbox.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "state": "weird"}))
    with pytest.raises(PeerPodError, match=r"sandbox.json: expected a sandbox record"):
        store.load_all()
    record.write_text("{")
    with pytest.raises(PeerPodError, match=r"sandbox\.json"):
        store.load_all()
    with pytest.raises(PeerPodError, match="sandbox id: expected"):
        store.pod_dir("../x")


def test_userdata_is_what_the_guest_reads() -> None:
    apf = apf_config("web", "default", server_key=b"K", server_cert=b"C", client_ca=b"A",
                     tls_min_version="TLSv1.3")  # fmt: skip
    text = cloud_config({"/run/peerpod/apf.json": apf, "/run/peerpod/initdata": "H4sI\n"})
    assert text.startswith("#cloud-config\nwrite_files:\n- path: /run/peerpod/apf.json\n")
    files = parse_cloud_config(text.encode(), "t")
    assert [f.path for f in files] == ["/run/peerpod/apf.json", "/run/peerpod/initdata"]
    doc = json.loads(files[0].content)
    assert doc == {"pod-namespace": "default", "pod-name": "web", "tls-server-key": "K",
                   "tls-server-cert": "C", "tls-client-ca": "A", "tls-min-version": "TLSv1.3"}  # fmt: skip


def test_proxy_does_not_take_a_silent_peer_for_a_ready_vm(tmp_path: Path) -> None:
    """A VM still booting behind user networking accepts the connection and never answers:
    waiting for it must time out with the reason, not report the VM ready."""
    import asyncio

    from coco.host.peerpods.proxy import AgentProxy
    from tests.rpc.conftest import arun

    async def main() -> str:
        held: list = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # accept, read nothing, answer nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proxy = AgentProxy(tmp_path / "a.sock", "127.0.0.1", port, None, "podvm-x")
        try:
            with pytest.raises(PeerPodError) as err:
                await proxy.wait_ready(6)
            return str(err.value)
        finally:
            await proxy.stop()
            for w in held:
                w.close()
            server.close()

    message = arun(main(), timeout=60)
    assert message.startswith("agent proxy: the forwarder at 127.0.0.1:")
    assert "did not answer within 6 s" in message


def _coco(args: list[str]) -> int:
    from coco.cli.main import main

    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_cli_usage_errors(capsys) -> None:
    assert _coco(["cloud-api-adaptor", "serve", "aws"]) == 2
    assert "PROVIDER: expected one of libvirt, qemu, found 'aws'" in capsys.readouterr().err
    assert _coco(["cloud-api-adaptor", "serve", "libvirt", "--proxy-timeout", "soon"]) == 2
    assert "expected a duration such as 90s, 5m or 1h, found 'soon'" in capsys.readouterr().err
    assert _coco(["cloud-api-adaptor", "start"]) == 2
    assert "No such command 'start'" in capsys.readouterr().err
    assert _coco(["peerpods", "controller", "gcp"]) == 2
    assert "found 'gcp'" in capsys.readouterr().err
    assert _coco(["peerpods", "webhook", "serve"]) == 2
    assert "--cert and --key" in capsys.readouterr().err
    assert _coco(["cloud-api-adaptor", "serve", "qemu", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--podvm-image" in out and "REMOTE_HYPERVISOR_ENDPOINT" in out


def test_duration() -> None:
    from coco.cli.cloud_api_adaptor import duration

    assert [duration(t) for t in ("90", "90s", "5m", "1h", "1m30s", "500ms")] == [
        90, 90, 300, 3600, 90, 0.5
    ]  # fmt: skip


def test_cli_manual_tls_needs_a_key_and_readable_files(tmp_path: Path, capsys) -> None:
    base = ["cloud-api-adaptor", "serve", "qemu", "--data-dir", str(tmp_path / "vms"),
            "--pods-dir", str(tmp_path / "pods"), "--socket", str(tmp_path / "hv.sock")]  # fmt: skip
    assert _coco([*base, "--cert-file", str(tmp_path / "c.crt")]) == 1
    assert "manual TLS: expected both --cert-file and --cert-key" in capsys.readouterr().err
    assert _coco([*base, "--cert-file", str(tmp_path / "c.crt"), "--cert-key", "k"]) == 1
    err = capsys.readouterr().err
    assert "manual TLS: cannot load" in err and err.count("\n") == 1
    assert not (tmp_path / "hv.sock").exists()
