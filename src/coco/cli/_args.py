"""Shared pieces of the ``coco`` command line, on the standard library's :mod:`argparse`.

* :class:`Parser`: no abbreviations, ``-h/--help`` last, ``Usage:`` help, a one-line error (exit 2)
  that names the option and says what was expected.
* :func:`dispatch`: the lazy group dispatcher. A group lists its commands from a static table
  (name -> one-line help, builder); only the chosen command's builder runs, so a command does not
  pay for importing what another one needs.
* Value types that check while parsing (so a bad value is a usage error naming the option):
  :func:`boolean`, :func:`int_range`, :func:`integer`, :func:`size`, :func:`path`.
* Option builders shared by the image commands: :func:`add_tls_verify`, :func:`add_authfile`.
* :func:`Usage`: the :class:`~coco.errors.UsageError` a command raises when it finds a usage
  error after parsing (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from coco.errors import UsageError

TYPE_CHECKING = False  # typing and pathlib stay unloaded: `pull --service` does not need them
if TYPE_CHECKING:
    from typing import Any, NoReturn

# A command: (one-line help for the group's list, builder that adds its arguments and sets `func`).
Builder = Callable[["Parser"], None]
Commands = dict[str, tuple[str, Builder]]


def Usage(message: str) -> UsageError:
    """A usage error found by a command after parsing: ``coco`` prints it on one line, exits 2."""
    return UsageError(message, status=2)


class _Formatter(argparse.HelpFormatter):
    """``Usage:``, paragraphs of descriptions kept apart, ``-o, --output FILE`` (metavar once)."""

    def __init__(self, prog: str) -> None:
        width = min(100, _columns()) - 2
        super().__init__(prog, max_help_position=34, width=width)

    def add_usage(self, usage: Any, actions: Any, groups: Any, prefix: str | None = None) -> None:
        super().add_usage(usage, actions, groups, "Usage: " if prefix is None else prefix)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
        return "\n\n".join(
            textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent)
            for p in paragraphs
        )

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {value}"

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.option_strings and action.nargs == "?" and action.const is True:
            return str(action.metavar)  # --tls-verify [=BOOL]: the value is optional
        return super()._format_args(action, default_metavar)


def _columns() -> int:
    try:
        return int(os.environ.get("COLUMNS", "")) or 100
    except ValueError:
        return 100


class Parser(argparse.ArgumentParser):
    """An argparse parser with coco's conventions (see the module docstring)."""

    def __init__(self, prog: str, description: str | None = None, **kwargs: Any) -> None:
        super().__init__(
            prog=prog,
            description=description,
            formatter_class=_Formatter,
            allow_abbrev=False,
            add_help=False,
            **kwargs,
        )
        self._positionals.title = "Arguments"
        self._optionals.title = "Options"
        self.commands: dict[str, str] = {}  # shown under "Commands:" by a group's help
        self._help_added = False

    def add_help_option(self) -> None:
        if not self._help_added:
            self._help_added = True
            self.add_argument("-h", "--help", action="help", help="Show this message and exit.")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self.add_help_option()
        return super().parse_args(args, namespace)

    def format_help(self) -> str:
        self.add_help_option()
        text = super().format_help()
        if self.commands:
            width = max(len(n) for n in self.commands) + 2
            rows = "".join(f"  {n:<{width}}{h}\n" for n, h in self.commands.items())
            text += f"\nCommands:\n{rows}"
        return text

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())}\n")
        sys.exit(2)


def dispatch(parser: Parser, argv: list[str], commands: Commands) -> tuple[Any, str, list[str]]:
    """Parse the group's own options (those before the command name) with ``parser``; return them,
    the command name and the arguments after it. No command: the help on stderr, exit 2."""
    parser.commands = {name: text for name, (text, _) in commands.items()}
    if parser.usage is None:
        parser.usage = f"{parser.prog} [OPTIONS] COMMAND [ARGS]..."
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        if argv[i] == "--":
            break
        action = parser._option_string_actions.get(argv[i])
        i += 2 if action is not None and action.nargs is None else 1
    own = parser.parse_args(argv[:i])
    rest = argv[i:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not rest:
        sys.stderr.write(parser.format_help())
        sys.exit(2)
    name = rest[0]
    if name not in commands:
        parser.error(f"No such command {name!r} (expected one of: {', '.join(commands)})")
    return own, name, rest[1:]


def command_parser(group: Parser, name: str, commands: Commands) -> Parser:
    """The parser of ``group``'s command ``name``, built by its builder."""
    sub = Parser(f"{group.prog} {name}")
    commands[name][1](sub)
    if sub.usage is None:  # click's short form: coco image pull [OPTIONS] REF BUNDLE_DIR
        fmt = sub._get_formatter()
        args = [fmt._format_args(a, a.dest.upper()) for a in sub._get_positional_actions()]
        sub.usage = " ".join([sub.prog, "[OPTIONS]", *args])
    return sub


def parse_command(
    group: Parser, name: str, argv: list[str], commands: Commands
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Parse ``argv`` for ``group``'s command ``name``: return the command's ``func`` and its
    keyword arguments (plus ``_prog``, the command's name for usage errors)."""
    sub = command_parser(group, name, commands)
    values = vars(sub.parse_args(argv))
    func = values.pop("func")
    values["_prog"] = sub.prog
    return func, values


def run_group(
    group: Parser, argv: list[str], commands: Commands
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """A group without options of its own: dispatch ``argv`` to one of ``commands``."""
    _, name, rest = dispatch(group, argv, commands)
    return parse_command(group, name, rest, commands)


# --- value types ------------------------------------------------------------------------------

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def boolean(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off (any case)."""
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (1/0, yes/no), found {text!r}")


def integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, found {text!r}") from None


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer within [lo, hi] (either bound may be open)."""

    def convert(text: str) -> int:
        n = integer(text)
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            bounds = (
                f"from {lo} to {hi}"
                if lo is not None and hi is not None
                else f"of at least {lo}"
                if lo is not None
                else f"of at most {hi}"
            )
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, found {text!r}")
        return n

    convert.__name__ = "integer"
    return convert


def range_text(lo: int | None, hi: int | None) -> str:
    if hi is None:
        return f"x>={lo}"
    if lo is None:
        return f"x<={hi}"
    return f"{lo}<=x<={hi}"


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(text: str) -> int:
    """``1048576``, ``512K``, ``100M``, ``2GiB``, ``1.5G`` -> bytes (powers of 1024), at least 1."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        n = float(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        n = -1
    if not n >= 1 or n == float("inf"):  # also refuses NaN
        raise argparse.ArgumentTypeError(
            f"expected a positive size such as 1048576, 512K, 100M or 2G, found {text!r}"
        )
    return int(n)


def path(
    *, exists: bool = False, file_okay: bool = True, dir_okay: bool = True, as_path: bool = True
) -> Callable[[str], Any]:
    """A path, checked like a file or directory when it exists (or must exist)."""
    kind = "file" if not dir_okay else "directory" if not file_okay else "path"

    def convert(text: str) -> Any:
        if not text:
            raise argparse.ArgumentTypeError(f"expected a {kind}, found an empty value")
        is_dir = os.path.isdir(text)
        present = is_dir or os.path.exists(text)
        if exists and not present:
            raise argparse.ArgumentTypeError(f"expected an existing {kind}, found none at {text!r}")
        if present and is_dir and not dir_okay:
            raise argparse.ArgumentTypeError(f"expected a file, found a directory at {text!r}")
        if present and not is_dir and not file_okay:
            raise argparse.ArgumentTypeError(f"expected a directory, found a file at {text!r}")
        if as_path:
            from pathlib import Path

            return Path(text)
        return text

    convert.__name__ = kind
    return convert


def path_metavar(*, file_okay: bool = True, dir_okay: bool = True) -> str:
    return "FILE" if not dir_okay else "DIRECTORY" if not file_okay else "PATH"


def shown(text: str, default: object) -> str:
    """``text`` followed by ``[default: X]`` (booleans as true/false)."""
    value = str(default).lower() if isinstance(default, bool) else default
    return f"{text}  [default: {value}]"


# --- option builders --------------------------------------------------------------------------


def add_tls_verify(parser: Parser, name: str, what: str) -> None:
    """``--NAME[=BOOL]`` (also ``--NAME BOOL``; the bare flag means true), default true."""
    parser.add_argument(
        name,
        type=boolean,
        nargs="?",
        const=True,
        default=True,
        metavar="[=BOOL]",
        help=shown(
            f"Require HTTPS and verify certificates for the {what + ' ' if what else ''}registry "
            "(false: skip verification, fall back to plain HTTP).",
            True,
        ),
    )


def add_authfile(parser: Parser, *, as_path: bool = True) -> None:
    parser.add_argument(
        "--authfile",
        type=path(dir_okay=False, as_path=as_path),
        metavar="FILE",
        help="auth.json with registry credentials (default: $REGISTRY_AUTH_FILE, "
        "$XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json).",
    )


def env_default(name: str) -> str | None:
    """The value of environment variable ``name`` (an empty value counts as unset)."""
    return os.environ.get(name) or None
