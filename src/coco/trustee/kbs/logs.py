"""The KBS's logs: timestamped lines (or one JSON object per line) and an access line per request.

``coco kbs serve --log-format text|json`` calls :func:`configure`. Access lines come from the
logger ``coco.kbs.access`` (method, path, status, milliseconds) at INFO, shown by default.
"""

from __future__ import annotations

import json
import logging
import time

ACCESS = logging.getLogger("coco.kbs.access")
FORMATS = ("text", "json")
_ACCESS_FIELDS = ("method", "path", "status", "ms", "client")


def _utc(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z WARNING coco.kbs: message``."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` (+ access fields)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": _utc(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _ACCESS_FIELDS:
            if name in record.__dict__:
                doc[name] = record.__dict__[name]
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


def configure(fmt: str = "text") -> None:
    """Every handler of the root logger writes ``fmt``; the KBS's own INFO lines are shown."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    for handler in root.handlers:
        handler.setFormatter(formatter)
    kbs = logging.getLogger("coco.kbs")
    if kbs.getEffectiveLevel() > logging.INFO:
        kbs.setLevel(logging.INFO)


def access(method: str, path: str, status: int, ms: float, client: str) -> None:
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info(
            "%s %s %d %.1fms %s", method, path, status, ms, client,
            extra={"method": method, "path": path, "status": status, "ms": round(ms, 3),
                   "client": client},
        )  # fmt: skip
