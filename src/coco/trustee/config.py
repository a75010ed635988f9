"""``kbs-config.toml``: the upstream shape, parsed strictly (an unknown key is an error naming it).

Sections: ``[http_server]``, ``[attestation_token]``, ``[attestation_service]`` (built-in only,
with ``attestation_token_broker``, ``rvps_config``, ``verifier_config``), ``[admin]``,
``[storage_backend]``, ``session_storage_type``, ``[[plugins]]``. Storage types: ``Sqlite``
(ours, ``backends.sqlite.path``), ``Postgres`` (``backends.postgres`` host/port/db/username/
password, or env ``POSTGRES_URL``), ``Memory``, and ``LocalFs`` (each resource the file
``<dir_path>/<repository>/<type>/<tag>``, as upstream's LocalFs repository; the other namespaces
in ``<dir_path>/.coco-kbs.sqlite``). ``verifier_config.tpm_verifier.trusted_ak_keys_dir`` is
handed to the TPM verifier. Our additions: ``http_server.request_header_size``
(KiB, default 256), ``storage_backend.url``, ``attestation_service.max_pending_sessions`` (sessions
that called /auth but not yet /attest, per server; default 10000) and, in ``[policy_engine]``,
the bounds of one policy evaluation: ``timeout_sec`` (default 3), ``memory_limit_mb`` (default
1024) and ``workers`` (evaluations at once per server, default 2). Counts and sizes must be > 0.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from coco.errors import KbsError
from coco.jsonfields import Fields
from coco.trustee.policy_engine import PolicyLimits

log = logging.getLogger(__name__)


class ConfigError(KbsError):
    """A kbs-config.toml that is not what we accept."""


_FIELDS = Fields(ConfigError, noun="key")


def _table(d: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    return _FIELDS.check(d, where, optional=allowed)


def _positive(
    d: dict[str, Any], key: str, where: str, default: Any, typ: type | tuple = int
) -> Any:
    v = _FIELDS.get(d, key, where, typ, default)
    if v is not None and v <= 0:
        raise ConfigError(f"{where}.{key}: expected a number > 0, found {v!r}")
    return v


def parse_socket(address: str, where: str = "http_server.sockets") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; an empty host is 0.0.0.0) with a port in 1-65535."""
    host, sep, port_s = address.rpartition(":")
    if not sep or not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT with a port in 1-65535, found {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port_s)


@dataclass
class HttpServer:
    sockets: list[str] = field(default_factory=lambda: ["127.0.0.1:8080"])
    insecure_http: bool = False
    private_key: str | None = None
    certificate: str | None = None
    payload_request_size: int = 2  # MiB
    request_header_size: int = 256  # KiB
    worker_count: int | None = None


@dataclass
class AdminIdp:
    issuer: str | None = None
    audience: str | None = None
    public_key_uri: str | None = None
    jwk_set_uri: str | None = None


@dataclass
class KbsConfig:
    http_server: HttpServer = field(default_factory=HttpServer)
    trusted_certs_paths: list[str] = field(default_factory=list)
    trusted_jwk_sets: list[str] = field(default_factory=list)
    extra_teekey_paths: list[str] = field(default_factory=list)
    insecure_header_jwk: bool = False
    session_timeout_min: int = 5
    # Sessions that called /auth and not yet /attest, per server. Each now costs ~0.5 KiB (nonce,
    # TEE, expiry), so 10000 is ~5 MB; a guest attests within seconds of its /auth, so even a
    # fleet booting at once stays far below it, while a flood gets a 503 instead of memory.
    max_pending_sessions: int = 10000
    policy_limits: PolicyLimits = field(default_factory=PolicyLimits)
    token_duration_min: int = 5
    token_issuer: str = "CoCo-Attestation-Service"
    token_developer: str = "https://confidentialcontainers.org"
    token_build: str = "coco attestation-service 0.1.0"
    verbose_token: bool = True
    signer_key_path: str | None = None
    signer_cert_path: str | None = None
    signer_cert_url: str | None = None
    # TEE wire name -> keyword arguments of its verifier (coco.tee.get_verifier)
    verifier_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    admin_mode: str = "InsecureAllowAll"
    admin_idps: list[AdminIdp] = field(default_factory=list)
    admin_acls: list[tuple[str, str]] = field(default_factory=list)
    storage_url: str = "memory://"
    session_storage_url: str | None = None

    @classmethod
    def load(cls, path: str) -> KbsConfig:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"KBS config {path}: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"KBS config {path}: not valid TOML: {e}") from None
        try:
            return cls.from_dict(doc)
        except ConfigError as e:
            raise ConfigError(f"KBS config {path}: {e}") from None

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> KbsConfig:
        _table(doc, "config", {
            "http_server", "attestation_token", "attestation_service", "admin",
            "storage_backend", "session_storage_type", "plugins", "policy_engine",
        })  # fmt: skip
        c = cls()
        hs = _table(doc.get("http_server", {}), "http_server", {
            "sockets", "insecure_http", "private_key", "certificate", "payload_request_size",
            "request_header_size", "worker_count", "tls_profile", "tls_min_version",
            "tls_max_version", "tls_ciphers", "tls_groups",
        })  # fmt: skip
        for k in ("tls_ciphers", "tls_groups", "tls_min_version", "tls_max_version"):
            if k in hs:
                raise ConfigError(
                    f"http_server.{k}: not supported (TLS uses Python's defaults, TLS >= 1.2)"
                )
        c.http_server = HttpServer(
            sockets=_FIELDS.strings(hs, "sockets", "http_server", []) or ["127.0.0.1:8080"],
            insecure_http=_FIELDS.get(hs, "insecure_http", "http_server", bool, False),
            private_key=_FIELDS.get(hs, "private_key", "http_server", str, None),
            certificate=_FIELDS.get(hs, "certificate", "http_server", str, None),
            payload_request_size=_positive(hs, "payload_request_size", "http_server", 2),
            request_header_size=_positive(hs, "request_header_size", "http_server", 256),
            worker_count=_positive(hs, "worker_count", "http_server", None),
        )
        for address in c.http_server.sockets:
            parse_socket(address)
        if "tls_profile" in hs:
            log.warning("http_server.tls_profile: ignored (Python's TLS defaults, TLS >= 1.2)")
        if not c.http_server.insecure_http and not (
            c.http_server.private_key and c.http_server.certificate
        ):
            raise ConfigError(
                "http_server: HTTPS needs private_key and certificate (or set insecure_http = true)"
            )
        at = _table(doc.get("attestation_token", {}), "attestation_token", {
            "trusted_certs_paths", "trusted_jwk_sets", "extra_teekey_paths", "insecure_header_jwk",
        })  # fmt: skip
        c.trusted_certs_paths = _FIELDS.strings(at, "trusted_certs_paths", "attestation_token", [])
        c.trusted_jwk_sets = _FIELDS.strings(at, "trusted_jwk_sets", "attestation_token", [])
        c.extra_teekey_paths = _FIELDS.strings(at, "extra_teekey_paths", "attestation_token", [])
        c.insecure_header_jwk = _FIELDS.get(
            at, "insecure_header_jwk", "attestation_token", bool, False
        )
        c._load_as(doc.get("attestation_service", {}))
        pe = _table(doc.get("policy_engine", {}), "policy_engine", {
            "policy_path", "timeout_sec", "memory_limit_mb", "workers",
        })  # fmt: skip
        if "policy_path" in pe:
            log.warning("policy_engine.policy_path: ignored (set the policy with the admin API)")
        c.policy_limits = PolicyLimits(
            timeout_sec=float(_positive(pe, "timeout_sec", "policy_engine", 3.0, (int, float))),
            memory_limit_mb=_positive(pe, "memory_limit_mb", "policy_engine", 1024),
            workers=_positive(pe, "workers", "policy_engine", 2),
        )
        c._load_admin(doc)
        c._load_storage(doc)
        for i, p in enumerate(_FIELDS.get(doc, "plugins", "config", list, [])):
            w = f"plugins[{i}]"
            _table(p, w, {"name", "storage_backend_type"})
            if p.get("name") != "resource":
                raise ConfigError(
                    f"{w}.name: only the 'resource' plugin is available, found {p.get('name')!r}"
                )
            if p.get("storage_backend_type", "kvstorage") != "kvstorage":
                raise ConfigError(f"{w}.storage_backend_type: only 'kvstorage' is available")
        return c

    def _load_as(self, a: Any) -> None:
        w = "attestation_service"
        if isinstance(a, dict) and a.get("type", "coco_as_builtin") != "coco_as_builtin":
            raise ConfigError(f"{w}.type: only 'coco_as_builtin' is available, found {a['type']!r}")
        _table(a, w, {
            "type", "timeout", "attestation_token_broker", "rvps_config", "verifier_config",
            "max_pending_sessions",
        })  # fmt: skip
        kind = _FIELDS.get(a, "type", w, str, "coco_as_builtin")
        if kind != "coco_as_builtin":
            raise ConfigError(f"{w}.type: only 'coco_as_builtin' is available, found {kind!r}")
        self.session_timeout_min = _positive(a, "timeout", w, 5)
        self.max_pending_sessions = _positive(a, "max_pending_sessions", w, 10000)
        tb = _table(a.get("attestation_token_broker", {}), f"{w}.attestation_token_broker", {
            "type", "duration_min", "issuer_name", "developer_name", "build_name", "profile_name",
            "verbose_token", "signer", "policy_dir",
        })  # fmt: skip
        wt = f"{w}.attestation_token_broker"
        if _FIELDS.get(tb, "type", wt, str, "Ear") not in ("Ear", "ear"):
            raise ConfigError(f"{wt}.type: only 'Ear' tokens are issued")
        self.token_duration_min = _FIELDS.get(tb, "duration_min", wt, int, 5)
        self.token_issuer = _FIELDS.get(tb, "issuer_name", wt, str, self.token_issuer)
        self.token_developer = _FIELDS.get(tb, "developer_name", wt, str, self.token_developer)
        self.token_build = _FIELDS.get(tb, "build_name", wt, str, self.token_build)
        self.verbose_token = _FIELDS.get(tb, "verbose_token", wt, bool, True)
        signer = _table(tb.get("signer", {}), f"{wt}.signer", {"key_path", "cert_path", "cert_url"})
        self.signer_key_path = _FIELDS.get(signer, "key_path", f"{wt}.signer", str, None)
        self.signer_cert_path = _FIELDS.get(signer, "cert_path", f"{wt}.signer", str, None)
        self.signer_cert_url = _FIELDS.get(signer, "cert_url", f"{wt}.signer", str, None)
        if signer and not self.signer_key_path:
            raise ConfigError(f"{wt}.signer: key_path is required")
        rv = _table(
            a.get("rvps_config", {}), f"{w}.rvps_config", {"type", "storage_type", "extractors"}
        )
        if _FIELDS.get(rv, "type", f"{w}.rvps_config", str, "BuiltIn") != "BuiltIn":
            raise ConfigError(f"{w}.rvps_config.type: only 'BuiltIn' is available")
        self.verifier_settings = _verifier_settings(_FIELDS.get(a, "verifier_config", w, dict, {}))

    def _load_admin(self, doc: dict[str, Any]) -> None:
        if "admin" not in doc:
            raise ConfigError(
                "[admin] is required: set authorization_mode (DenyAll, AuthenticatedAuthorization or InsecureAllowAll)"
            )
        ad = _table(
            doc["admin"], "admin", {"authorization_mode", "authentication", "authorization"}
        )
        self.admin_mode = _FIELDS.get(ad, "authorization_mode", "admin", str, None)
        if self.admin_mode is None:
            raise ConfigError("admin.authorization_mode: required")
        if self.admin_mode != "AuthenticatedAuthorization":
            if "authentication" in ad or "authorization" in ad:
                raise ConfigError(
                    f"admin: authentication/authorization tables need AuthenticatedAuthorization, not {self.admin_mode}"
                )
            return
        authn = _table(ad.get("authentication", {}), "admin.authentication", {"bearer_jwt"})
        bj = _table(
            authn.get("bearer_jwt", {}), "admin.authentication.bearer_jwt", {"identity_providers"}
        )
        for i, idp in enumerate(
            _FIELDS.get(bj, "identity_providers", "admin.authentication.bearer_jwt", list, [])
        ):
            wi = f"admin.authentication.bearer_jwt.identity_providers[{i}]"
            _table(idp, wi, {"issuer", "audience", "public_key_uri", "jwk_set_uri"})
            self.admin_idps.append(AdminIdp(**{k: _FIELDS.get(idp, k, wi, str, None) for k in idp}))
        authz = _table(ad.get("authorization", {}), "admin.authorization", {"regex_acl"})
        ra = _table(authz.get("regex_acl", {}), "admin.authorization.regex_acl", {"acls"})
        for i, acl in enumerate(_FIELDS.get(ra, "acls", "admin.authorization.regex_acl", list, [])):
            wa = f"admin.authorization.regex_acl.acls[{i}]"
            _table(acl, wa, {"role", "allowed_endpoints"})
            role = _FIELDS.get(acl, "role", wa, str, None)
            ep = _FIELDS.get(acl, "allowed_endpoints", wa, str, None)
            if role is None or ep is None:
                raise ConfigError(f"{wa}: role and allowed_endpoints are required")
            self.admin_acls.append((role, ep))

    def _load_storage(self, doc: dict[str, Any]) -> None:
        sb = _table(
            doc.get("storage_backend", {}), "storage_backend", {"storage_type", "backends", "url"}
        )
        if "url" in sb:
            self.storage_url = _FIELDS.get(sb, "url", "storage_backend", str, None)
        else:
            kind = _FIELDS.get(sb, "storage_type", "storage_backend", str, "Memory")
            self.storage_url = _backend_url(kind, sb.get("backends", {}))
        if "session_storage_type" in doc:
            kind = _FIELDS.get(doc, "session_storage_type", "config", str, None)
            self.session_storage_url = _backend_url(kind, sb.get("backends", {}))


def _verifier_settings(vc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``[attestation_service.verifier_config]`` as the settings of each TEE's verifier."""
    w = "attestation_service.verifier_config"
    out: dict[str, dict[str, Any]] = {}
    for name, table in vc.items():
        if name == "tpm_verifier":
            t = _FIELDS.object(table, f"{w}.{name}")
            folder = _FIELDS.string(t, "trusted_ak_keys_dir", f"{w}.{name}", None)
            if folder is not None:
                out["tpm"] = {"trusted_ak_keys_dir": os.path.abspath(folder)}
            continue
        log.warning("%s.%s: not used by this KBS", w, name)
    return out


def _backend_url(kind: str, backends: Any) -> str:
    w = "storage_backend.backends"
    b = _table(backends, w, {"local_fs", "local_json", "postgres", "redis", "sqlite", "memory"})
    k = kind.lower().replace("_", "")
    if k == "memory":
        return "memory://"
    if k == "sqlite":
        s = _table(b.get("sqlite", {}), f"{w}.sqlite", {"path"})
        path = _FIELDS.get(s, "path", f"{w}.sqlite", str, None)
        if not path:
            raise ConfigError(f"{w}.sqlite.path: required for storage_type Sqlite")
        return "sqlite://" + os.path.abspath(path)
    if k == "localfs":
        s = _table(b.get("local_fs", {}), f"{w}.local_fs", {"dir_path"})
        d = _FIELDS.get(s, "dir_path", f"{w}.local_fs", str, "/opt/confidential-containers/storage")
        return "localfs://" + os.path.abspath(d)
    if k == "postgres":
        s = _table(
            b.get("postgres", {}), f"{w}.postgres", {"host", "port", "db", "username", "password"}
        )
        if not s and os.environ.get("POSTGRES_URL"):
            return os.environ["POSTGRES_URL"]
        host = _FIELDS.get(s, "host", f"{w}.postgres", str, "127.0.0.1")
        port = _FIELDS.get(s, "port", f"{w}.postgres", int, 5432)
        db = _FIELDS.get(s, "db", f"{w}.postgres", str, "postgres")
        user = _FIELDS.get(s, "username", f"{w}.postgres", str, "postgres")
        pw = _FIELDS.get(s, "password", f"{w}.postgres", str, None)
        cred = quote(user, safe="") + (":" + quote(pw, safe="") if pw else "")
        return f"postgresql://{cred}@{host}:{port}/{quote(db, safe='')}"
    raise ConfigError(
        f"storage_backend.storage_type: expected Sqlite, Postgres, LocalFs or Memory, found {kind!r}"
    )
