"""SecureMount ``block-device``: the request is checked in full, and on a host without device
mapper the refusal says so before any key is fetched. (The LUKS2 mount itself runs in the guest
VM's tests: no test here ever hands cryptsetup a real block device.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from coco.guest.cdh.config import CdhConfig, KbcConfig
from coco.guest.cdh.errors import SecureMountError
from coco.guest.cdh.hub import Hub
from coco.guest.cdh.secure_mount import parse_request

from .cdh_util import DictGetter

GOOD = {"devicePath": "/dev/vdb", "sourceType": "empty", "encryptionType": "luks2"}


def test_parse_defaults_and_choices() -> None:
    r = parse_request("block-device", GOOD, [], "/run/secure")
    assert (r.device, r.format, r.target, r.filesystem, r.integrity, r.key) == (
        "/dev/vdb", True, "fileSystem", "ext4", False, None,
    )  # fmt: skip
    assert r.mapper_name == "coco-secure-vdb"
    r = parse_request(
        "block-device",
        {"deviceId": "253:1", "sourceType": "encrypted", "encryptionType": "luks2",
         "key": "kbs:///default/disk/key", "targetType": "device", "dataIntegrity": "true",
         "mapperName": "data", "mkfsOpts": "-E nodiscard", "filesystemType": "xfs"},
        ["ro", "noexec"], "/run/dev-node",
    )  # fmt: skip
    assert (r.device, r.format, r.target, r.integrity, r.mapper_name, r.flags) == (
        "/dev/block/253:1", False, "device", True, "data", ("ro", "noexec"),
    )  # fmt: skip
    assert r.mkfs_opts == ("-E", "nodiscard") and r.filesystem == "xfs"


@pytest.mark.parametrize(
    ("volume_type", "options", "flags", "mount_point", "message"),
    [
        ("nfs", GOOD, [], "/m", "unknown volume type"),
        ("alibaba-cloud-oss", GOOD, [], "/m", "not built in"),
        ("block-device", {**GOOD, "colour": "red"}, [], "/m", "unknown option 'colour'"),
        ("block-device", {**GOOD, "sourceType": "full"}, [], "/m", "sourceType: expected one of empty, encrypted"),
        ("block-device", {**GOOD, "encryptionType": "zfs"}, [], "/m", "'zfs' is not built in"),
        ("block-device", {**GOOD, "encryptionType": "luks1"}, [], "/m", "encryptionType: expected one of"),
        ("block-device", {**GOOD, "targetType": "raw"}, [], "/m", "targetType: expected one of"),
        ("block-device", {**GOOD, "dataIntegrity": "yes"}, [], "/m", "dataIntegrity: expected one of true, false"),
        ("block-device", {**GOOD, "deviceId": "1:2"}, [], "/m", "exactly one of devicePath and deviceId"),
        ("block-device", {k: v for k, v in GOOD.items() if k != "devicePath"}, [], "/m", "exactly one of"),
        ("block-device", {**GOOD, "devicePath": "dev/vdb"}, [], "/m", "expected an absolute /dev path"),
        ("block-device", {**GOOD, "devicePath": "/dev/../etc/x"}, [], "/m", "expected an absolute /dev path"),
        ("block-device", {k: v for k, v in GOOD.items() if k != "devicePath"} | {"deviceId": "vdb"}, [], "/m", "expected MAJOR:MINOR"),
        ("block-device", {**GOOD, "mapperName": "../x"}, [], "/m", "mapperName: expected"),
        ("block-device", {**GOOD, "filesystemType": "ext4 -F"}, [], "/m", "filesystemType: expected"),
        ("block-device", {**GOOD, "mkfsOpts": "/dev/sda"}, [], "/m", "mkfsOpts: unexpected '/dev/sda'"),
        ("block-device", {**GOOD, "key": "hunter2"}, [], "/m", "key: expected sealed."),
        ("block-device", {**GOOD, "sourceType": "encrypted"}, [], "/m", "needs the device's key"),
        ("block-device", GOOD, [], "relative", "mount_point: expected an absolute path"),
        ("block-device", GOOD, ["rw;reboot"], "/m", "flag 'rw;reboot'"),
    ],
)  # fmt: skip
def test_refused_requests(volume_type, options, flags, mount_point, message) -> None:
    with pytest.raises(SecureMountError, match=message):
        parse_request(volume_type, options, flags, mount_point)


def _hub(tmp_path: Path, dm_control: Path) -> tuple[Hub, DictGetter]:
    getter = DictGetter({"kbs:///default/disk/key": b"k" * 64})
    return Hub(CdhConfig(KbcConfig("offline_fs_kbc")), getter, dm_control=str(dm_control)), getter


def test_no_device_mapper(tmp_path: Path) -> None:
    hub, getter = _hub(tmp_path, tmp_path / "no-mapper-control")
    opts = {**GOOD, "key": "kbs:///default/disk/key"}
    with pytest.raises(
        SecureMountError, match=r"device mapper is not available here \(no .*no-mapper-control\)"
    ):
        hub.secure_mount("block-device", opts, [], str(tmp_path / "mnt"))
    assert getter.calls == []  # no key was fetched for a mount that cannot happen
    assert not (tmp_path / "mnt").exists()


def test_not_a_block_device(tmp_path: Path) -> None:
    """Past the host check (a stand-in control file), a device that is not a block device is
    refused before the key is fetched and before cryptsetup runs."""
    (tmp_path / "control").touch()
    hub, getter = _hub(tmp_path, tmp_path / "control")
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    for dev, message in [(str(tmp_path / "disk.img"), "expected a block device"),
                         ("/dev/null", "expected a block device"),
                         (str(tmp_path / "absent"), "cannot use the device")]:  # fmt: skip
        with pytest.raises(SecureMountError, match=message):
            hub.secure_mount(
                "block-device",
                {**GOOD, "devicePath": dev, "key": "kbs:///default/disk/key"},
                [],
                "/m",
            )
    assert getter.calls == []
    assert (tmp_path / "disk.img").read_bytes() == bytes(4096)
