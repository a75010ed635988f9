"""Every CLI command that reads a file the user names, fed garbage: binary bytes, JSON nested a
hundred thousand deep, YAML that contains itself or expands to billions of nodes. Each must fail
with one line that names the file (no traceback, no bare codec message, no hang) and leave
nothing behind."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli.run import invoke
from tests.test_yamlio import laughs

VECTORS = Path("/work/shared/vectors/genpolicy")
BINARY = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
DEEP = b"[" * 100_000
POD = """apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  containers: [{name: c, image: "127.0.0.1:1/x:y"}]
"""

# (id, argv with F for the garbage file); files named by other arguments are made in `scene`
COMMANDS: list[tuple[str, list[str]]] = [
    ("policy-evaluate-policy", ["policy", "evaluate", "--policy", "F", "ExecProcessRequest", "REQ"]),
    ("policy-evaluate-data", ["policy", "evaluate", "--policy-data", "F", "ExecProcessRequest", "REQ"]),
    ("policy-evaluate-request", ["policy", "evaluate", "--policy-data", "PD", "ExecProcessRequest", "F"]),
    ("policy-evaluate-rules", ["policy", "evaluate", "--policy-data", "PD", "--rules", "F", "ExecProcessRequest", "REQ"]),
    ("policy-generate", ["policy", "generate", "F", "-o", "-"]),
    ("policy-generate-settings", ["policy", "generate", "POD", "-o", "-", "--settings", "F"]),
    ("policy-generate-cache", ["policy", "generate", "POD", "-o", "-", "--layers-cache", "F"]),
    ("policy-generate-config", ["policy", "generate", "POD", "-o", "-", "--config-file", "F"]),
    ("image-inspect-authfile", ["image", "inspect", "--authfile", "F", "docker://127.0.0.1:1/x:y"]),
    ("image-pull-policy", ["image", "pull", "--policy", "F", "docker://127.0.0.1:1/x:y", "BUNDLE"]),
    ("attestation-verify", ["attestation", "verify", "--tee", "sample", "F"]),
    ("initdata-digest", ["initdata", "digest", "F"]),
    ("initdata-decode", ["initdata", "decode", "F"]),
    ("verity-root-hash-file", ["verity", "verify", "--root-hash-file", "F", "POD", "POD"]),
]  # fmt: skip


@pytest.fixture
def scene(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[list[str], Path], list[str]]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "req.json").write_text("{}")
    (tmp_path / "pod.yaml").write_text(POD)
    names = {
        "REQ": str(tmp_path / "req.json"),
        "PD": str(VECTORS / "pod-one-container.policy_data.json"),
        "POD": str(tmp_path / "pod.yaml"),
        "BUNDLE": str(tmp_path / "bundle"),
    }

    def argv(template: list[str], garbage: Path) -> list[str]:
        return [str(garbage) if a == "F" else names.get(a, a) for a in template]

    return argv


def _one_line_naming(stderr: str, path: Path) -> None:
    assert stderr.count("\n") == 1 and stderr.startswith("coco: error: "), stderr
    assert str(path) in stderr, stderr
    for bad in ("codec can't decode", "internal error", "Traceback", "Errno", "\ufffd"):
        assert bad not in stderr, stderr


@pytest.mark.parametrize(("kind", "data"), [("binary", BINARY), ("deep", DEEP)])
@pytest.mark.parametrize(("name", "template"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_garbage_file_is_one_line_naming_it(
    scene: Callable[[list[str], Path], list[str]],
    tmp_path: Path,
    name: str,
    template: list[str],
    kind: str,
    data: bytes,
) -> None:
    garbage = tmp_path / f"garbage.{kind}"
    garbage.write_bytes(data)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = invoke(scene(template, garbage))
    assert res.exit_code == 1, res.output
    _one_line_naming(res.stderr, garbage)
    assert res.stdout == ""
    assert garbage.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no bundle, no output file


def _coco(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # a subprocess with a deadline: today's code walks these graphs forever
    return subprocess.run(
        [sys.executable, "-m", "coco.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [("a: &a [*a]\n", "an alias inside its own anchor"), (laughs(9), "(an alias bomb?)")],
    ids=["self-alias", "billion-laughs"],
)
def test_yaml_graphs_are_refused_by_every_yaml_reader(
    tmp_path: Path, text: str, needle: str
) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(text)
    (tmp_path / "req.json").write_text("{}")
    (tmp_path / "pod.yaml").write_text(POD)
    regd = tmp_path / "registries.d"
    regd.mkdir()
    (regd / "bomb.yaml").write_text(text)
    (tmp_path / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    runs = {
        str(bomb): [
            ("policy", "evaluate", "--policy", str(bomb), "ExecProcessRequest", "req.json"),
            ("policy", "generate", str(bomb), "-o", "-"),
            ("policy", "generate", "pod.yaml", "-o", "-", "--config-file", str(bomb)),
        ],
        str(regd / "bomb.yaml"): [
            ("image", "pull", "--policy", "policy.json", "--registries.d", str(regd),
             "docker://127.0.0.1:1/x:y", "bundle"),
        ],
    }  # fmt: skip
    for named, commands in runs.items():
        for args in commands:
            p = _coco(*args, cwd=tmp_path)
            assert p.returncode == 1, (args, p.stderr)
            assert p.stderr.count("\n") == 1 and named in p.stderr and needle in p.stderr, p.stderr
    assert not (tmp_path / "bundle").exists()
    assert (tmp_path / "pod.yaml").read_text() == POD


def test_verity_format_leaves_nothing_when_the_root_hash_file_cannot_be_written(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data.img"
    data.write_bytes(bytes(range(256)) * 64)
    res = invoke(["verity", "format", str(data), str(tmp_path / "hash.img"),
                  "--root-hash-file", str(tmp_path / "nodir" / "root")])  # fmt: skip
    assert res.exit_code == 1
    assert res.stderr == (
        f"coco: error: --root-hash-file {tmp_path}/nodir/root: cannot write it: "
        "No such file or directory\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.img"]
    res = invoke(["verity", "format", str(data), str(tmp_path / "hash.img"),
                  "--root-hash-file", str(tmp_path / "root")])  # fmt: skip
    assert res.exit_code == 0, res.output
    root = (tmp_path / "root").read_text()
    assert f"Root hash:      \t{root}\n" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.img", "hash.img", "root"]
    res = invoke(["verity", "verify", str(data), str(tmp_path / "hash.img"),
                  "--root-hash-file", str(tmp_path / "root")])  # fmt: skip
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("member", ["index.json", "oci-layout"])
def test_deep_json_in_an_oci_layout_is_one_line(tmp_path: Path, member: str) -> None:
    lay = tmp_path / "lay"
    lay.mkdir()
    (lay / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (lay / "index.json").write_text('{"schemaVersion": 2, "manifests": []}')
    (lay / member).write_bytes(DEEP)
    for args in (["image", "inspect"], ["image", "pull", "--store", str(tmp_path / "store")]):
        res = invoke([*args, f"oci:{lay}:t", *([str(tmp_path / "b")] if "pull" in args else [])])
        assert res.exit_code == 1, res.output
        assert res.stderr.startswith(f"coco: error: oci:{lay}: ") and res.stderr.count("\n") == 1
        assert "internal error" not in res.stderr
    assert not (tmp_path / "b").exists()
