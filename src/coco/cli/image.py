"""``coco image``: copy and inspect OCI images (``oci:PATH[:TAG]``, ``docker://HOST/REPO[:TAG]``).

The options of ``coco image copy`` that turn into a layer transform (the ocicrypt keys,
:mod:`coco.cli.image_crypt`) or into a signer run after the copy (:mod:`coco.cli.image_sign`) live
in those modules; they are imported only when ``copy`` is the command, so other commands (a warm
``pull`` above all) do not pay for the cryptography stack.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from coco.cli._args import (
    Commands,
    Parser,
    Usage,
    add_authfile,
    add_tls_verify,
    int_range,
    path,
    run_group,
    shown,
    size,
)
from coco.errors import UsageError

TYPE_CHECKING = False  # typing and pathlib stay unloaded: `pull --service` needs neither
if TYPE_CHECKING:  # modules load in the commands: `pull --service` needs almost none of them
    from pathlib import Path
    from typing import Any

    from coco.oci.auth import Credentials
    from coco.oci.reference import ImageReference


DESCRIPTION = "Copy, inspect and pull OCI images."


def _ref(text: str, param: str) -> ImageReference:
    from coco.oci.reference import parse_reference

    try:
        return parse_reference(text)
    except UsageError as e:
        raise Usage(f"{param}: {e}") from None


def _creds(text: str | None, flag: str) -> Credentials | None:
    from coco.oci.auth import parse_creds

    if text is None:
        return None
    try:
        return parse_creds(text, flag)
    except UsageError as e:
        raise Usage(str(e)) from None


def _platform_options(p: Parser) -> None:
    """--override-os/-arch/-variant: which image of an index (copy, inspect, pull)."""
    p.add_argument(
        "--override-os", metavar="OS", help="Pick this OS from an index (default linux)."
    )
    p.add_argument("--override-arch", metavar="ARCH", help="Pick this arch (default: this host's).")
    p.add_argument("--override-variant", metavar="VARIANT", help="Pick this variant from an index.")


def _source_options(p: Parser, *, as_path: bool = True) -> None:
    """--creds, --authfile, --tls-verify, --cert-dir, --retry-times: how to read one image
    (inspect, pull)."""
    p.add_argument("--creds", metavar="USER[:PASS]", help="Registry credentials.")
    add_authfile(p, as_path=as_path)
    add_tls_verify(p, "--tls-verify", "")
    _cert_dir(p, "--cert-dir", "the registry", as_path)
    _retry_times(p)


def _cert_dir(p: Parser, flag: str, whose: str, as_path: bool = True) -> None:
    p.add_argument(
        flag,
        type=path(file_okay=False, exists=True, as_path=as_path),
        metavar="DIRECTORY",
        help=f"CA certificates (*.crt) and client certificate (*.cert, *.key) for {whose} "
        "(default, as skopeo: /etc/containers/certs.d/HOST[:PORT]/).",
    )


def _retry_times(p: Parser) -> None:
    p.add_argument(
        "--retry-times",
        type=int_range(0, 100),
        default=0,
        metavar="N",
        help=shown(
            "Retry a request that failed to connect or got a 5xx/429 answer, with backoff.", 0
        ),
    )


def _quiet(p: Parser, text: str = "No progress or summary output.") -> None:
    p.add_argument("-q", "--quiet", action="store_true", help=text)


# containers-policy.json(5), as skopeo finds it: the user's file, else the system's
USER_POLICY = os.path.join(".config", "containers", "policy.json")  # under $HOME
SYSTEM_POLICY = "/etc/containers/policy.json"


def _policy_options(p: Parser) -> None:
    """--policy and --insecure-policy: the signature policy the source image must satisfy."""
    p.add_argument(
        "--policy",
        type=path(dir_okay=False, as_path=False),
        metavar="FILE",
        help="containers-policy.json the image's signatures must satisfy, checked before any "
        "layer is fetched (default, as skopeo: $HOME/.config/containers/policy.json, else "
        f"{SYSTEM_POLICY}). When neither exists no signature is checked, as the guest's image "
        "puller (image-rs) does without a policy, where skopeo would refuse to run; install a "
        "policy.json to enforce one.",
    )
    p.add_argument(
        "--insecure-policy",
        action="store_true",
        help="Check no signatures, even when a default policy.json exists (as skopeo's flag; "
        "warns).",
    )


def _policy_file(policy: str | None, insecure_policy: bool) -> str | None:
    """The policy.json to enforce: --policy, else skopeo's defaults; None: check nothing."""
    if insecure_policy:
        if policy is not None:
            raise Usage("--policy and --insecure-policy cannot be combined")
        print("coco: warning: --insecure-policy: image signatures are not checked", file=sys.stderr)
        return None
    if policy is not None:
        return policy
    home = os.environ.get("HOME") or os.path.expanduser("~")
    for candidate in (os.path.join(home, USER_POLICY), SYSTEM_POLICY):
        if os.path.exists(candidate):
            return candidate
    return None


def _build_copy(p: Parser) -> None:
    from coco.cli import image_crypt, image_sign

    p.description = (
        "Copy an image from SRC to DST (oci:PATH[:TAG] or docker://HOST[:PORT]/REPO[:TAG|@DIGEST])."
        "\n\nPrints the digest of the written manifest on stdout."
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument(
        "--src-creds", metavar="USER[:PASS]", help="Credentials for the source registry."
    )
    p.add_argument("--dest-creds", metavar="USER[:PASS]", help="Credentials for the destination.")
    add_authfile(p)
    add_tls_verify(p, "--src-tls-verify", "source")
    add_tls_verify(p, "--dest-tls-verify", "destination")
    _cert_dir(p, "--src-cert-dir", "the source registry")
    _cert_dir(p, "--dest-cert-dir", "the destination registry")
    _retry_times(p)
    p.add_argument(
        "--all", dest="all_platforms", action="store_true", help="Copy every image of an index."
    )
    _platform_options(p)
    p.add_argument(
        "--digestfile",
        type=path(dir_okay=False),
        metavar="FILE",
        help="Write the digest of the copied manifest to this file.",
    )
    _policy_options(p)
    _quiet(p)
    image_crypt.add_arguments(p)
    image_sign.add_arguments(p)
    p.set_defaults(func=copy_cmd)


def copy_cmd(
    src: str,
    dst: str,
    src_creds: str | None,
    dest_creds: str | None,
    authfile: Path | None,
    src_tls_verify: bool,
    dest_tls_verify: bool,
    src_cert_dir: Path | None,
    dest_cert_dir: Path | None,
    retry_times: int,
    all_platforms: bool,
    override_os: str | None,
    override_arch: str | None,
    override_variant: str | None,
    digestfile: Path | None,
    policy: str | None,
    insecure_policy: bool,
    quiet: bool,
    **extra: Any,
) -> None:
    from coco.cli import image_crypt, image_sign
    from coco.cli._progress import bars
    from coco.oci.copy import CopyOptions, copy_image

    src_ref = _ref(src, "SRC")
    dst_ref = _ref(dst, "DST")
    policy_file = _policy_file(policy, insecure_policy)
    accept = None
    if policy_file is not None:  # loaded (and a bad file refused) before anything is copied
        from pathlib import Path

        from coco.image.pull import load_policy

        regd = extra.get("registries_d")  # image_sign's --registries.d: lookaside for both
        accept = load_policy(Path(policy_file), Path(regd) if regd else None).check
    options = CopyOptions(
        src_credentials=_creds(src_creds, "--src-creds"),
        dest_credentials=_creds(dest_creds, "--dest-creds"),
        authfile=authfile,
        src_tls_verify=src_tls_verify,
        dest_tls_verify=dest_tls_verify,
        src_cert_dir=src_cert_dir,
        dest_cert_dir=dest_cert_dir,
        retry_times=retry_times,
        all_platforms=all_platforms,
        override_os=override_os,
        override_arch=override_arch,
        override_variant=override_variant,
    )
    values = {"src": src, "dst": dst, **extra}
    transform = image_crypt.transform(values)
    sign = image_sign.signer(values, dst_ref)
    with bars(quiet) as progress:
        result = copy_image(
            src_ref, dst_ref, options=options, transform=transform, progress=progress, accept=accept
        )
    if sign is not None:
        sign(dst_ref, result, options)
    if digestfile is not None:
        digestfile.write_text(result.manifest_digest)
    if not quiet:
        counts: dict[str, int] = {}
        for layer in result.layers:
            counts[layer.action] = counts.get(layer.action, 0) + 1
        summary = ", ".join(f"{n} {a}" for a, n in sorted(counts.items())) or "no layers"
        print(f"copied {src_ref} -> {dst_ref} (layers: {summary})", file=sys.stderr)
    print(result.manifest_digest)


def _build_inspect(p: Parser) -> None:
    p.description = (
        "Print what `skopeo inspect` prints for REF: Name, Digest, RepoTags, Created, "
        "DockerVersion, Labels, Architecture, Os, Layers, LayersData, Env (JSON when piped, a "
        "summary with a layer table on a terminal unless --json)."
    )
    p.add_argument("ref", metavar="REF")
    _source_options(p)
    p.add_argument(
        "--raw", action="store_true", help="Print the manifest (or index) bytes as stored."
    )
    p.add_argument(
        "--config",
        dest="show_config",
        action="store_true",
        help="Print the config bytes as stored.",
    )
    p.add_argument(
        "-n",
        "--no-tags",
        action="store_true",
        help="Do not list the repository's tags (RepoTags stays empty).",
    )
    p.add_argument("--json", action="store_true", help="JSON even on a terminal.")
    _platform_options(p)
    p.set_defaults(func=inspect_cmd)


def inspect_cmd(
    ref: str,
    creds: str | None,
    authfile: Path | None,
    tls_verify: bool,
    cert_dir: Path | None,
    retry_times: int,
    raw: bool,
    show_config: bool,
    no_tags: bool,
    json: bool,
    override_os: str | None,
    override_arch: str | None,
    override_variant: str | None,
) -> None:
    from coco.oci.inspect import inspect_image, skopeo_json, skopeo_view
    from coco.oci.transport import Access

    r = _ref(ref, "REF")
    if raw and show_config:
        raise Usage("--raw and --config cannot be combined")
    info = inspect_image(
        r,
        Access(_creds(creds, "--creds"), authfile, tls_verify, cert_dir, retry_times),
        os=override_os,
        arch=override_arch,
        variant=override_variant,
        tags=not (raw or show_config or no_tags),
    )
    if raw or show_config:
        sys.stdout.buffer.write(info.raw if raw else info.config.raw)
        sys.stdout.buffer.flush()
        return
    view = skopeo_view(info)
    if json or not sys.stdout.isatty():
        print(skopeo_json(view))
        return
    from coco.cli._progress import print_image_table

    print_image_table(view)


def _default_store() -> str:
    if os.geteuid() == 0:
        return "/var/lib/coco/store"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "coco", "store")


def _store_option(p: Parser, *, as_path: bool = True) -> None:
    p.add_argument(
        "--store",
        type=path(file_okay=False, as_path=as_path),
        metavar="DIRECTORY",
        help="Layer store directory (default /var/lib/coco/store as root, else "
        "$XDG_DATA_HOME/coco/store).",
    )


def _build_pull(p: Parser) -> None:
    p.description = (
        "Pull REF into the layer store and make BUNDLE_DIR (rootfs/ + config.json) for runc."
        "\n\nPrints the manifest digest on stdout."
    )
    p.add_argument("ref", metavar="REF")
    # paths stay strings here (pathlib is not loaded for `--service`); pull_cmd converts them
    p.add_argument("bundle_dir", metavar="BUNDLE_DIR", type=path(as_path=False))
    _source_options(p, as_path=False)
    p.add_argument(
        "--decryption-key",
        action="append",
        default=[],
        metavar="KEY[:PASSWORD]",
        help="Decrypt layers with this private key, certificate or provider:NAME[:VALUE] "
        "(repeatable).",
    )
    _policy_options(p)
    p.add_argument(
        "--registries.d",
        dest="registries_d",
        type=path(file_okay=False, as_path=False),
        metavar="DIRECTORY",
        help="Directory of registries.d YAML files (signature lookaside locations) for the "
        "policy; a missing directory configures nothing, as with skopeo.",
    )
    _store_option(p, as_path=False)
    p.add_argument(
        "--jobs",
        type=int_range(1, 64),
        default=3,
        metavar="INTEGER RANGE",
        help=shown("Layers pulled in parallel.", "3; 1<=x<=64"),
    )
    p.add_argument(
        "--flatten",
        action="store_true",
        help="Copy the layers into rootfs/ instead of mounting an overlay.",
    )
    p.add_argument(
        "--max-layer-size",
        type=size,
        metavar="SIZE",
        help="Refuse a layer whose uncompressed tar is larger (bytes, or with a K/M/G/T suffix "
        "in powers of 1024; default 32G).",
    )
    p.add_argument(
        "--max-files",
        type=int_range(1),
        metavar="N",
        help="Refuse a layer with more tar entries (default 1000000).  [x>=1]",
    )
    _platform_options(p)
    p.add_argument(
        "--service",
        metavar="SOCKET",
        default=os.environ.get("COCO_IMAGE_SERVICE") or None,
        help="Hand the pull to a running `coco image serve` on this socket (default: "
        "$COCO_IMAGE_SERVICE; unset: pull in this process).",
    )
    _quiet(p)
    p.set_defaults(func=pull_cmd)


def pull_cmd(
    ref: str,
    bundle_dir: str,
    creds: str | None,
    authfile: str | None,
    tls_verify: bool,
    cert_dir: str | None,
    retry_times: int,
    decryption_key: list[str],
    policy: str | None,
    insecure_policy: bool,
    registries_d: str | None,
    store: str | None,
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
    from coco.image.request import PullRequest

    if creds is not None:
        _creds(creds, "--creds")  # a malformed value is a usage error, here and for a service
    req = PullRequest(
        ref=ref, bundle=bundle_dir, store=store or _default_store(), creds=creds,
        authfile=authfile, tls_verify=tls_verify, cert_dir=cert_dir, retry_times=retry_times,
        decryption_keys=decryption_key, policy=_policy_file(policy, insecure_policy),
        registries_d=registries_d, jobs=jobs, flatten=flatten, os=override_os,
        arch=override_arch, variant=override_variant, max_layer_size=max_layer_size,
        max_files=max_files,
    )  # fmt: skip
    if service:  # the service checks REF and the rest; this process stays small
        from coco.image.service import pull_via_service

        answer = pull_via_service(service, req)
        if not quiet:
            print(
                f"pulled {answer['reference']} -> {answer['bundle']} ({answer['mode']}; layers: "
                f"{answer['pulled']} pulled, {answer['reused']} reused) by {service}",
                file=sys.stderr,
            )
        print(answer["manifest_digest"])
        return
    from coco.image.pull import pull_image

    if quiet:  # no bars: their module stays unloaded
        bars: Callable[[bool], contextlib.AbstractContextManager[Any]] = _no_bars
    else:
        from coco.cli._progress import bars
    r = _ref(ref, "REF")
    options = req.options()
    with _terminate_cleanly(), bars(quiet) as progress:
        result = pull_image(r, req.bundle, req.store, options, progress=progress)
    if not quiet:
        pulled = sum(1 for x in result.layers if x.action == "pulled")
        print(
            f"pulled {result.reference} -> {result.bundle.path} ({result.bundle.mode}; layers: "
            f"{pulled} pulled, {len(result.layers) - pulled} reused)",
            file=sys.stderr,
        )
    print(result.manifest_digest)


def _no_bars(quiet: bool) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


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


def _build_serve(p: Parser) -> None:
    p.description = (
        "Serve `coco image pull --service SOCKET` until SIGTERM: a long-running puller whose "
        "warm pulls skip Python's start-up (as the guest's image service does)."
    )
    p.add_argument(
        "--socket",
        dest="socket_path",
        metavar="PATH",
        help="Unix socket to listen on (default /run/coco/image.sock as root, else "
        "$XDG_RUNTIME_DIR/coco/image.sock).",
    )
    p.set_defaults(func=serve_cmd)


def serve_cmd(socket_path: str | None) -> None:
    from coco.image.service import PullService, default_socket

    path = socket_path or default_socket()
    svc = PullService(path)
    import signal
    import threading

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=svc.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"coco: serving image pulls on {path}", file=sys.stderr, flush=True)
    svc.serve_forever()


def _build_prune(p: Parser) -> None:
    p.description = (
        "Remove the layers of the store that no bundle uses (bundles deleted since are forgotten)."
    )
    _store_option(p)
    _quiet(p, "Do not list the removed layers.")
    p.set_defaults(func=prune_cmd)


def prune_cmd(store: Path | None, quiet: bool) -> None:
    from pathlib import Path

    from coco.image.store import LayerStore

    store_dir = store or Path(_default_store())
    if not store_dir.is_dir():
        raise UsageError(f"--store {store_dir}: expected a layer store directory, found none")
    removed = LayerStore(store_dir).prune()
    if not quiet:
        for d in removed:
            print(d)
        print(f"removed {len(removed)} layer(s)", file=sys.stderr)


COMMANDS: Commands = {
    "copy": ("Copy an image from SRC to DST.", _build_copy),
    "inspect": ("Print the manifest and config of REF as JSON.", _build_inspect),
    "prune": ("Remove the layers of the store that no bundle uses.", _build_prune),
    "pull": ("Pull REF into the layer store and make BUNDLE_DIR for runc.", _build_pull),
    "serve": ("Serve `coco image pull --service SOCKET` until SIGTERM.", _build_serve),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
