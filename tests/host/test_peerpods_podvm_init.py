"""The pod VM's init in peer-pod mode, piece by piece on the host: how it recognises a VM of the
cloud-api-adaptor (its config drive), the services it starts and their command lines (parsed by
this checkout's CLI), the forwarder's readiness on TCP, and a userdata whose initdata the TEE did
not measure (a real swtpm, the real ``coco process-user-data``) stopping the boot with the reason.
The whole boot is in test_remote_sandbox.py."""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coco.cli._args import Parser
from coco.guest.forwarder import DEFAULT_POD_NAMESPACE
from coco.host.peerpods.cloudconfig import apf_config, cloud_config
from coco.host.peerpods.providers.libvirt import make_config_drive
from coco.host.podvm import guest_init as g
from coco.integrity import initdata
from coco.integrity.initdata import encode as encode_initdata
from tests.swtpm import start_swtpm

DOC = b'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n"policy.rego" = "package agent_policy"\n'
FILES = {"initdata.toml", "aa.toml", "cdh.toml", "policy.rego"}


def _userdata(doc: bytes) -> str:
    apf = apf_config("web", "default", server_key=None, server_cert=None, client_ca=None)
    return cloud_config(
        {"/run/peerpod/apf.json": apf, "/run/peerpod/initdata": encode_initdata(doc)}
    )


def test_a_config_drive_is_recognised_and_an_initdata_disk_is_not(tmp_path: Path) -> None:
    iso = tmp_path / "cidata.iso"
    make_config_drive(_userdata(DOC), "podvm-web-12345678", iso)
    assert g.is_config_drive(iso.read_bytes()[: 17 * g.ISO_SECTOR])
    assert not g.is_config_drive(initdata.encode_image(DOC).ljust(17 * g.ISO_SECTOR, b"\0"))
    other = tmp_path / "other.iso"
    subprocess.run(["genisoimage", "-quiet", "-o", str(other), "-V", "config-2", str(iso)],
                   check=True)  # fmt: skip
    assert not g.is_config_drive(other.read_bytes()[: 17 * g.ISO_SECTOR])


def test_peer_pod_mode_from_the_kernel_command_line() -> None:
    assert g.peerpod_mode(g.parse_cmdline("console=ttyS0 coco.peerpod=1"))


def test_peerpod_plan_puts_the_agent_on_its_socket_and_the_forwarder_last() -> None:
    groups = {"aa", "cdh", "api-server", "agent", "forwarder", "process-user-data"}
    plan = g.peerpod_plan(groups, FILES, Path("/i"))
    assert [name for name, _, _ in plan] == ["aa", "cdh", "api-server", "agent", "forwarder"]
    agent = plan[3]
    assert agent[1][2:4] == ["--server-addr", "unix:///run/kata-containers/agent.sock"]
    assert agent[1][-2:] == ["--policy", "/i/policy.rego"]  # the launch-measured policy
    assert agent[2] == "/run/kata-containers/agent.sock"
    assert plan[4] == ("forwarder", ["forwarder", "serve", "--config", "/run/peerpod/apf.json"],
                       "tcp:15150")  # fmt: skip
    aa = plan[0][1]
    assert aa[aa.index("--initdata-toml") + 1] == "/i/initdata.toml"  # the AA binds it, once


def test_a_peer_pods_api_server_runs_in_the_pods_network_namespace() -> None:
    """The forwarder puts the containers into /run/netns/podns: the api-server they reach at
    127.0.0.1:8006 must listen there (the others stay in the VM's own namespace)."""
    assert g.pod_netns_wrap("api-server") == ("ip", "netns", "exec", "podns")
    assert Path(DEFAULT_POD_NAMESPACE).name == g.POD_NETNS
    for name in ("aa", "cdh", "agent", "forwarder"):
        assert g.pod_netns_wrap(name) == ()


def test_peerpod_command_lines_are_ones_this_cli_accepts(tmp_path: Path) -> None:
    from coco.cli.main import _GROUPS

    for name in FILES:
        (tmp_path / name).write_bytes(DOC)
    plan = g.peerpod_plan(set(_GROUPS), FILES, tmp_path)
    assert "forwarder" in [name for name, _, _ in plan]
    for args in [a for _, a, _ in plan] + [g.userdata_args(True), g.userdata_args(False)]:
        module = importlib.import_module(_GROUPS[args[0]][0])
        func, _ = module.build(Parser(f"coco {args[0]}", module.DESCRIPTION), args[1:])
        assert callable(func), args


def test_tcp_listening_reads_the_kernels_table() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not g.tcp_listening(port)  # bound, not listening
        s.listen()
        assert g.tcp_listening(port)
    assert not g.tcp_listening(port)


def test_a_forwarder_that_exits_before_listening_is_an_error() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(g.InitError, match="coco forwarder exited with status 3 before listening"):
        g.wait_tcp("forwarder", proc.pid, 1)


def _fake_coco(tmp_path: Path, iso: Path, tcti: str) -> str:
    """This checkout's coco with the test's config drive, root and TPM added to its arguments."""
    script = tmp_path / "coco"
    script.write_text(
        f'#!/bin/sh\nexec {sys.executable} -m coco.cli.main "$@" --config-drive {iso} '
        f"--root {tmp_path / 'root'} --tpm-tcti {tcti}\n"
    )
    script.chmod(0o755)
    return str(script)


def test_userdata_with_initdata_the_tee_did_not_measure_stops_the_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched = DOC
    sent = DOC.replace(b"agent_policy", b"other_policy")
    iso = tmp_path / "cidata.iso"
    make_config_drive(_userdata(sent), "podvm-web-12345678", iso)
    with start_swtpm(tmp_path / "tpm") as tcti:
        digest = initdata.fit(hashlib.sha384(launched).digest(), 32)  # what the AA binds
        subprocess.run(["tpm2_pcrextend", f"8:sha256={digest.hex()}"], check=True,
                       env={**os.environ, "TPM2TOOLS_TCTI": tcti}, capture_output=True)  # fmt: skip
        monkeypatch.setattr(g, "COCO", _fake_coco(tmp_path, iso, tcti))
        with pytest.raises(g.InitError) as e:
            g.process_userdata(tpm=True)
        assert str(e.value).startswith("process-user-data: ")
        assert "does not match the TEE's measurement" in str(e.value)
        assert not (tmp_path / "root").exists()  # no forwarder or agent configuration
        # the same userdata with the launched initdata passes
        make_config_drive(_userdata(launched), "podvm-web-12345678", iso.with_name("ok.iso"))
        monkeypatch.setattr(g, "COCO", _fake_coco(tmp_path, iso.with_name("ok.iso"), tcti))
        g.process_userdata(tpm=True)
    assert (tmp_path / "root/run/peerpod/apf.json").exists()


def test_a_one_sector_disk_beside_the_config_drive_is_skipped(tmp_path: Path) -> None:
    """The VM's initdata disk is one 512-byte sector: probing it for a config drive must not
    fail the search (a block device refuses a seek past its end with EINVAL)."""
    from coco.guest.userdata import find_config_drive

    if os.geteuid() != 0:
        pytest.skip("a loop device needs root")
    small = tmp_path / "initdata.img"
    small.write_bytes(initdata.encode_image(DOC))
    iso = tmp_path / "cidata.iso"
    make_config_drive(_userdata(DOC), "podvm-web-12345678", iso)
    loops = []
    try:
        for image in (small, iso):
            proc = subprocess.run(["losetup", "--find", "--show", "--read-only", str(image)],
                                  capture_output=True, text=True, check=False)  # fmt: skip
            if proc.returncode != 0:
                pytest.skip(f"no loop device: {proc.stderr.strip()}")
            loops.append(Path(proc.stdout.strip()))
        found = find_config_drive(loops)
        assert found is not None and found[1] == f"config drive {loops[1]}"
        assert b"/run/peerpod/apf.json" in found[0]
    finally:
        for loop in loops:
            subprocess.run(["losetup", "--detach", str(loop)], check=False)
