"""``coco completion bash|zsh|fish``: shell completion for every group, command and option.

The script a shell sources asks ``coco completion --complete -- WORDS...`` for the candidates of
the next word, so it follows the commands as they are, never a stale list. The answer is walked
from the same tables the CLI dispatches on: the groups of :mod:`coco.cli.main`, each group
module's ``COMMANDS`` (or ``_COMMANDS``; a nested group's ``_<NAME>_COMMANDS``) and the options
its builders add. One candidate per line; ``__files__`` asks the shell for file names.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from coco.cli._args import Commands, Parser, command_parser

DESCRIPTION = "Shell completion: print the script for bash, zsh or fish."
FILES = "__files__"
_TOP_OPTIONS = ["--help", "--version", "--debug", "--verbose", "-v"]

_BASH = """# coco completion for bash: eval "$(coco completion bash)"
_coco_complete() {
    local cur="${COMP_WORDS[COMP_CWORD]}" IFS=$'\\n' out
    out=$(coco completion --complete -- "${COMP_WORDS[@]:1:COMP_CWORD-1}" 2>/dev/null)
    if [[ "$out" == __files__ ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$out" -- "$cur"))
    fi
}
complete -o filenames -F _coco_complete coco
"""
_ZSH = """# coco completion for zsh: eval "$(coco completion zsh)"
autoload -U +X compinit && compinit
autoload -U +X bashcompinit && bashcompinit
""" + _BASH.split("\n", 1)[1]
_FISH = """# coco completion for fish: coco completion fish | source
function __coco_complete
    set -l words (commandline -opc)
    set -e words[1]
    set -l out (coco completion --complete -- $words 2>/dev/null)
    if test "$out" = __files__
        __fish_complete_path (commandline -ct)
    else
        printf '%s\\n' $out
    end
end
complete -c coco -f -a '(__coco_complete)'
"""
SCRIPTS = {"bash": _BASH, "zsh": _ZSH, "fish": _FISH}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    if argv[:1] == ["--complete"]:
        words = argv[1:]
        if words[:1] == ["--"]:
            words = words[1:]
        return complete, {"words": words}
    group.add_argument("shell", choices=sorted(SCRIPTS), metavar="{bash,zsh,fish}")
    group.epilog = (
        'bash: eval "$(coco completion bash)" in ~/.bashrc; zsh: the same in ~/.zshrc; '
        "fish: coco completion fish > ~/.config/fish/completions/coco.fish"
    )
    opts = group.parse_args(argv)
    return script, {"shell": opts.shell}


def script(shell: str) -> None:
    sys.stdout.write(SCRIPTS[shell])


def complete(words: list[str]) -> None:
    sys.stdout.write("".join(c + "\n" for c in candidates(words)))


def candidates(words: list[str]) -> list[str]:
    """What may follow ``words`` (the command line after ``coco``, the current word left out)."""
    from coco.cli.main import _GROUPS

    rest = [w for w in words if w not in ("--debug", "--verbose", "-v")]
    if not rest:
        return [*sorted(_GROUPS), *_TOP_OPTIONS]
    name, rest = rest[0], rest[1:]
    if name not in _GROUPS:
        return []
    module = importlib.import_module(_GROUPS[name][0])
    if name == "completion":
        return sorted(SCRIPTS)
    table = _table(module, "COMMANDS") or _table(module, "_COMMANDS")
    prog = f"coco {name}"
    group = Parser(prog, "")
    _group_options(module, group)
    while table is not None:
        words_left = _skip_options(group, rest)
        if not words_left:
            return _options_or_value(group, rest) or [*table, *_option_strings(group)]
        cmd, rest = words_left[0], words_left[1:]
        if cmd not in table:
            return []
        nested = _table(module, f"_{cmd.upper().replace('-', '_')}_COMMANDS")
        if table[cmd][1] is None and nested is not None:
            table, group = nested, Parser(f"{prog} {cmd}", "")
            continue
        parser = command_parser(group, cmd, table)
        return _options_or_value(parser, rest) or _option_strings(parser)
    return []


def _table(module: Any, name: str) -> Commands | None:
    value = getattr(module, name, None)
    return value if isinstance(value, dict) else None


def _group_options(module: Any, group: Parser) -> None:
    """The group's own options (``kbs-client --url``): its build() adds them before dispatching."""
    import contextlib
    import io

    quiet = (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()))
    # build() ends in --help's exit, by when it has added the group's options
    with quiet[0], quiet[1], contextlib.suppress(BaseException):
        module.build(group, ["--help"])


def _skip_options(parser: Parser, words: list[str]) -> list[str]:
    """``words`` from the first one that is not an option (or an option's value) on."""
    i = 0
    while i < len(words) and words[i].startswith("-"):
        action = parser._option_string_actions.get(words[i])
        i += 2 if action is not None and action.nargs is None else 1
    return words[i:]


def _options_or_value(parser: Parser, words: list[str]) -> list[str]:
    """The values the last option takes, when ``words`` ends in one that takes a value."""
    if not words:
        return []
    action = parser._option_string_actions.get(words[-1])
    if action is None or action.nargs == 0:
        return []
    if action.choices:
        return [str(c) for c in action.choices]
    return [FILES]


def _option_strings(parser: Parser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
