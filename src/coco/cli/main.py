"""Entry point of the ``coco`` command.

Exit codes: 0 success, 1 a :class:`~coco.errors.CocoError` (one line on stderr, the traceback only
with ``--debug``), 2 a usage error, 130 interrupted.

Start-up is kept small: argparse (not click), a group's module is imported only when the group is
used, and :mod:`logging` only when something logs or ``-v``/``--debug`` asks for it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from coco import __version__
from coco.cli._args import Parser, dispatch
from coco.errors import CocoError, UsageError

TYPE_CHECKING = False  # typing is not loaded at run time: start-up stays small
if TYPE_CHECKING:
    from typing import Any

_state: dict[str, Any] = {"debug": False, "prog": "coco"}

# httpx imports its own command line (click, rich, pygments: ~80 ms) unless that import fails. The
# `coco` process never uses it, and every registry or KBS command pays for it at start-up, so the
# CLI marks it absent before anything imports httpx (httpx then installs a stub `main`).
sys.modules.setdefault("httpx._main", None)  # type: ignore[assignment]

# `coco <name>` -> (module, one-line help). The module's `build(parser, argv)` parses the rest of
# the command line and returns the function to run; `coco --help` lists this table without
# importing any of the modules.
_GROUPS: dict[str, tuple[str, str]] = {
    "agent": ("coco.cli.agent", "The Kata agent: the guest's agent API, held to the policy."),
    "aa": ("coco.cli.aa", "The Attestation Agent: evidence, KBS tokens, TPM AK, ttRPC service."),
    "api-server": ("coco.cli.api_server", "The guest's REST API over the AA and the Data Hub."),
    "attestation": ("coco.cli.attestation", "Attestation Service tools."),
    "completion": (
        "coco.cli.completion",
        "Shell completion: print the script for bash, zsh or fish.",
    ),
    "cdh": ("coco.cli.cdh", "The Confidential Data Hub: resources, secrets, pulls in the guest."),
    "cloud-api-adaptor": (
        "coco.cli.cloud_api_adaptor",
        "The peer-pods cloud-api-adaptor: pod VMs through a cloud provider.",
    ),
    "demo": ("coco.cli.demo", "Live the whole life of a confidential pod here, step by step."),
    "forwarder": (
        "coco.cli.forwarder",
        "The agent-protocol-forwarder in a peer-pod VM: TLS 15150 to the kata agent.",
    ),
    "image": ("coco.cli.image", "Copy, inspect and pull OCI images."),
    "initdata": (
        "coco.cli.initdata",
        "Initdata documents: the TOML whose digest the TEE measures.",
    ),
    "kbs": ("coco.cli.kbs", "The Key Broker Service (owner side)."),
    "keyprovider": ("coco.cli.keyprovider", "The attestation-agent key provider (gRPC)."),
    "kbs-client": (
        "coco.cli.kbs_client",
        "Talk to a KBS: configure it, or attest and fetch a resource.",
    ),
    "pod": ("coco.cli.pod", "Run a Kubernetes pod through a CRI runtime, as the kubelet would."),
    "peerpods": (
        "coco.cli.peerpods",
        "Peer pods in the cluster: the mutating webhook and the cleanup controller.",
    ),
    "podvm": ("coco.cli.podvm", "The pod VM: build its image, boot it under QEMU with a vTPM."),
    "policy": (
        "coco.cli.policy",
        "Agent policies: generate them from pod YAML, evaluate agent requests against them.",
    ),
    "runtime": ("coco.cli.runtime", "Install coco's runtime handlers into containerd's config."),
    "snapshotter": (
        "coco.cli.snapshotter",
        "containerd's snapshotter that leaves guest pulls to the guest.",
    ),
    "process-user-data": (
        "coco.cli.userdata",
        "Peer-pod VM: write the userdata's files after checking its initdata.",
    ),
    "tardev": (
        "coco.cli.tardev",
        "tardev layer files: the tarfs index and dm-verity tree the guest mounts.",
    ),
    "verity": ("coco.cli.verity", "dm-verity hash trees, compatible with veritysetup."),
}

_LOG_FORMAT = "coco: %(levelname)s: %(message)s"


def _parser() -> Parser:
    p = Parser("coco", "Confidential Containers: images, encryption, attestation and integrity.")
    p.add_argument("--version", action=_Version, help="Show the version and exit.")
    p.add_argument("--debug", action="store_true", help="Show tracebacks and debug logs.")
    p.add_argument("-v", "--verbose", action="store_true", help="Log what is being done.")
    return p


class _Version(argparse.Action):
    """``--version``: print ``coco, version X`` (no help formatter, so no textwrap) and exit 0."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        sys.stdout.write(f"coco, version {__version__}\n")
        parser.exit(0)


def _run(argv: list[str]) -> None:
    top = _parser()
    commands = {name: (text, _no_builder) for name, (_, text) in _GROUPS.items()}
    opts, name, rest = dispatch(top, argv, commands)
    _state["debug"] = opts.debug or _state["debug"]
    level = 10 if opts.debug else 20 if opts.verbose else 30  # DEBUG, INFO, WARNING
    _setup_logging(level)
    _state["prog"] = f"coco {name}"
    module = importlib.import_module(_GROUPS[name][0])
    group = Parser(f"coco {name}", module.DESCRIPTION)
    func, kwargs = module.build(group, rest)
    _state["prog"] = kwargs.pop("_prog", _state["prog"])
    func(**kwargs)


def _no_builder(parser: Parser) -> None:  # the groups are built by their modules' build()
    raise AssertionError("unreachable")


def _setup_logging(level: int) -> None:
    """Configure logging now if it is loaded or wanted, else when something first imports it."""
    if "logging" in sys.modules or level < 30:
        import logging

        logging.basicConfig(level=level, format=_LOG_FORMAT)
        return
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _LoggingOnImport)]
    sys.meta_path.insert(0, _LoggingOnImport(level))  # type: ignore[arg-type]
    import coco.log  # until then, coco.log's loggers print warnings as the format above does

    coco.log.write_directly(level, _write_record)


def _write_record(level_name: str, message: str) -> None:
    sys.stderr.write(f"coco: {level_name}: {message}\n")


class _LoggingOnImport:
    """Meta-path hook: the first ``import logging`` (by whichever module logs) gets coco's format,
    so a process that never logs does not import logging at all."""

    def __init__(self, level: int) -> None:
        self.level = level

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "logging":
            return None
        sys.meta_path.remove(self)  # type: ignore[arg-type]
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, level = spec.loader, self.level
        real = loader.exec_module

        def exec_module(module: Any) -> None:
            real(module)
            module.basicConfig(level=level, format=_LOG_FORMAT)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    _state["debug"] = "--debug" in args or os.environ.get("COCO_DEBUG") == "1"
    _state["prog"] = "coco"
    try:
        _run(args)
    except UsageError as e:
        if e.status == 2:  # the command line itself: argparse's form and code
            _error(f"{_state['prog']}: error: {_one_line(str(e))}", 2)
        _error(f"coco: error: {_one_line(str(e))}", e.status, e)
    except KeyboardInterrupt:
        _error("coco: interrupted", 130)
    except (CocoError, OSError, ValueError) as e:
        _error(f"coco: error: {_one_line(str(e))}", 1, e)
    except Exception as e:  # a bug: still one line unless --debug
        _error(
            f"coco: internal error: {type(e).__name__}: {_one_line(str(e))} "
            "(run with --debug for the traceback)",
            1,
            e,
        )


def entry() -> None:
    """The ``coco`` program (console script and ``python -m coco.cli.main``): :func:`main`, then
    a quick exit. Code that calls :func:`main` itself (the tests) gets it back."""
    main()
    _leave()


def _leave() -> None:
    """Exit 0 without tearing the interpreter down, when nothing else runs.

    Python's own exit frees every module and object and lets OpenSSL clean up after itself:
    10-25 ms for a command that loaded the registry or crypto stack (a warm ``image pull`` takes
    about 60 ms in all). Once the command has returned, no other thread runs and the atexit
    handlers have run (logging flushes there), none of that is needed. With threads left, the
    normal exit waits for them as it must.
    """
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return
    import atexit

    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return  # let the normal exit report it
    os._exit(0)


def _error(line: str, code: int, exc: BaseException | None = None) -> None:
    if exc is not None and _state["debug"]:
        import traceback

        traceback.print_exception(exc)
    sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.exit(code)


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


if __name__ == "__main__":
    entry()
