"""``coco keyprovider``: the ``attestation-agent`` key provider that skopeo's ``provider:`` calls.

``serve`` answers gRPC ``keyprovider.KeyProviderService`` (ocicrypt_config.json:
``{"key-providers":{"attestation-agent":{"grpc":"127.0.0.1:50000"}}}``); ``cmd`` is the same
provider in ocicrypt's ``cmd`` form (request JSON on stdin, answer on stdout:
``{"cmd":{"path":"coco","args":["keyprovider","cmd","--kbs",...]}}``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coco.cli._args import Commands, Parser, env_default, path, run_group, shown

DESCRIPTION = "The attestation-agent key provider (gRPC) that registers its keys in a KBS."
_FILE = path(exists=True, dir_okay=False)
_AA = "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, _COMMANDS)


def _provider_options(p: Parser) -> None:
    p.add_argument("--kbs", metavar="URL", help="KBS to register each key encryption key in.")
    p.add_argument(
        "-a", "--auth-private-key", dest="auth_private_key", type=_FILE, metavar="FILE",
        help="Admin private key (PEM: Ed25519, or EC P-256 / RSA) signing the KBS admin token "
        "(role admin, valid 2 hours).",
    )  # fmt: skip
    p.add_argument(
        "--admin-token-file", type=_FILE, metavar="FILE",
        help="A ready admin bearer JWT instead of --auth-private-key.",
    )  # fmt: skip
    p.add_argument("--kbs-cert", type=_FILE, metavar="FILE", help="CA certificate of an HTTPS KBS.")
    p.add_argument(
        "--aa-kbc-params", default=env_default("AA_KBC_PARAMS"), metavar="KBC::URL",
        help="UnWrapKey (in the guest): the KBC the keys come from, e.g. "
        "cc_kbc::http://127.0.0.1:8080  [default: $AA_KBC_PARAMS; unset: UnWrapKey is off]",
    )  # fmt: skip
    p.add_argument(
        "--aa-addr", "--aa_addr", dest="aa_addr", default=_AA, metavar="ADDR",
        help=shown("Attestation Agent giving cc_kbc its tokens (UnWrapKey).", _AA),
    )  # fmt: skip


def _provider(
    kbs: str | None, auth_private_key: Path | None, admin_token_file: Path | None,
    kbs_cert: Path | None, aa_kbc_params: str | None, aa_addr: str, remember_keys: bool = True,
):  # type: ignore[no-untyped-def]  # fmt: skip
    from coco.cli._args import Usage
    from coco.guest.keyprovider import KeyProvider, registrar_from

    if auth_private_key and admin_token_file:
        raise Usage("--auth-private-key and --admin-token-file exclude each other")
    if (auth_private_key or admin_token_file) and not kbs:
        raise Usage("--auth-private-key / --admin-token-file need --kbs")
    verify: str | bool = str(kbs_cert) if kbs_cert else True
    registrar = None
    if kbs:
        registrar = registrar_from(
            kbs,
            private_key_pem=auth_private_key.read_bytes() if auth_private_key else None,
            token_file=str(admin_token_file) if admin_token_file else None,
            verify=verify,
            where=f"--auth-private-key {auth_private_key}",
        )
    getter = None
    if aa_kbc_params:
        from coco.guest.kbc import AaTokenSource, make_kbc, parse_kbc_params

        name, url = parse_kbc_params(aa_kbc_params, "--aa-kbc-params")
        source = AaTokenSource(aa_addr) if name == "cc_kbc" else None
        cert = kbs_cert.read_text() if kbs_cert else None
        getter = make_kbc(name, url, source=source, cert=cert)
    return KeyProvider(registrar, getter, remember_keys=remember_keys)


def _build_serve(p: Parser) -> None:
    p.description = (
        "Serve gRPC keyprovider.KeyProviderService: WrapKey wraps a layer's options under a key "
        "encryption key and registers the key in the KBS under its kid; UnWrapKey (with "
        "--aa-kbc-params) fetches it back through the KBC after attesting."
    )
    p.add_argument(
        "-s", "--socket", default="127.0.0.1:50000", metavar="IP:PORT",
        help=shown("Address to listen on.", "127.0.0.1:50000"),
    )  # fmt: skip
    _provider_options(p)
    p.set_defaults(func=serve)


def serve(socket: str, **options: Any) -> None:
    import signal
    import threading

    from coco.guest.keyprovider import grpc_server

    provider = _provider(**options)
    server, port = grpc_server(provider, socket)
    host = socket.rpartition(":")[0]
    print(f"coco keyprovider: listening on {host}:{port}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()


def _build_cmd(p: Parser) -> None:
    p.description = (
        "Answer one keyprovider request (ocicrypt's cmd form): the request JSON on stdin, the "
        "answer on stdout."
    )
    _provider_options(p)
    p.set_defaults(func=cmd)


def cmd(**options: Any) -> None:
    from coco import jsonio
    from coco.guest.keyprovider import KeyProviderError

    provider = _provider(**options, remember_keys=False)  # one process per layer
    request = sys.stdin.buffer.read()
    doc = jsonio.loads(request, what="keyprovider request on stdin", error=KeyProviderError)
    op = doc.get("op") if isinstance(doc, dict) else None
    methods = {"keywrap": "WrapKey", "keyunwrap": "UnWrapKey"}
    if op not in methods:
        raise KeyProviderError(
            f"keyprovider request on stdin: expected op keywrap or keyunwrap, found {op!r}"
        )
    sys.stdout.buffer.write(provider.handle(methods[op], request))
    sys.stdout.flush()


_COMMANDS: Commands = {
    "cmd": ("Answer one request on stdin (ocicrypt's cmd provider form).", _build_cmd),
    "serve": ("Serve keyprovider.KeyProviderService over gRPC.", _build_serve),
}
