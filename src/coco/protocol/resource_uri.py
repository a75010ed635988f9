"""Resource URIs: ``kbs:///<repository>/<type>/<tag>`` and ``kbs://<host>[:<port>]/<repository>/<type>/<tag>``.

One strict class, :class:`ResourceUri`, used wherever a guest names a KBS resource (the KBC, the
CDH, key ids of image layers, sealed secrets). Upstream's grammar is wider (``kbs+<plugin>://``,
queries, any number of segments); the ``resource`` plugin, the only one the guest uses, takes
exactly three segments, each ``[A-Za-z0-9_-][A-Za-z0-9_.-]*`` (the KBS's own path rule), so that is
what is accepted here and anything else is refused with a message that says what was expected.
The host part, when present, is kept for display only: the KBS URL always comes from the
configuration (as upstream's CDH does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from coco.errors import KbsError

SCHEME = "kbs://"
API_PREFIX = "/kbs/v0"
SEGMENT = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_\-.]*")  # one path segment (fullmatch)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ADDRESS = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::(?P<port>[0-9]*))?")
_FORM = "kbs:///<repository>/<type>/<tag> or kbs://<host>[:<port>]/<repository>/<type>/<tag>"


class ResourceUriError(KbsError):
    """A resource URI that is not of the accepted form."""


@dataclass(frozen=True, slots=True)
class ResourceUri:
    """A parsed resource URI; ``address`` is ``host[:port]`` or ``""``."""

    repository: str
    type: str
    tag: str
    address: str = ""

    @classmethod
    def parse(cls, text: str, where: str = "resource URI") -> ResourceUri:
        """Parse ``text``; raises :class:`ResourceUriError` naming ``where`` on anything else."""
        if not isinstance(text, str):
            raise ResourceUriError(f"{where}: expected {_FORM}, found {type(text).__name__}")
        if not text.startswith(SCHEME):
            scheme = text.split("://", 1)[0] + "://" if "://" in text else "no scheme"
            raise ResourceUriError(
                f"{where} {text!r}: expected {_FORM}, found {scheme!r} (only the kbs:// scheme "
                "and the resource plugin are supported)"
            )
        rest = text[len(SCHEME) :]
        if "?" in rest or "#" in rest:
            raise ResourceUriError(f"{where} {text!r}: expected {_FORM}, found a query or fragment")
        address, slash, path = rest.partition("/")
        if not slash:
            raise ResourceUriError(f"{where} {text!r}: expected {_FORM}, found no path")
        _check_address(address, text, where)
        return cls(*_segments(path, text, where), address)

    @classmethod
    def from_path(cls, path: str, where: str = "resource path") -> ResourceUri:
        """``<repository>/<type>/<tag>``, as in the KBS's HTTP path (a leading ``/`` is accepted;
        so is a whole ``kbs://`` URI)."""
        if isinstance(path, str) and path.startswith(SCHEME):
            return cls.parse(path, where)
        if not isinstance(path, str):
            raise ResourceUriError(
                f"{where}: expected <repository>/<type>/<tag>, found {type(path).__name__}"
            )
        return cls(*_segments(path.removeprefix("/"), path, where))

    @classmethod
    def of(cls, value: ResourceUri | str, where: str = "resource URI") -> ResourceUri:
        """``value`` itself if already parsed, else :meth:`parse`."""
        return value if isinstance(value, ResourceUri) else cls.parse(value, where)

    @property
    def resource_path(self) -> str:
        """``<repository>/<type>/<tag>``: the key of the resource in the KBS."""
        return f"{self.repository}/{self.type}/{self.tag}"

    @property
    def kbs_path(self) -> str:
        """The HTTP path of the resource on a KBS: ``/kbs/v0/resource/<repository>/<type>/<tag>``."""
        return f"{API_PREFIX}/resource/{self.resource_path}"

    def __str__(self) -> str:
        return f"{SCHEME}{self.address}/{self.resource_path}"


def _segments(path: str, text: str, where: str) -> tuple[str, str, str]:
    segments = path.split("/")
    if len(segments) != 3:
        raise ResourceUriError(
            f"{where} {text!r}: expected 3 path segments <repository>/<type>/<tag>, "
            f"found {len(segments)}"
        )
    for name, seg in zip(("repository", "type", "tag"), segments, strict=True):
        if not SEGMENT.fullmatch(seg):
            raise ResourceUriError(
                f"{where} {text!r}: {name} {seg!r}: expected letters, digits, '_', '-' and "
                "'.', not starting with '.'"
            )
    return segments[0], segments[1], segments[2]


def _check_address(address: str, text: str, where: str) -> None:
    if not address:
        return
    m = _ADDRESS.fullmatch(address)
    if m is None or not (m["host"].startswith("[") or _HOSTNAME.fullmatch(m["host"])):
        raise ResourceUriError(
            f"{where} {text!r}: KBS address {address!r}: expected a host name or IP address "
            "with an optional :port"
        )
    port = m["port"]
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ResourceUriError(
            f"{where} {text!r}: KBS address {address!r}: expected a port from 1 to 65535, "
            f"found {port!r}"
        )


__all__ = ["SEGMENT", "ResourceUri", "ResourceUriError"]
