"""``coco kbs serve``: run the Key Broker Service (with its built-in AS and RVPS)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from coco.cli._args import Commands, Parser, env_default, int_range, path, run_group, shown
from coco.errors import UsageError

DESCRIPTION = "The Key Broker Service (owner side)."
_POSITIVE = int_range(1)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, found {text!r}")
    return value


def _build_serve(p: Parser) -> None:
    p.description = (
        "Serve KBS protocol 0.4.0. Either --config-file FILE, or the quick form:\n\n"
        "coco kbs serve --listen 127.0.0.1:8080 --insecure-http --storage "
        "sqlite:///var/lib/coco/kbs/kbs.db"
        "\n\nThe quick form's admin API is open (InsecureAllowAll, with a warning) unless "
        "--admin-public-key or --deny-admin is given. Without --storage it keeps everything in "
        "memory (upstream's default storage, with a warning): resources, policies and the "
        "token-signing key are gone when it stops, and nothing is written to the working "
        "directory.\n\nGET /healthz answers while the process runs; GET /readyz also checks the "
        "storage (503 when it does not answer). Logs are timestamped, with one access line per "
        "request (method, path, status, milliseconds)."
    )
    existing = path(exists=True, dir_okay=False, as_path=False)
    p.add_argument(
        "--config-file",
        "--config",
        "-c",
        dest="config_file",
        type=path(dir_okay=False, as_path=False),
        default=env_default("KBS_CONFIG_FILE"),
        metavar="FILE",
        help="kbs-config.toml (upstream shape).",
    )
    p.add_argument("--listen", metavar="TEXT", help="HOST:PORT to listen on (quick form).")
    p.add_argument("--insecure-http", action="store_true", help="Serve plain HTTP (INSECURE).")
    p.add_argument("--private-key", type=existing, metavar="FILE", help="TLS key (PEM).")
    p.add_argument("--certificate", type=existing, metavar="FILE", help="TLS certificate (PEM).")
    p.add_argument(
        "--storage",
        metavar="TEXT",
        help="sqlite:///PATH/kbs.db, localfs:///DIR (a file per resource: DIR/REPO/TYPE/TAG), "
        "postgresql://USER@HOST:PORT/DB or memory:// [default: memory://]",
    )
    p.add_argument(
        "--workers",
        type=_POSITIVE,
        default=1,
        metavar="INTEGER",
        help=shown("Worker processes (pre-forked).", 1),
    )
    p.add_argument(
        "--session-storage",
        metavar="TEXT",
        help="Where sessions live (default: memory with SQLite storage, else the storage).",
    )
    p.add_argument(
        "--admin-public-key",
        type=existing,
        metavar="FILE",
        help="PEM key of the admin token issuer (AuthenticatedAuthorization, role 'admin').",
    )
    p.add_argument("--deny-admin", action="store_true", help="Refuse every admin call (DenyAll).")
    p.add_argument(
        "--insecure-header-jwk",
        action="store_true",
        help="Trust any token that carries its own key (INSECURE, testing).",
    )
    p.add_argument(
        "--session-timeout",
        type=_POSITIVE,
        default=5,
        metavar="INTEGER",
        help=shown("Session minutes.", 5),
    )
    p.add_argument(
        "--max-body-mb",
        type=_POSITIVE,
        default=2,
        metavar="INTEGER",
        help=shown("Request body limit (MiB).", 2),
    )
    p.add_argument(
        "--max-header-kb",
        type=_POSITIVE,
        default=256,
        metavar="INTEGER",
        help=shown("Request header limit (KiB).", 256),
    )
    p.add_argument(
        "--max-pending-sessions",
        type=_POSITIVE,
        default=10000,
        metavar="INTEGER",
        help=shown("Sessions waiting for /attest before /auth answers 503.", 10000),
    )
    p.add_argument(
        "--policy-timeout",
        type=_seconds,
        default=3.0,
        metavar="SECONDS",
        help=shown("Time limit of one policy evaluation.", 3),
    )
    p.add_argument(
        "--policy-memory-mb",
        type=_POSITIVE,
        default=1024,
        metavar="INTEGER",
        help=shown("Memory limit of one policy evaluation (MiB).", 1024),
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        metavar="[text|json]",
        help=shown("Log lines as timestamped text or one JSON object each.", "text"),
    )
    p.set_defaults(func=serve)


def serve(
    config_file: str | None,
    listen: str | None,
    insecure_http: bool,
    private_key: str | None,
    certificate: str | None,
    storage: str | None,
    session_storage: str | None,
    workers: int,
    admin_public_key: str | None,
    deny_admin: bool,
    insecure_header_jwk: bool,
    session_timeout: int,
    max_body_mb: int,
    max_header_kb: int,
    max_pending_sessions: int,
    policy_timeout: float,
    policy_memory_mb: int,
    log_format: str,
) -> None:
    import logging

    from coco.trustee.config import AdminIdp, KbsConfig, parse_socket
    from coco.trustee.kbs import logs
    from coco.trustee.kbs.server import serve as run
    from coco.trustee.policy_engine import PolicyLimits

    if config_file:
        if listen or storage or session_storage or insecure_http or admin_public_key or deny_admin:
            raise UsageError("--config-file cannot be combined with the quick-form options")
        cfg = KbsConfig.load(config_file)
    else:
        if not listen:
            raise UsageError("give --config-file FILE, or --listen HOST:PORT (quick form)")
        if not insecure_http and not (private_key and certificate):
            raise UsageError("HTTPS needs --private-key and --certificate (or --insecure-http)")
        parse_socket(listen, "--listen")
        cfg = KbsConfig()
        cfg.http_server.sockets = [listen]
        cfg.http_server.insecure_http = insecure_http
        cfg.http_server.private_key = private_key
        cfg.http_server.certificate = certificate
        cfg.http_server.payload_request_size = max_body_mb
        cfg.http_server.request_header_size = max_header_kb
        cfg.storage_url = storage or "memory://"
        cfg.session_storage_url = session_storage
        cfg.http_server.worker_count = workers
        cfg.insecure_header_jwk = insecure_header_jwk
        cfg.session_timeout_min = session_timeout
        cfg.max_pending_sessions = max_pending_sessions
        cfg.policy_limits = PolicyLimits(policy_timeout, policy_memory_mb)
        if deny_admin and admin_public_key:
            raise UsageError("--deny-admin and --admin-public-key exclude each other")
        if deny_admin:
            cfg.admin_mode = "DenyAll"
        elif admin_public_key:
            cfg.admin_mode = "AuthenticatedAuthorization"
            cfg.admin_idps = [AdminIdp(public_key_uri=admin_public_key)]
            cfg.admin_acls = [("admin", "^/kbs/.+$")]
        else:
            cfg.admin_mode = "InsecureAllowAll"
    logs.configure(log_format)
    if cfg.storage_url.startswith("memory:"):
        logging.getLogger("coco.kbs").warning(
            "storage memory://: resources, policies and the token-signing key are lost when the "
            "KBS stops (give --storage sqlite:///var/lib/coco/kbs/kbs.db to keep them)"
        )
    run(cfg)


COMMANDS: Commands = {
    "serve": ("Serve KBS protocol 0.4.0 (--config-file FILE, or the quick form).", _build_serve),
}


def build(group: Parser, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]]:
    return run_group(group, argv, COMMANDS)
