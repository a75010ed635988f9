"""``coco image``: copy and inspect OCI images (``oci:PATH[:TAG]``, ``docker://HOST/REPO[:TAG]``).

Other packages add options to ``coco image copy`` that turn into a layer transform (``coco
ocicrypt`` adds the encryption and decryption keys) through :func:`add_copy_transform`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from coco.errors import UsageError

if TYPE_CHECKING:  # modules load in the commands: `pull --service` needs almost none of them
    from coco.oci.auth import Credentials
    from coco.oci.copy import CopyOptions, LayerTransform
    from coco.oci.reference import ImageReference

TransformFactory = Callable[[dict[str, Any]], "LayerTransform | None"]
_FACTORIES: list[tuple[list[str], TransformFactory]] = []
CopySigner = Callable[["ImageReference", Any, "CopyOptions"], None]
SignerFactory = Callable[[dict[str, Any], "ImageReference"], "CopySigner | None"]
_SIGNERS: list[tuple[list[str], SignerFactory]] = []


class _ImageGroup(click.Group):
    """Loads the plug-ins of ``copy`` (the ocicrypt options) only when ``copy`` is used, so other
    commands (a warm ``pull`` above all) do not pay for importing the cryptography stack."""

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "copy":
            from coco.cli import (
                image_crypt,  # noqa: F401  (registers through add_copy_transform)
                image_sign,  # noqa: F401  (registers through add_copy_signer)
            )
        return super().get_command(ctx, name)


@click.group(cls=_ImageGroup)
def image() -> None:
    """Copy, inspect and pull OCI images."""


def _tls_option(name: str, what: str) -> Callable[[Any], Any]:
    return click.option(
        name,
        type=click.BOOL,
        is_flag=False,
        flag_value=True,
        default=True,
        show_default=True,
        metavar="[=BOOL]",
        help=f"Require HTTPS and verify certificates for the {what + ' ' if what else ''}registry "
        "(false: skip verification, fall back to plain HTTP).",
    )


def _ref(text: str, param: str) -> ImageReference:
    from coco.oci.reference import parse_reference

    try:
        return parse_reference(text)
    except UsageError as e:
        raise click.BadParameter(str(e), param_hint=param) from None


def _creds(text: str | None, flag: str) -> Credentials | None:
    from coco.oci.auth import parse_creds

    if text is None:
        return None
    try:
        return parse_creds(text, flag)
    except UsageError as e:
        raise click.BadParameter(str(e), param_hint=flag) from None


_authfile_option = click.option(
    "--authfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="auth.json with registry credentials (default: $REGISTRY_AUTH_FILE, "
    "$XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json).",
)


@image.command("copy")
@click.argument("src")
@click.argument("dst")
@click.option("--src-creds", metavar="USER[:PASS]", help="Credentials for the source registry.")
@click.option("--dest-creds", metavar="USER[:PASS]", help="Credentials for the destination.")
@_authfile_option
@_tls_option("--src-tls-verify", "source")
@_tls_option("--dest-tls-verify", "destination")
@click.option("--all", "all_platforms", is_flag=True, help="Copy every image of an index.")
@click.option("--override-os", metavar="OS", help="Pick this OS from an index (default linux).")
@click.option("--override-arch", metavar="ARCH", help="Pick this arch (default: this host's).")
@click.option("--override-variant", metavar="VARIANT", help="Pick this variant from an index.")
@click.option(
    "--digestfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the digest of the copied manifest to this file.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary output.")
def copy_cmd(
    src: str,
    dst: str,
    src_creds: str | None,
    dest_creds: str | None,
    authfile: Path | None,
    src_tls_verify: bool,
    dest_tls_verify: bool,
    all_platforms: bool,
    override_os: str | None,
    override_arch: str | None,
    override_variant: str | None,
    digestfile: Path | None,
    quiet: bool,
    **extra: Any,
) -> None:
    """Copy an image from SRC to DST (oci:PATH[:TAG] or docker://HOST[:PORT]/REPO[:TAG|@DIGEST]).

    Prints the digest of the written manifest on stdout.
    """
    from coco.oci.copy import CopyOptions, copy_image

    src_ref = _ref(src, "SRC")
    dst_ref = _ref(dst, "DST")
    options = CopyOptions(
        src_credentials=_creds(src_creds, "--src-creds"),
        dest_credentials=_creds(dest_creds, "--dest-creds"),
        authfile=authfile,
        src_tls_verify=src_tls_verify,
        dest_tls_verify=dest_tls_verify,
        all_platforms=all_platforms,
        override_os=override_os,
        override_arch=override_arch,
        override_variant=override_variant,
    )
    transform = _make_transform(extra)
    signers = [sg for names, f in _SIGNERS if (sg := f({n: extra.get(n) for n in names}, dst_ref))]
    if not quiet and sys.stderr.isatty():
        from coco.oci.progress import RichProgress  # rich only on a terminal

        with RichProgress() as progress:
            result = copy_image(
                src_ref, dst_ref, options=options, transform=transform, progress=progress
            )
    else:
        result = copy_image(src_ref, dst_ref, options=options, transform=transform)
    for sign in signers:
        sign(dst_ref, result, options)
    if digestfile is not None:
        digestfile.write_text(result.manifest_digest)
    if not quiet:
        counts: dict[str, int] = {}
        for layer in result.layers:
            counts[layer.action] = counts.get(layer.action, 0) + 1
        summary = ", ".join(f"{n} {a}" for a, n in sorted(counts.items())) or "no layers"
        click.echo(f"copied {src_ref} -> {dst_ref} (layers: {summary})", err=True)
    click.echo(result.manifest_digest)


def _make_transform(extra: dict[str, Any]) -> LayerTransform | None:
    chosen: list[LayerTransform] = []
    for names, factory in _FACTORIES:
        t = factory({n: extra.get(n) for n in names})
        if t is not None:
            chosen.append(t)
    if len(chosen) > 1:
        raise click.UsageError("these copy options cannot be combined (more than one transform)")
    return chosen[0] if chosen else None


def add_copy_signer(params: list[click.Parameter], factory: SignerFactory) -> None:
    """Add ``params`` to ``coco image copy``; ``factory`` gets their values and the destination
    (before the copy: it checks its keys then) and returns a signer called with the destination,
    the CopyResult and the CopyOptions once the image is written, or None when unused."""
    copy_cmd.params.extend(params)
    _SIGNERS.append(([p.name for p in params if p.name], factory))


def add_copy_transform(params: list[click.Parameter], factory: TransformFactory) -> None:
    """Add ``params`` to ``coco image copy``; ``factory`` gets their values (by parameter name)
    and returns a LayerTransform, or None when the options were not used."""
    copy_cmd.params.extend(params)
    _FACTORIES.append(([p.name for p in params if p.name], factory))


def _source_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--creds, --authfile, --tls-verify: how to read one image (inspect, pull)."""
    f = _tls_option("--tls-verify", "")(f)
    f = _authfile_option(f)
    return click.option("--creds", metavar="USER[:PASS]", help="Registry credentials.")(f)


def _platform_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--override-os/-arch/-variant: which image of an index (inspect, pull)."""
    for name, metavar, text in reversed(
        [
            ("--override-os", "OS", "Pick this OS from an index (default linux)."),
            ("--override-arch", "ARCH", "Pick this arch (default: this host's)."),
            ("--override-variant", "VARIANT", "Pick this variant from an index."),
        ]
    ):
        f = click.option(name, metavar=metavar, help=text)(f)
    return f


@image.command("inspect")
@click.argument("ref")
@_source_options
@click.option("--raw", is_flag=True, help="Print the manifest (or index) bytes as stored.")
@click.option("--config", "show_config", is_flag=True, help="Print the config bytes as stored.")
@_platform_options
def inspect_cmd(
    ref: str,
    creds: str | None,
    authfile: Path | None,
    tls_verify: bool,
    raw: bool,
    show_config: bool,
    override_os: str | None,
    override_arch: str | None,
    override_variant: str | None,
) -> None:
    """Print the manifest and config of REF as JSON."""
    from coco.oci.inspect import inspect_image
    from coco.oci.transport import Access

    r = _ref(ref, "REF")
    if raw and show_config:
        raise click.UsageError("--raw and --config cannot be combined")
    info = inspect_image(
        r,
        Access(_creds(creds, "--creds"), authfile, tls_verify),
        os=override_os,
        arch=override_arch,
        variant=override_variant,
    )
    if raw:
        sys.stdout.buffer.write(info.raw)
        sys.stdout.buffer.flush()
        return
    if show_config:
        sys.stdout.buffer.write(info.config.raw)
        sys.stdout.buffer.flush()
        return
    out = {
        "Name": info.reference,
        "Digest": info.digest,
        "MediaType": info.media_type,
        "ManifestDigest": info.manifest.digest,
        "Platform": f"{info.config.os}/{info.config.architecture}"
        + (f"/{info.config.variant}" if info.config.variant else ""),
        "Layers": [layer.digest for layer in info.manifest.layers],
        "Manifest": json.loads(info.manifest.raw),
        "Config": json.loads(info.config.raw),
    }
    click.echo(json.dumps(out, indent=2))


def _default_store() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/coco/store")
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "coco" / "store"


_store_option = click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Layer store directory (default /var/lib/coco/store as root, else "
    "$XDG_DATA_HOME/coco/store).",
)


@image.command("pull")
@click.argument("ref")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@_source_options
@click.option(
    "--decryption-key",
    multiple=True,
    metavar="KEY[:PASSWORD]",
    help="Decrypt layers with this private key, certificate or provider:NAME[:VALUE] (repeatable).",
)
@click.option(
    "--policy",
    type=click.Path(dir_okay=False, path_type=Path),
    help="containers-policy.json the image's signatures must satisfy (checked before any layer "
    "is fetched).",
)
@click.option(
    "--registries.d",
    "registries_d",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of registries.d YAML files (signature lookaside locations).",
)
@_store_option
@click.option(
    "--jobs",
    type=click.IntRange(1, 64),
    default=3,
    show_default=True,
    help="Layers pulled in parallel.",
)
@click.option(
    "--flatten", is_flag=True, help="Copy the layers into rootfs/ instead of mounting an overlay."
)
@click.option(
    "--max-layer-size",
    metavar="SIZE",
    callback=lambda ctx, param, v: None if v is None else _size(v, "--max-layer-size"),
    help="Refuse a layer whose uncompressed tar is larger (bytes, or with a K/M/G/T suffix in "
    "powers of 1024; default 32G).",
)
@click.option(
    "--max-files",
    type=click.IntRange(1),
    metavar="N",
    help="Refuse a layer with more tar entries (default 1000000).",
)
@_platform_options
@click.option(
    "--service",
    metavar="SOCKET",
    envvar="COCO_IMAGE_SERVICE",
    help="Hand the pull to a running `coco image serve` on this socket (default: "
    "$COCO_IMAGE_SERVICE; unset: pull in this process).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary output.")
def pull_cmd(
    ref: str,
    bundle_dir: Path,
    creds: str | None,
    authfile: Path | None,
    tls_verify: bool,
    decryption_key: tuple[str, ...],
    policy: Path | None,
    registries_d: Path | None,
    store: Path | None,
    jobs: int,
    flatten: bool,
    max_layer_size: int | None,
    max_files: int | None,
    override_os: str | None,
    override_arch: str | None,
    override_variant: str | None,
    service: str | None,
    quiet: bool,
) -> None:
    """Pull REF into the layer store and make BUNDLE_DIR (rootfs/ + config.json) for runc.

    Prints the manifest digest on stdout.
    """
    if registries_d is not None and policy is None:
        raise click.UsageError("--registries.d needs --policy")
    if service:  # the service checks REF and the rest; this process stays small
        from coco.image.service import make_request, pull_via_service

        if creds is not None:
            _creds(creds, "--creds")  # a malformed value is a usage error here too
        req = make_request(
            ref, bundle_dir, store or _default_store(), creds=creds, authfile=authfile,
            tls_verify=tls_verify, decryption_keys=decryption_key, policy=policy,
            registries_d=registries_d, jobs=jobs, flatten=flatten, os_name=override_os,
            arch=override_arch, variant=override_variant, max_layer_size=max_layer_size,
            max_files=max_files,
        )  # fmt: skip
        answer = pull_via_service(service, req)
        if not quiet:
            click.echo(
                f"pulled {answer['reference']} -> {answer['bundle']} ({answer['mode']}; layers: "
                f"{answer['pulled']} pulled, {answer['reused']} reused) by {service}",
                err=True,
            )
        click.echo(answer["manifest_digest"])
        return
    from coco.image.pull import PullOptions, load_policy, pull_image
    from coco.oci.transport import Access

    r = _ref(ref, "REF")

    def decryption() -> Any:  # keys are read only when an encrypted layer is to be fetched
        from coco.ocicrypt import decrypt_config

        return decrypt_config(decryption_key)

    limits = None
    if max_layer_size is not None or max_files is not None:
        from coco.image.unpack import UnpackLimits

        given = {"max_layer_size": max_layer_size, "max_files": max_files}
        limits = UnpackLimits(**{k: v for k, v in given.items() if v is not None})
    options = PullOptions(
        access=Access(_creds(creds, "--creds"), authfile, tls_verify),
        decryption=decryption if decryption_key else None,
        policy=load_policy(policy, registries_d) if policy is not None else None,
        jobs=jobs,
        flatten=flatten,
        os=override_os,
        arch=override_arch,
        variant=override_variant,
        limits=limits,
    )
    store_dir = store or _default_store()
    with _terminate_cleanly():
        if not quiet and sys.stderr.isatty():
            from coco.oci.progress import RichProgress  # rich only on a terminal

            with RichProgress() as progress:
                result = pull_image(r, bundle_dir, store_dir, options, progress=progress)
        else:
            result = pull_image(r, bundle_dir, store_dir, options)
    if not quiet:
        pulled = sum(1 for x in result.layers if x.action == "pulled")
        click.echo(
            f"pulled {result.reference} -> {result.bundle.path} ({result.bundle.mode}; layers: "
            f"{pulled} pulled, {len(result.layers) - pulled} reused)",
            err=True,
        )
    click.echo(result.manifest_digest)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str, flag: str) -> int:
    """``1048576``, ``512K``, ``100M``, ``2GiB``, ``1.5G`` -> bytes (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        n = float(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        n = -1
    if not n >= 1 or n != n or n == float("inf"):
        raise click.BadParameter(
            f"expected a positive size such as 1048576, 512K, 100M or 2G, found {text!r}",
            param_hint=flag,
        )
    return int(n)


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """SIGTERM/SIGHUP interrupt like Ctrl-C while inside, so a pull removes what it started (no
    partial bundle, no temporary layer) before exiting."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    sigs = (signal.SIGTERM, signal.SIGHUP)
    old = [signal.signal(sig, interrupt) for sig in sigs]
    try:
        yield
    finally:
        for sig, handler in zip(sigs, old, strict=True):
            signal.signal(sig, handler)


@image.command("serve")
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    help="Unix socket to listen on (default /run/coco/image.sock as root, else "
    "$XDG_RUNTIME_DIR/coco/image.sock).",
)
def serve_cmd(socket_path: str | None) -> None:
    """Serve `coco image pull --service SOCKET` until SIGTERM: a long-running puller whose
    warm pulls skip Python's start-up (as the guest's image service does)."""
    from coco.image.service import PullService, default_socket

    path = socket_path or default_socket()
    svc = PullService(path)
    import signal
    import threading

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=svc.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(f"coco: serving image pulls on {path}", err=True)
    svc.serve_forever()


@image.command("prune")
@_store_option
@click.option("-q", "--quiet", is_flag=True, help="Do not list the removed layers.")
def prune_cmd(store: Path | None, quiet: bool) -> None:
    """Remove the layers of the store that no bundle uses (bundles deleted since are forgotten)."""
    from coco.image.store import LayerStore

    store_dir = store or _default_store()
    if not store_dir.is_dir():
        raise UsageError(f"--store {store_dir}: expected a layer store directory, found none")
    removed = LayerStore(store_dir).prune()
    if not quiet:
        for d in removed:
            click.echo(d)
        click.echo(f"removed {len(removed)} layer(s)", err=True)
