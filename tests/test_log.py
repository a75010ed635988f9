"""coco.log: records go to the program's direct writer while logging is not loaded, and to
logging (with its configuration) otherwise."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import sys
import coco.log
log = coco.log.get("coco.test")
log.warning("before any writer %s", 0)  # no writer, logging not loaded: logging takes it
print("logging loaded:", "logging" in sys.modules)
"""

_DIRECT = """
import sys
import coco.log
coco.log.write_directly(30, lambda name, msg: sys.stdout.write(f"{name}|{msg}\\n"))
log = coco.log.get("coco.test")
log.info("hidden %s", 1)
log.warning("shown %s and %s", 2, "two")
log.error("error %d%%", 50)
print("enabled:", log.isEnabledFor(20), log.isEnabledFor(40))
print("logging loaded:", "logging" in sys.modules)
import logging
logging.basicConfig(level=10, format="L %(name)s %(levelname)s %(message)s", stream=sys.stdout)
log.info("now through logging %s", 3)
print("enabled:", log.isEnabledFor(20))
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_without_a_writer_logging_takes_the_record() -> None:
    out = _run(_SCRIPT)
    assert out.stdout.strip() == "logging loaded: True"
    assert "before any writer 0" in out.stderr  # logging's last-resort handler


def test_direct_writer_until_logging_loads() -> None:
    out = _run(_DIRECT)
    assert out.stdout.splitlines() == [
        "WARNING|shown 2 and two",
        "ERROR|error 50%",
        "enabled: False True",
        "logging loaded: False",
        "L coco.test INFO now through logging 3",
        "enabled: True",
    ]


def test_the_program_prints_warnings_as_its_logging_did() -> None:
    """`coco` installs the writer at its default level: a warning reads `coco: WARNING: ...`
    whether or not logging was loaded; -v loads logging (INFO shown)."""
    code = (
        "import sys, coco.log\n"
        "import coco.cli.main as m\n"
        "m._setup_logging(30)\n"
        "coco.log.get('coco.x').warning('careful: %s', 'this')\n"
        "coco.log.get('coco.x').info('not shown')\n"
        "print('logging' in sys.modules)\n"
    )
    out = _run(code)
    assert out.stderr == "coco: WARNING: careful: this\n"
    assert out.stdout.strip() == "False"
    verbose = _run(code.replace("_setup_logging(30)", "_setup_logging(20)"))
    assert verbose.stderr == "coco: WARNING: careful: this\ncoco: INFO: not shown\n"
    assert verbose.stdout.strip() == "True"
