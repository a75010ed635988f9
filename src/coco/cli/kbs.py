"""``coco kbs serve``: run the Key Broker Service (with its built-in AS and RVPS)."""

from __future__ import annotations

import click

from coco.errors import UsageError


@click.group("kbs")
def kbs() -> None:
    """The Key Broker Service (owner side)."""


@kbs.command("serve")
@click.option(
    "--config",
    "-c",
    "config_file",
    type=click.Path(dir_okay=False),
    envvar="KBS_CONFIG_FILE",
    help="kbs-config.toml (upstream shape).",
)
@click.option("--listen", help="HOST:PORT to listen on (quick form).")
@click.option("--insecure-http", is_flag=True, help="Serve plain HTTP (INSECURE).")
@click.option("--private-key", type=click.Path(exists=True, dir_okay=False), help="TLS key (PEM).")
@click.option(
    "--certificate", type=click.Path(exists=True, dir_okay=False), help="TLS certificate (PEM)."
)
@click.option(
    "--storage", help="sqlite:///path/kbs.db, postgresql://user@host:port/db or memory://."
)
@click.option(
    "--workers", type=int, default=1, show_default=True, help="Worker processes (pre-forked)."
)
@click.option(
    "--session-storage",
    help="Where sessions live (default: memory with SQLite storage, else the storage).",
)
@click.option(
    "--admin-public-key",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM key of the admin token issuer (AuthenticatedAuthorization, role 'admin').",
)
@click.option("--deny-admin", is_flag=True, help="Refuse every admin call (DenyAll).")
@click.option(
    "--insecure-header-jwk",
    is_flag=True,
    help="Trust any token that carries its own key (INSECURE, testing).",
)
@click.option("--session-timeout", type=int, default=5, show_default=True, help="Session minutes.")
@click.option(
    "--max-body-mb", type=int, default=2, show_default=True, help="Request body limit (MiB)."
)
@click.option(
    "--max-header-kb", type=int, default=256, show_default=True, help="Request header limit (KiB)."
)
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
) -> None:
    """Serve KBS protocol 0.4.0. Either --config FILE, or the quick form:

    coco kbs serve --listen 127.0.0.1:8080 --insecure-http --storage sqlite:///tmp/kbs.db

    The quick form's admin API is open (InsecureAllowAll, with a warning) unless
    --admin-public-key or --deny-admin is given.
    """
    from coco.trustee.config import AdminIdp, KbsConfig
    from coco.trustee.kbs.server import serve as run

    if config_file:
        if listen or storage or session_storage or insecure_http or admin_public_key or deny_admin:
            raise UsageError("--config cannot be combined with the quick-form options")
        cfg = KbsConfig.load(config_file)
    else:
        if not listen:
            raise UsageError("give --config FILE, or --listen HOST:PORT (quick form)")
        if not insecure_http and not (private_key and certificate):
            raise UsageError("HTTPS needs --private-key and --certificate (or --insecure-http)")
        cfg = KbsConfig()
        cfg.http_server.sockets = [listen]
        cfg.http_server.insecure_http = insecure_http
        cfg.http_server.private_key = private_key
        cfg.http_server.certificate = certificate
        cfg.http_server.payload_request_size = max_body_mb
        cfg.http_server.request_header_size = max_header_kb
        cfg.storage_url = storage or "sqlite://" + _default_db()
        cfg.session_storage_url = session_storage
        cfg.http_server.worker_count = workers
        cfg.insecure_header_jwk = insecure_header_jwk
        cfg.session_timeout_min = session_timeout
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
    run(cfg)


def _default_db() -> str:
    import os

    return os.path.abspath("kbs.db")
