"""The shared argparse pieces of the `coco` command line (coco.cli._args) and the contract they keep:
boolean and size values, usage errors (exit 2, one line naming the option), no abbreviations,
repeatable options, and the lazy imports that keep start-up small."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coco.cli import _args
from coco.cli.main import _GROUPS
from tests.cli.run import invoke


def coco(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coco.cli.main", *args], capture_output=True, text=True, env=env
    )


def parsed(group: str, command: str, argv: list[str]) -> dict[str, Any]:
    """The keyword arguments `coco GROUP COMMAND ARGV...` would call its function with."""
    import importlib

    module = importlib.import_module(_GROUPS[group][0])
    parser = _args.Parser(f"coco {group}", module.DESCRIPTION)
    func, values = module.build(parser, [command, *argv])
    assert callable(func)
    return values


@pytest.mark.parametrize("text", ["true", "TRUE", "1", "yes", "Yes", "on", "t", "y"])
def test_boolean_true(text: str) -> None:
    assert _args.boolean(text) is True


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "NO", "off", "f", "n"])
def test_boolean_false(text: str) -> None:
    assert _args.boolean(text) is False


@pytest.mark.parametrize("text", ["maybe", "", "2", "truee"])
def test_boolean_refuses_other_words(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"expected true or false.*found {text!r}"):
        _args.boolean(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1048576", 1 << 20),
        ("512K", 512 << 10),
        ("100M", 100 << 20),
        ("2GiB", 2 << 30),
        ("2gb", 2 << 30),
        ("1.5G", 3 << 29),
        ("1T", 1 << 40),
        ("7", 7),
    ],
)
def test_size_values(text: str, value: int) -> None:
    assert _args.size(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "lots", "", "nan", "inf", "1X", "0.5"])
def test_size_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive size"):
        _args.size(text)


def test_int_range_bounds() -> None:
    jobs = _args.int_range(1, 64)
    assert (jobs("1"), jobs("64")) == (1, 64)
    with pytest.raises(argparse.ArgumentTypeError, match="from 1 to 64, found '65'"):
        jobs("65")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer, found 'x'"):
        jobs("x")
    with pytest.raises(argparse.ArgumentTypeError, match="of at least 0, found '-1'"):
        _args.int_range(0)("-1")


def test_path_checks_kind_and_existence(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    assert _args.path(dir_okay=False)(str(f)) == f
    assert _args.path(dir_okay=False)(str(tmp_path / "new")) == tmp_path / "new"
    assert _args.path(dir_okay=False, as_path=False)(str(f)) == str(f)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a file, found a directory"):
        _args.path(dir_okay=False)(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="expected a directory, found a file"):
        _args.path(file_okay=False)(str(f))
    with pytest.raises(argparse.ArgumentTypeError, match="expected an existing file, found none"):
        _args.path(exists=True, dir_okay=False)(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--tls-verify=false"], False),
        (["--tls-verify=FALSE"], False),
        (["--tls-verify", "no"], False),
        (["--tls-verify", "0"], False),
        (["--tls-verify=yes"], True),
        (["--tls-verify"], True),  # the bare flag means true
        ([], True),
    ],
)
def test_tls_verify_forms(argv: list[str], expected: bool) -> None:
    values = parsed("image", "pull", ["ref", "bundle", *argv])
    assert values["tls_verify"] is expected
    assert (values["ref"], values["bundle_dir"]) == ("ref", "bundle")  # pull_cmd makes the Path


def test_copy_tls_verify_and_plugin_options() -> None:
    values = parsed(
        "image",
        "copy",
        [
            *("--src-tls-verify=false", "--dest-tls-verify", "off", "--encrypt-layer", "-1"),
            *("--encryption-key", "jwe:a", "--encryption-key", "jwe:b", "oci:/a", "oci:/b"),
        ],
    )
    assert values["src_tls_verify"] is False and values["dest_tls_verify"] is False
    assert values["encryption_key"] == ["jwe:a", "jwe:b"]
    assert values["encrypt_layer"] == [-1]  # a negative number is a value, not an option
    assert values["sign_by"] is None and values["registries_d"] is None


def test_policy_src_tls_verify() -> None:
    values = parsed("policy", "generate", ["pod.yaml", "--src-tls-verify", "false"])
    assert values["src_tls_verify"] is False
    assert parsed("policy", "generate", ["pod.yaml"])["src_tls_verify"] is True


def test_repeatable_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COCO_IMAGE_SERVICE", raising=False)
    values = parsed(
        "image", "pull", ["--decryption-key", "a.pem", "--decryption-key", "b.pem:pw", "r", "d"]
    )
    assert values["decryption_key"] == ["a.pem", "b.pem:pw"]
    assert (values["jobs"], values["service"], values["quiet"]) == (3, None, False)
    monkeypatch.setenv("COCO_IMAGE_SERVICE", "/run/x.sock")
    assert parsed("image", "pull", ["r", "d"])["service"] == "/run/x.sock"
    assert parsed("image", "pull", ["-q", "--jobs", "64", "r", "d"])["jobs"] == 64


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["image", "pull", "--jobs", "0", "r", "d"], ["--jobs", "from 1 to 64", "'0'"]),
        (["image", "pull", "--max-layer-size", "lots", "r", "d"], ["--max-layer-size", "size"]),
        (["image", "pull", "--max-files", "0", "r", "d"], ["--max-files", "at least 1"]),
        (["image", "pull", "--tls-verify=maybe", "r", "d"], ["--tls-verify", "'maybe'"]),
        (["image", "pull", "--jo", "3", "r", "d"], ["unrecognized", "--jo"]),  # no abbreviations
        (["image", "pull", "r"], ["required", "BUNDLE_DIR"]),
        (["verity", "format", "--hash", "crc", "d"], ["--hash", "invalid choice", "'crc'"]),
        (["tardev", "inspect", "--format", "xml", "f"], ["--format", "'xml'"]),
        (["image", "inspect", "--raw", "--config", "oci:/x"], ["--raw and --config"]),
        (["image", "copy", "oci:/x", "ftp://h/x"], ["unsupported transport 'ftp'"]),
        (["kbs-client", "get-resource"], ["required", "--path"]),
        (["no-such-group"], ["No such command 'no-such-group'"]),
        (["image", "nope"], ["No such command 'nope'", "pull"]),
        (["--nope"], ["unrecognized", "--nope"]),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str], words: list[str]) -> None:
    res = invoke(argv)
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("coco"), res.stderr
    assert ": error: " in lines[0]
    for w in words:
        assert w in lines[0]


def test_path_errors_name_the_option(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    res = invoke(["image", "pull", "--store", str(f), "r", str(tmp_path / "b")])
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        f"coco image pull: error: argument --store: expected a directory, found a file at '{f}'"
    )
    res = invoke(["verity", "format", str(tmp_path)])
    assert res.exit_code == 2 and "argument DATA: expected a file, found a directory" in res.stderr
    res = invoke(["attestation", "verify", "--tee", "sample", str(tmp_path / "none")])
    assert res.exit_code == 2 and "expected an existing file, found none" in res.stderr
    assert not (tmp_path / "b").exists()


def test_group_without_command_prints_help_and_exits_2() -> None:
    res = invoke(["image"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.startswith("Usage: coco image [OPTIONS] COMMAND [ARGS]...")
    for name in ("copy", "inspect", "prune", "pull", "serve"):
        assert f"\n  {name} " in res.stderr


def test_command_help_shows_options_and_defaults() -> None:
    res = invoke(["image", "pull", "--help"])
    assert res.exit_code == 0 and res.stderr == ""
    assert res.stdout.startswith("Usage: coco image pull [OPTIONS] REF BUNDLE_DIR\n")
    for text in ("--tls-verify [=BOOL]", "--decryption-key KEY[:PASSWORD]", "-q, --quiet",
                 "--max-layer-size SIZE", "--max-files N", "[default: 3; 1<=x<=64]",
                 "-h, --help"):  # fmt: skip
        assert text in res.stdout
    res = invoke(["image", "copy", "-h"])
    assert res.exit_code == 0
    for text in ("--encryption-key PROTOCOL:KEY", "--sign-by FINGERPRINT", "--registries.d"):
        assert text in res.stdout  # the plug-ins' options


def test_version_and_global_options() -> None:
    res = invoke(["--version"])
    assert res.exit_code == 0 and res.stdout.startswith("coco, version ")
    res = invoke(["-v", "--debug", "image", "nope"])
    assert res.exit_code == 2 and "No such command 'nope'" in res.stderr


def _imported(argv: list[str], watch: list[str]) -> list[str]:
    code = (
        "import sys\n"
        "from coco.cli.main import main\n"
        "try:\n"
        "    main(sys.argv[2:])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "watch = sys.argv[1].split(',')\n"
        "found = sorted(m for m, v in sys.modules.items() if v is not None and "
        "any(m == w or m.startswith(w + '.') for w in watch))\n"
        "sys.stderr.write(','.join(found))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, ",".join(watch), *argv], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [m for m in out.stderr.split(",") if m]


def test_top_help_imports_no_group_module() -> None:
    groups = sorted({module for module, _ in _GROUPS.values()})
    found = _imported(["--help"], [*groups, "click", "logging"])
    assert found == []


def test_pull_help_stays_lean() -> None:
    watch = ["click", "coco.oci.copy", "coco.ocicrypt", "cryptography", "rich", "httpx",
             "coco.cli.image_crypt", "coco.cli.image_sign", "logging", "inspect", "uuid"]  # fmt: skip
    assert _imported(["image", "pull", "--help"], watch) == []
    # copy loads its plug-ins (and with them the crypto stack) only because copy is the command
    found = _imported(["image", "copy", "--help"], ["coco.cli.image_crypt", "coco.cli.image_sign"])
    assert found == ["coco.cli.image_crypt", "coco.cli.image_sign"]


def test_logging_is_configured_when_first_imported() -> None:
    code = (
        "from coco.cli import main as m\n"
        "import sys\n"
        "assert 'logging' not in sys.modules\n"
        "m._setup_logging(30)\n"
        "assert 'logging' not in sys.modules\n"
        "import logging\n"
        "logging.getLogger('coco.x').warning('careful')\n"
        "logging.getLogger('coco.x').info('quiet')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "coco: WARNING: careful\n"
