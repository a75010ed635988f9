"""The accept-anything policy (what /etc/containers/policy.json holds on most machines) costs a
pull no signature machinery, and still gives the evaluator's verdict, warning and digest check."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from coco.errors import CocoError, PolicyRefusedError
from coco.image.pull import load_policy

ACCEPT = {"default": [{"type": "insecureAcceptAnything"}]}
MANIFEST = b'{"schemaVersion":2}'
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
SOURCE = SimpleNamespace(ref="docker://127.0.0.1:5000/a/b:t")


def test_accept_anything_loads_no_signature_code(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text(json.dumps(ACCEPT))
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from types import SimpleNamespace\n"
        "from coco.image.pull import load_policy\n"
        f"p = load_policy(Path({str(tmp_path / 'policy.json')!r}))\n"
        f"p.check(SimpleNamespace(ref='r'), {MANIFEST!r}, {DIGEST!r})\n"
        "print(sorted(m for m in sys.modules if m.startswith('coco.image.signature')))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_accept_anything_warns_and_checks_the_digest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "policy.json").write_text(json.dumps(ACCEPT, indent=2))
    policy = load_policy(tmp_path / "policy.json")
    with caplog.at_level(logging.WARNING):
        policy.check(SOURCE, MANIFEST, DIGEST)
    assert "policy default[0] (insecureAcceptAnything): accepting without any signature" in (
        caplog.text
    )
    with pytest.raises(PolicyRefusedError, match="manifest bytes do not hash to"):
        policy.check(SOURCE, MANIFEST + b" ", DIGEST)


@pytest.mark.parametrize(
    "doc",
    [
        {**ACCEPT, "transports": {"docker": {"": [{"type": "reject"}]}}},
        {"default": [{"type": "reject"}]},
    ],
)
def test_other_policies_are_evaluated(tmp_path: Path, doc: dict) -> None:
    (tmp_path / "policy.json").write_text(json.dumps(doc))
    policy = load_policy(tmp_path / "policy.json")
    with pytest.raises(PolicyRefusedError, match="rejects"):
        policy.check(SOURCE, MANIFEST, DIGEST)


def test_a_bad_policy_file_is_still_refused(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}],')
    with pytest.raises(CocoError, match=r"policy\.json"):
        load_policy(tmp_path / "policy.json")
