"""The `coco` entry point: version, help, exit codes, one-line errors, lazy command groups."""

import subprocess
import sys

import pytest

from coco import __version__
from coco.cli import main as cli_main


def coco(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coco.cli.main", *args], capture_output=True, text=True
    )


def test_version_matches_package() -> None:
    out = coco("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"coco, version {__version__}"


def test_help_lists_every_group() -> None:
    out = coco("--help")
    assert out.returncode == 0
    for name in cli_main._GROUPS:
        assert f"  {name} " in out.stdout


@pytest.mark.parametrize("name", sorted(cli_main._GROUPS))
def test_every_group_loads_and_has_help(name: str) -> None:
    out = coco(name, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage: coco " + name in out.stdout


def test_unknown_command_is_a_usage_error() -> None:
    out = coco("no-such-group")
    assert out.returncode == 2
    assert "No such command" in out.stderr


def test_error_is_one_line_without_traceback(tmp_path) -> None:
    out = coco("image", "inspect", f"oci:{tmp_path}/nothing:tag")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"coco: error: oci:{tmp_path}/nothing: not an OCI layout (no oci-layout file)"
    ]


def test_debug_shows_the_traceback(tmp_path) -> None:
    out = coco("--debug", "image", "inspect", f"oci:{tmp_path}/nothing:tag")
    assert out.returncode == 1
    assert "Traceback" in out.stderr


def test_a_group_is_imported_only_when_used() -> None:
    code = (
        "import sys; import coco.cli.main; "
        "assert 'coco.oci.registry' not in sys.modules; "
        "assert 'coco.trustee' not in sys.modules; print('lazy')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy"


def test_quick_exit_keeps_output_and_atexit_work(tmp_path) -> None:
    """After a command returns, the program leaves with os._exit: what it wrote to a pipe (still
    in stdout's buffer) arrives whole, atexit handlers run, and nothing after entry() runs."""
    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, sys, pathlib\n"
        f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
        "from coco.cli.main import entry\n"
        "sys.argv = ['coco', 'completion', 'bash']\n"
        "entry()\n"
        "raise SystemExit(3)  # entry() returned: no quick exit\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert out.returncode == 0, out.stderr
    assert marker.read_text() == "yes"
    normal = coco("completion", "bash")
    assert out.stdout == normal.stdout.encode() and len(out.stdout) > 200


def test_main_called_in_process_returns() -> None:
    """Only entry() leaves early: main() called by code (the tests' CLI runner) comes back."""
    from tests.cli.run import invoke

    result = invoke(["image", "--help"])
    assert result.exit_code == 0
    assert "pull" in result.stdout
