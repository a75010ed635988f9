"""Entry point of the ``coco`` command.

Exit codes: 0 success, 1 a :class:`~coco.errors.CocoError` (one line on stderr, the traceback only
with ``--debug``), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback

import click

from coco import __version__
from coco.errors import CocoError

_state = {"debug": False}

# httpx imports its own command line (click, rich, pygments: ~80 ms) unless that import fails. The
# `coco` process never uses it, and every registry or KBS command pays for it at start-up, so the
# CLI marks it absent before anything imports httpx (httpx then installs a stub `main`).
sys.modules.setdefault("httpx._main", None)  # type: ignore[assignment]


# `coco <name>` -> "module:attribute"; a group's module is imported only when it is used, so
# `coco verity ...` does not pay for the OCI client or the KBS server at start-up.
_GROUPS: dict[str, str] = {
    "image": "coco.cli.image:image",
    "verity": "coco.cli.verity:verity_group",
    "tardev": "coco.cli.tardev:tardev_group",
    "initdata": "coco.cli.initdata:initdata_group",
    "kbs": "coco.cli.kbs:kbs",
    "kbs-client": "coco.cli.kbs_client:kbs_client",
    "attestation": "coco.cli.attestation:attestation",
    "policy": "coco.cli.policy:policy",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_GROUPS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _GROUPS and name not in self.commands:
            module, _, attr = _GROUPS[name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name="coco")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Log what is being done.")
def cli(debug: bool, verbose: bool) -> None:
    """Confidential Containers: images, encryption, attestation and integrity."""
    _state["debug"] = debug or _state["debug"]
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="coco: %(levelname)s: %(message)s")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    _state["debug"] = "--debug" in args or os.environ.get("COCO_DEBUG") == "1"
    try:
        cli.main(args=args, prog_name="coco", standalone_mode=False)
    except click.exceptions.UsageError as e:
        e.show()
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("coco: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("coco: interrupted", err=True)
        sys.exit(130)
    except CocoError as e:
        if _state["debug"]:
            traceback.print_exc()
        click.echo(f"coco: error: {_one_line(str(e))}", err=True)
        sys.exit(1)
    except (OSError, ValueError) as e:
        if _state["debug"]:
            traceback.print_exc()
        click.echo(f"coco: error: {_one_line(str(e))}", err=True)
        sys.exit(1)
    except Exception as e:  # a bug: still one line unless --debug
        if _state["debug"]:
            traceback.print_exc()
        click.echo(
            f"coco: internal error: {type(e).__name__}: {_one_line(str(e))} "
            "(run with --debug for the traceback)",
            err=True,
        )
        sys.exit(1)


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


if __name__ == "__main__":
    main()
