"""Initdata: the TOML document whose digest the TEE binds into its evidence, and its annotation.

The document (Confidential Containers initdata, version ``0.1.0``)::

    version = "0.1.0"
    algorithm = "sha384"          # sha256, sha384 or sha512
    [data]
    "aa.toml" = '''...'''         # file name -> file content, all strings
    "policy.rego" = '''...'''

Its digest is the named hash over the **exact bytes of the file**, as the kata runtime and agent
compute it (no canonicalisation). The digest is fitted to the evidence field by truncating or
zero-padding on the right: SNP ``HOST_DATA`` takes 32 bytes, TDX ``MRCONFIGID`` 48.

The pod annotation ``io.katacontainers.config.hypervisor.cc_init_data`` carries
``base64(gzip(TOML))`` (standard alphabet, padded). The runtime hands the document to the guest
as a small disk image: ``"initdata"``, the gzip length as ``u64`` little-endian, the gzip bytes,
zero padding to a multiple of 512.

Parsing is strict: unknown top-level keys, other versions or algorithms, non-string data values,
invalid UTF-8 or TOML are refused with the place and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import tomllib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from coco.crypto.digest import fit
from coco.errors import InitdataError

__all__ = [
    "ALGORITHMS",
    "ANNOTATION",
    "ANNOTATION_LEGACY",
    "HOST_DATA_SIZE",
    "MRCONFIGID_SIZE",
    "VERSION",
    "Initdata",
    "decode",
    "decode_image",
    "encode",
    "encode_image",
    "fit",
]

VERSION = "0.1.0"
ALGORITHMS: Mapping[str, int] = MappingProxyType({"sha256": 32, "sha384": 48, "sha512": 64})
HOST_DATA_SIZE = 32  # AMD SEV-SNP HOST_DATA
MRCONFIGID_SIZE = 48  # Intel TDX MRCONFIGID
ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"
ANNOTATION_LEGACY = "io.katacontainers.config.runtime.cc_init_data"
MAX_DECODED = 64 * 1024 * 1024  # a decoded document larger than this is refused
IMAGE_MAGIC = b"initdata"
IMAGE_SECTOR = 512
_KEYS = ("version", "algorithm", "data")


@dataclass(frozen=True, slots=True)
class Initdata:
    """A parsed initdata document; ``raw`` keeps the exact bytes the digest is taken over."""

    version: str
    algorithm: str
    data: Mapping[str, str]
    raw: bytes

    @classmethod
    def parse(cls, raw: bytes, where: str = "initdata") -> Initdata:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InitdataError(
                f"{where}: expected UTF-8 TOML, found an invalid byte at offset {e.start}"
            ) from None
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InitdataError(f"{where}: expected TOML: {e}") from None
        unknown = sorted(set(doc) - set(_KEYS))
        if unknown:
            raise InitdataError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}: expected only "
                f"{', '.join(_KEYS)}"
            )
        for key in _KEYS:
            if key not in doc:
                raise InitdataError(f"{where}: missing {key!r}")
        version, algorithm, data = doc["version"], doc["algorithm"], doc["data"]
        if version != VERSION:
            raise InitdataError(f"{where}: version: expected {VERSION!r}, found {version!r}")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise InitdataError(
                f"{where}: algorithm: expected one of {', '.join(ALGORITHMS)}, found {algorithm!r}"
            )
        if not isinstance(data, dict):
            raise InitdataError(f"{where}: data: expected a table, found {type(data).__name__}")
        for name, value in data.items():
            if not isinstance(value, str):
                raise InitdataError(
                    f"{where}: data.{name!r}: expected a string, found {type(value).__name__}"
                )
        return cls(version, algorithm, MappingProxyType(dict(data)), raw)

    def digest(self) -> bytes:
        return hashlib.new(self.algorithm, self.raw).digest()

    def host_data(self) -> bytes:
        """The digest fitted to SEV-SNP HOST_DATA (32 bytes)."""
        return fit(self.digest(), HOST_DATA_SIZE)

    def mrconfigid(self) -> bytes:
        """The digest fitted to TDX MRCONFIGID (48 bytes)."""
        return fit(self.digest(), MRCONFIGID_SIZE)


def encode(raw: bytes, where: str = "initdata") -> str:
    """The annotation value for the document ``raw`` (checked first): base64(gzip(raw))."""
    Initdata.parse(raw, where)
    return base64.b64encode(gzip.compress(raw, mtime=0)).decode("ascii")


def decode(value: str | bytes, where: str = "initdata annotation") -> Initdata:
    """Parse an annotation value back into a checked document."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise InitdataError(f"{where}: expected base64 text, found non-ASCII bytes") from None
    compact = "".join(value.split())
    try:
        packed = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InitdataError(
            f"{where}: expected standard base64, found {compact[:40]!r}: {e}"
        ) from None
    if not packed.startswith(b"\x1f\x8b"):
        raise InitdataError(f"{where}: expected gzip data inside the base64, found {packed[:4]!r}")
    return Initdata.parse(_gunzip(packed, where), f"{where} (decoded)")


def _gunzip(packed: bytes, where: str) -> bytes:
    out = bytearray()
    rest = packed
    try:
        while rest:
            d = zlib.decompressobj(wbits=31)
            chunk = d.decompress(rest, MAX_DECODED + 1 - len(out))
            out += chunk
            if len(out) > MAX_DECODED:
                raise InitdataError(f"{where}: decoded document exceeds {MAX_DECODED} bytes")
            if not d.eof:
                raise InitdataError(f"{where}: gzip data is truncated")
            rest = d.unused_data
            if rest and not rest.startswith(b"\x1f\x8b"):
                raise InitdataError(f"{where}: unexpected bytes after the gzip data")
    except zlib.error as e:
        raise InitdataError(f"{where}: gzip data is corrupt: {e}") from None
    return bytes(out)


def encode_image(raw: bytes, where: str = "initdata") -> bytes:
    """The block-device image the runtime attaches for the document ``raw`` (checked first)."""
    Initdata.parse(raw, where)
    packed = gzip.compress(raw, mtime=0)
    body = IMAGE_MAGIC + len(packed).to_bytes(8, "little") + packed
    return body + bytes(-len(body) % IMAGE_SECTOR)


def decode_image(image: bytes, where: str = "initdata image") -> Initdata:
    """Read a document back from a block-device image."""
    head = len(IMAGE_MAGIC) + 8
    if not image.startswith(IMAGE_MAGIC):
        raise InitdataError(f"{where}: expected the magic {IMAGE_MAGIC!r}, found {image[:8]!r}")
    if len(image) < head:
        raise InitdataError(f"{where}: truncated header: {len(image)} bytes")
    length = int.from_bytes(image[len(IMAGE_MAGIC) : head], "little")
    if length > len(image) - head:
        raise InitdataError(
            f"{where}: header says {length} bytes of gzip, the image holds {len(image) - head}"
        )
    if image[head + length :].strip(b"\0"):
        raise InitdataError(f"{where}: non-zero bytes after the gzip data")
    return Initdata.parse(_gunzip(image[head : head + length], where), f"{where} (decoded)")
