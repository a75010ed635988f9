"""The pod VM's init, piece by piece on the host: initdata from a disk image or the kernel command
line, what it refuses, the files it writes, and the services it would start."""

from __future__ import annotations

import importlib
import stat
from pathlib import Path

import pytest

from coco.cli._args import Parser
from coco.cli.main import main
from coco.host.podvm import guest_init as g
from coco.integrity import initdata

DOC = b"""version = "0.1.0"
algorithm = "sha384"

[data]
"aa.toml" = '''
[token_configs.kbs]
url = "http://10.0.2.2:8080"
'''
"policy.rego" = "package agent_policy"
"""


def test_initdata_image_round_trips() -> None:
    image = initdata.encode_image(DOC)
    assert g.read_initdata_image(image, "/dev/vdb") == DOC


def test_a_disk_without_the_magic_is_not_initdata() -> None:
    assert g.read_initdata_image(b"\0" * 512, "/dev/vda") is None


def test_a_truncated_initdata_image_is_refused() -> None:
    image = initdata.encode_image(DOC)
    with pytest.raises(g.InitError, match=r"announces \d+ bytes of gzip, the device holds 10"):
        g.read_initdata_image(image[:26], "/dev/vdb")


def test_corrupt_gzip_in_an_initdata_image_is_refused() -> None:
    image = bytearray(initdata.encode_image(DOC))
    image[30:40] = b"\xff" * 10
    with pytest.raises(g.InitError, match="initdata /dev/vdb: "):
        g.read_initdata_image(bytes(image), "/dev/vdb")


def test_initdata_from_the_kernel_command_line() -> None:
    cmdline = g.parse_cmdline(f"console=ttyS0 quiet coco.initdata={initdata.encode(DOC)}")
    assert cmdline["quiet"] == ""
    assert g.read_initdata_cmdline(cmdline["coco.initdata"]) == DOC
    with pytest.raises(g.InitError, match=r"expected base64 after coco\.initdata="):
        g.read_initdata_cmdline("not*base64")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b'version = "0.2.0"\nalgorithm = "sha256"\n', "version: expected '0.1.0', found '0.2.0'"),
        (b'version = "0.1.0"\nalgorithm = "md5"\n', "algorithm: expected one of sha256"),
        (b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\nn = 1\n', "a table of strings"),
        (b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"../x" = ""\n', "'../x' is not a"),
        (b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"a/b" = ""\n', "'a/b' is not a"),
        (b"\xff", "expected UTF-8 TOML"),
    ],
)
def test_bad_initdata_is_refused(doc: bytes, message: str) -> None:
    with pytest.raises(g.InitError, match=message.replace("(", r"\(")):
        g.check_initdata(doc, "/dev/vdb")


def test_initdata_files_are_written_with_the_whole_toml(tmp_path: Path) -> None:
    algorithm, data = g.check_initdata(DOC, "test")
    assert algorithm == "sha384"
    names = g.write_initdata(DOC, data, tmp_path / "initdata")
    assert names == ["aa.toml", "initdata.toml", "policy.rego"]
    assert (tmp_path / "initdata/initdata.toml").read_bytes() == DOC
    assert (tmp_path / "initdata/policy.rego").read_text() == "package agent_policy"
    assert stat.S_IMODE((tmp_path / "initdata/aa.toml").stat().st_mode) == 0o600


def test_fit32_truncates_and_pads() -> None:
    assert g.fit32(bytes(range(48))) == bytes(range(32))
    assert g.fit32(b"\x01" * 20) == b"\x01" * 20 + bytes(12)


def test_groups_come_from_coco_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    groups = g.coco_groups(capsys.readouterr().out)
    assert {"podvm", "initdata", "policy"} <= groups
    assert "Commands:" not in groups and "Options:" not in groups


def test_service_plan_passes_the_initdata_files() -> None:
    files = {"initdata.toml", "aa.toml", "cdh.toml", "policy.rego"}
    plan = g.service_plan({"agent", "aa", "cdh", "image"}, files, Path("/i"))
    assert [name for name, _, _ in plan] == ["aa", "cdh", "agent"]
    aa, cdh, agent = (args for _, args, _ in plan)
    assert aa[aa.index("--initdata-toml") + 1] == "/i/initdata.toml"
    assert aa[aa.index("--config-file") + 1] == "/i/aa.toml"
    assert plan[0][2] == g.AA_SOCKET
    assert cdh == ["cdh", "serve", "--config", "/i/cdh.toml"]
    assert agent[2:4] == ["--server-addr", "serial:///dev/virtio-ports/agent.0"]
    assert agent[-2:] == ["--policy", "/i/policy.rego"]
    bare = g.service_plan({"aa"}, set())
    assert bare == [
        ("aa", ["aa", "serve", "--attestation_sock", f"unix://{g.AA_SOCKET}"], g.AA_SOCKET)
    ]


def test_service_plan_options_are_ones_the_services_accept(tmp_path: Path) -> None:
    """Each planned command line parses with this checkout's own CLI (for the groups it has)."""
    from coco.cli.main import _GROUPS

    files = {"initdata.toml", "aa.toml", "cdh.toml", "policy.rego"}
    for name in files:
        (tmp_path / name).write_bytes(DOC)
    plan = g.service_plan(set(_GROUPS), files, tmp_path)
    assert plan, "no guest service in this checkout"
    for name, args, _ in plan:
        module = importlib.import_module(_GROUPS[name][0])
        func, _ = module.build(Parser(f"coco {name}", module.DESCRIPTION), args[1:])
        assert callable(func), name
