"""``coco initdata``: digest, encode and decode initdata documents (TOML and pod annotation)."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import click

from coco.errors import InitdataError
from coco.integrity import initdata


def _read(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as e:
        raise InitdataError(f"{path}: cannot read it: {e.strerror}") from None


def _where(path: str) -> str:
    return "stdin" if path == "-" else path


@click.group("initdata")
def initdata_group() -> None:
    """Initdata documents: the TOML whose digest the TEE measures."""


@initdata_group.command("digest")
@click.argument("file")
@click.option("--encoded", is_flag=True, help="FILE holds the annotation value (base64 gzip).")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
def digest_cmd(file: str, encoded: bool, fmt: str) -> None:
    """Print the digest of FILE and its HOST_DATA (32 bytes) and MRCONFIGID (48 bytes) forms.

    Text output is one `name value` pair a line: algorithm, digest, host_data (hex),
    host_data_base64 (as QEMU's host-data takes it), mrconfigid (hex).
    """
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
        click.echo(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            click.echo(f"{k} {v}")


@initdata_group.command("encode")
@click.argument("file")
@click.option(
    "--annotation",
    is_flag=True,
    help=f"Print '{initdata.ANNOTATION}=<value>' instead of the value alone.",
)
@click.option(
    "--image",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the block-device image the runtime attaches to the guest.",
)
def encode_cmd(file: str, annotation: bool, image: Path | None) -> None:
    """Print the annotation value for FILE: base64(gzip(TOML)), after checking the document."""
    raw = _read(file)
    value = initdata.encode(raw, _where(file))
    if image is not None:
        _write(image, initdata.encode_image(raw, _where(file)))
    click.echo(f"{initdata.ANNOTATION}={value}" if annotation else value)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InitdataError(f"{path}: cannot write it: {e.strerror}") from None


@initdata_group.command("decode")
@click.argument("file")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the TOML here instead of standard output.",
)
def decode_cmd(file: str, output: Path | None) -> None:
    """Decode the annotation value in FILE ('-': stdin) back to the TOML, checking it.

    A leading 'io.katacontainers.config.{hypervisor,runtime}.cc_init_data=' is accepted, and so
    is an initdata block-device image.
    """
    raw = _read(file)
    if raw.startswith(initdata.IMAGE_MAGIC):
        doc = initdata.decode_image(raw, _where(file))
    else:
        text = raw.decode("ascii", errors="replace").strip()
        for key in (initdata.ANNOTATION, initdata.ANNOTATION_LEGACY):
            if text.startswith(key + "="):
                text = text[len(key) + 1 :]
        doc = initdata.decode(text, _where(file))
    if output is None:
        sys.stdout.buffer.write(doc.raw)
        sys.stdout.buffer.flush()
        return
    _write(output, doc.raw)
