"""``coco initdata``: digest, encode and decode initdata documents (TOML and pod annotation)."""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Commands, Parser, path, run_group, shown
from coco.errors import InitdataError
from coco.integrity import initdata

DESCRIPTION = "Initdata documents: the TOML whose digest the TEE measures."


def _read(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as e:
        raise InitdataError(f"{path}: cannot read it: {e.strerror}") from None


def _where(path: str) -> str:
    return "stdin" if path == "-" else path


def _build_digest(p: Parser) -> None:
    p.description = (
        "Print the digest of FILE and its HOST_DATA (32 bytes) and MRCONFIGID (48 bytes) forms."
        "\n\nText output is one `name value` pair a line: algorithm, digest, host_data (hex), "
        "host_data_base64 (as QEMU's host-data takes it), mrconfigid (hex)."
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--encoded", action="store_true", help="FILE holds the annotation value (base64 gzip)."
    )
    p.add_argument(
        "--format",
        dest="fmt",
        choices=["text", "json"],
        default="text",
        metavar="[text|json]",
        help=shown("Output format.", "text"),
    )
    p.set_defaults(func=digest_cmd)


def digest_cmd(file: str, encoded: bool, fmt: str) -> None:
    raw = _read(file)
    doc = (
        initdata.decode(raw, _where(file))
        if encoded
        else initdata.Initdata.parse(raw, _where(file))
    )
    host = doc.host_data()
    out = {
        "algorithm": doc.algorithm,
        "digest": doc.digest().hex(),
        "host_data": host.hex(),
        "host_data_base64": base64.b64encode(host).decode(),
        "mrconfigid": doc.mrconfigid().hex(),
    }
    if fmt == "json":
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k} {v}")


def _build_encode(p: Parser) -> None:
    p.description = (
        "Print the annotation value for FILE: base64(gzip(TOML)), after checking the document."
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--annotation",
        action="store_true",
        help=f"Print '{initdata.ANNOTATION}=<value>' instead of the value alone.",
    )
    p.add_argument(
        "--image",
        type=path(dir_okay=False),
        metavar="FILE",
        help="Also write the block-device image the runtime attaches to the guest.",
    )
    p.set_defaults(func=encode_cmd)


def encode_cmd(file: str, annotation: bool, image: Path | None) -> None:
    raw = _read(file)
    value = initdata.encode(raw, _where(file))
    if image is not None:
        _write(image, initdata.encode_image(raw, _where(file)))
    print(f"{initdata.ANNOTATION}={value}" if annotation else value)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InitdataError(f"{path}: cannot write it: {e.strerror}") from None


def _build_decode(p: Parser) -> None:
    p.description = (
        "Decode the annotation value in FILE ('-': stdin) back to the TOML, checking it.\n\n"
        "A leading 'io.katacontainers.config.{hypervisor,runtime}.cc_init_data=' is accepted, "
        "and so is an initdata block-device image."
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "-o",
        "--output",
        type=path(dir_okay=False),
        metavar="FILE",
        help="Write the TOML here instead of standard output.",
    )
    p.set_defaults(func=decode_cmd)


def decode_cmd(file: str, output: Path | None) -> None:
    raw = _read(file)
    if raw.startswith(initdata.IMAGE_MAGIC):
        doc = initdata.decode_image(raw, _where(file))
    else:
        if not raw.isascii():
            bad = next(i for i, b in enumerate(raw) if b > 0x7F)
            raise InitdataError(
                f"{_where(file)}: expected an annotation value (base64 text) or an initdata "
                f"image, found a byte 0x{raw[bad]:02x} that is not text at offset {bad} "
                "(binary file?)"
            )
        text = raw.decode("ascii").strip()
        for key in (initdata.ANNOTATION, initdata.ANNOTATION_LEGACY):
            if text.startswith(key + "="):
                text = text[len(key) + 1 :]
        doc = initdata.decode(text, _where(file))
    if output is None:
        sys.stdout.buffer.write(doc.raw)
        sys.stdout.buffer.flush()
        return
    _write(output, doc.raw)


COMMANDS: Commands = {
    "decode": ("Decode an annotation value (or image) back to the TOML.", _build_decode),
    "digest": ("Print the digest of FILE and its HOST_DATA and MRCONFIGID forms.", _build_digest),
    "encode": ("Print the annotation value for FILE: base64(gzip(TOML)).", _build_encode),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
