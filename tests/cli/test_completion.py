"""``coco completion``: the scripts, and the candidates they ask ``coco`` for, in a real bash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coco.cli.completion import FILES, candidates

BIN = str(Path(sys.executable).parent)


def test_candidates_follow_the_dispatch_tables() -> None:
    top = candidates([])
    assert {"kbs", "kbs-client", "image", "completion", "--help"} <= set(top)
    assert {"config", "attest", "get-resource", "admin-token", "--url"} <= set(
        candidates(["kbs-client"])
    )
    assert "set-resource-policy" in candidates(["kbs-client", "--url", "http://x", "config"])
    assert {"--allow-all", "--deny-all", "--affirming", "--default", "--policy-file"} <= set(
        candidates(["kbs-client", "config", "set-resource-policy"])
    )
    assert candidates(["kbs", "serve", "--log-format"]) == ["text", "json"]
    assert candidates(["kbs", "serve", "--config-file"]) == [FILES]
    assert "--config-file" in candidates(["kbs", "serve", "--listen", "127.0.0.1:1"])
    assert candidates(["completion"]) == ["bash", "fish", "zsh"]
    assert candidates(["no-such-group"]) == [] and candidates(["kbs", "nope"]) == []


def _bash(line: list[str]) -> list[str]:
    words = " ".join(f"'{w}'" for w in line)
    script = (
        'eval "$(coco completion bash)"\n'
        f"COMP_WORDS=({words}); COMP_CWORD={len(line) - 1}\n"
        '_coco_complete; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return [x for x in r.stdout.splitlines() if x]


def test_bash_completes_groups_commands_and_flags() -> None:
    assert _bash(["coco", "kbs-cl"]) == ["kbs-client"]
    assert _bash(["coco", "kbs-client", "config", "set-resource-p"]) == ["set-resource-policy"]
    assert sorted(_bash(["coco", "kbs-client", "config", "set-resource-policy", "--a"])) == [
        "--affirming", "--allow-all"]  # fmt: skip


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_scripts_are_printed(shell: str) -> None:
    r = subprocess.run([sys.executable, "-m", "coco.cli.main", "completion", shell],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "coco completion --complete" in r.stdout
    if shell == "bash":
        assert subprocess.run(["bash", "-n"], input=r.stdout, text=True).returncode == 0
    r = subprocess.run([sys.executable, "-m", "coco.cli.main", "completion", "tcsh"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "invalid choice" in r.stderr and r.stderr.count("\n") == 1
