"""``coco image copy`` and ``coco image inspect`` through the real entry point."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

from coco.cli.main import main
from tests.conftest import Registry
from tests.imagekit import tar_layer, write_image, write_index


def coco_process(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``coco`` entry point in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "coco.cli.main", *args], capture_output=True, text=True, timeout=60
    )


def coco(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``coco.cli.main.main`` in this process (same exit-code mapping, no start-up cost)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("coco: error: ")
    assert "Traceback" not in p.stderr
    return lines[0]


def test_copy_push_inspect_pull(registry: Registry, tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"etc/motd": b"cli\n"})], tag="v1")
    dst = registry.url("cli/app", "v1")
    p = coco(
        "image",
        "copy",
        "--dest-creds",
        registry.creds,
        "--dest-tls-verify=false",
        "--digestfile",
        str(tmp_path / "digest"),
        img.ref,
        dst,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == img.manifest_digest + "\n"
    assert (tmp_path / "digest").read_text() == img.manifest_digest
    assert "\x1b[" not in p.stderr  # no progress bars when piped
    assert "1 copied" in p.stderr

    p = coco("image", "inspect", "--creds", registry.creds, "--tls-verify=false", dst)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["Digest"] == img.manifest_digest
    assert info["Layers"] == img.layer_digests
    assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
    assert info["Name"] == dst.removeprefix("docker://").rsplit(":", 1)[0]

    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "coco.cli.main",
            "image",
            "inspect",
            "--raw",
            "--authfile",
            str(registry.authfile),
            "--tls-verify=false",
            dst,
        ],
        capture_output=True,
    )
    assert p.returncode == 0 and p.stdout == img.manifest

    p = coco(
        "image",
        "copy",
        "-q",
        "--authfile",
        str(registry.authfile),
        "--src-tls-verify=false",
        dst,
        f"oci:{tmp_path / 'back'}:v1",
    )
    assert p.returncode == 0 and p.stderr == ""
    p = coco_process("image", "inspect", "--config", f"oci:{tmp_path / 'back'}:v1")
    assert p.returncode == 0 and p.stdout.encode() == img.config


def test_copy_all_and_platform(tmp_path: Path) -> None:
    idx = write_index(
        tmp_path / "src",
        [
            ("linux", "amd64", [tar_layer({"p": b"1"})]),
            ("linux", "arm64", [tar_layer({"p": b"2"})]),
        ],
        tag="m",
    )
    p = coco("image", "copy", "-q", "--all", idx.ref, f"oci:{tmp_path / 'all'}:m")
    assert p.returncode == 0 and p.stdout.strip() == idx.index_digest
    p = coco("image", "copy", "-q", "--override-arch", "arm64", idx.ref, f"oci:{tmp_path / 'a'}")
    assert p.returncode == 0 and p.stdout.strip() == idx.images[1].manifest_digest
    p = coco("image", "copy", "--override-arch", "mips", idx.ref, f"oci:{tmp_path / 'b'}")
    assert p.returncode == 1
    assert "no image for platform linux/mips" in one_error_line(p)
    assert not (tmp_path / "b").exists()


def test_errors_are_one_line(registry: Registry, tmp_path: Path) -> None:
    img = write_image(tmp_path / "src", [tar_layer({"a": b"1"})])
    p = coco(
        "image",
        "copy",
        "--src-creds",
        registry.creds,
        "--src-tls-verify=false",
        registry.url("cli/missing", "nope"),
        f"oci:{tmp_path / 'o'}",
    )
    assert p.returncode == 1
    line = one_error_line(p)
    assert "cli/missing:nope" in line and "404" in line
    p = coco(
        "image",
        "copy",
        "--dest-creds",
        "alice:wrong",
        "--dest-tls-verify=false",
        img.ref,
        registry.url("cli/x"),
    )
    assert p.returncode == 1
    assert "credentials for user 'alice' refused" in one_error_line(p)
    p = coco("image", "inspect", f"oci:{tmp_path / 'nothing'}")
    assert p.returncode == 1 and "not an OCI layout" in one_error_line(p)


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (
        ["image", "copy", "oci:/x", "ftp://host/x"],
        ["image", "copy", "oci:/x"],
        ["image", "copy", "--dest-tls-verify=maybe", "oci:/x", "oci:/y"],
        ["image", "copy", "oci:/x", "docker://reg.io/UPPER:1"],
        ["image", "inspect", "--raw", "--config", "oci:/x"],
    ):
        p = coco(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr
    p = coco_process("image", "copy", "oci:/x", "ftp://host/x")
    assert p.returncode == 2 and "unsupported transport 'ftp'" in p.stderr
