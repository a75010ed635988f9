"""Loggers that load :mod:`logging` only when a record has to go through it.

Importing :mod:`logging` costs about 5 ms here (it brings traceback, linecache, tokenize, string),
a tenth of a warm ``coco image pull``, which has one thing to say (the policy's warning) or none.
:func:`get` gives a stand-in with the usual methods. While :mod:`logging` is not loaded and the
``coco`` program has installed a direct writer for its default level (:func:`write_directly`),
a record at or above that level is handed to the writer, which prints it as the program's logging
would (``coco: WARNING: message``); below it, nothing happens. In every other case (a library
user, ``-v``/``--debug``, logging loaded by anything, ``exc_info`` and the like) the record goes to
``logging.getLogger(name)`` as if the module had called it, and the usual configuration applies.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["Logger", "get", "write_directly"]

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR", CRITICAL: "CRITICAL"}
_direct: tuple[int, Callable[[str, str], None]] | None = None


def write_directly(level: int, emit: Callable[[str, str], None] | None) -> None:
    """(The program's start-up.) Until :mod:`logging` is loaded, records of ``level`` and above
    go to ``emit(level_name, message)`` and lower ones nowhere; None undoes it."""
    global _direct
    _direct = None if emit is None else (level, emit)


class Logger:
    """What a module logs through: the methods of :class:`logging.Logger` it uses."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        direct = _direct
        if direct is not None and not kwargs and "logging" not in sys.modules:
            if level >= direct[0]:
                direct[1](_NAMES.get(level, f"Level {level}"), msg % args if args else msg)
            return
        import logging

        logging.getLogger(self.name).log(level, msg, *args, **kwargs)

    def isEnabledFor(self, level: int) -> bool:
        direct = _direct
        if direct is not None and "logging" not in sys.modules:
            return level >= direct[0]
        import logging

        return logging.getLogger(self.name).isEnabledFor(level)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(DEBUG, msg, *args, **kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(INFO, msg, *args, **kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(WARNING, msg, *args, **kwargs)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(ERROR, msg, *args, **kwargs)

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        self.log(ERROR, msg, *args, **kwargs)


def get(name: str) -> Logger:
    """The logger of module ``name`` (use as ``log = coco.log.get(__name__)``)."""
    return Logger(name)
