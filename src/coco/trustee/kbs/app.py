"""The KBS application: protocol 0.4.0, admin API, health and metrics, request in, reply out.

Routes, as upstream: ``POST /kbs/v0/auth``, ``POST /kbs/v0/attest``, ``GET|POST|DELETE
/kbs/v0/resource/<repo>/<type>/<tag>``, ``POST /kbs/v0/attestation-policy``, ``POST|GET
/kbs/v0/resource-policy``, ``POST /kbs/v0/reference-value``, ``GET
/kbs/v0/reference-value/<id>``, ``GET /healthz`` (the process answers), ``GET /readyz`` (and its
storage answers: 503 when not), ``GET /metrics``. All state (resources,
policies, reference values, the token-signing key, and sessions unless a single process owns a
SQLite file) lives in the store, so replicas on one PostgreSQL database serve any step of any
client.

Deviations from upstream, on purpose: a session's nonce is good for one ``/attest`` only; a second
attempt (replay) is refused instead of answering the stored token again. A session keeps only what
``/attest`` needs (TEE, challenge, expiry), not the ``/auth`` request, whose ``extra-params`` may
be at most 64 KiB; at most ``max_pending_sessions`` sessions per server may wait for their
``/attest`` (503 past it). Policies are evaluated in worker processes bounded in time and memory
(:mod:`coco.trustee.policy_engine`), and refused at upload when their rules are recursive. The
resource policy may define ``deny_reason`` (a string) to say why it refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from coco.crypto.jose import JoseError, jwe_encrypt
from coco.errors import CocoError, RegoError
from coco.jsonio import loads as json_loads
from coco.protocol.kbs import (
    PROTOCOL_VERSION,
    SESSION_COOKIE,
    Attestation,
    Challenge,
    ProtocolError,
    Request,
)
from coco.protocol.resource_uri import ResourceUri, ResourceUriError
from coco.rego import RegoPolicy
from coco.tee import verifier_names
from coco.trustee.attestation.ear import TokenSigner
from coco.trustee.attestation.service import (
    AttestationService,
    VerificationRequest,
    parse_init_data,
)
from coco.trustee.config import KbsConfig
from coco.trustee.kbs import logs, session
from coco.trustee.kbs.admin import Acl, AdminAuth, AdminAuthError, IdentityProvider
from coco.trustee.kbs.errors import KbsHttpError
from coco.trustee.kbs.metrics import Metrics
from coco.trustee.kbs.token import TokenVerifier, TokenVerifierError, tee_pubkey_of
from coco.trustee.policy_engine import PolicyEngine
from coco.trustee.rvps import Rvps, RvpsError
from coco.trustee.storage import NS_KBS, NS_REPOSITORY, NS_SESSION, Store, open_store

log = logging.getLogger("coco.kbs")

RESOURCE_POLICY_KEY = "resource-policy.rego"
MAX_RESOURCE_KEY = 512  # bytes of repository/type/tag the storage keeps (storage.base.check_key)
MAX_EXTRA_PARAMS = 64 * 1024  # bytes of an /auth request's extra-params (real clients send ~80)
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)
_JSON = [(b"content-type", b"application/json")]


@functools.cache
def default_resource_policy() -> str:
    import importlib.resources

    return (
        importlib.resources.files("coco.trustee.attestation") / "policies" / "default_resource.rego"
    ).read_text()


def compile_resource_policy(text: str) -> RegoPolicy:
    """A resource policy (package ``policy``): ``allow``, and optionally ``deny_reason``."""
    return RegoPolicy(text, "resource policy", package="policy", rules=("allow", "deny_reason"))


class _BodyError(CocoError):
    """A request body that is not readable JSON."""


def _read_json(body: bytes, what: str, variant: str) -> Any:
    """The JSON document of a request body, or a 400 refusal saying why it is not one."""
    try:
        return json_loads(body, what=what, error=_BodyError)
    except _BodyError as e:
        raise KbsHttpError(variant, str(e), status=400) from None


def _b64url_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a base64url string")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("utf-8")
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where}: not base64url UTF-8 text: {e}") from None


_DATE_CACHE: dict[tuple[str, int], str] = {}


def _fmt_time(ts: float, fmt: str) -> str:
    key = (fmt, int(ts))
    text = _DATE_CACHE.get(key)
    if text is None:
        if len(_DATE_CACHE) > 64:
            _DATE_CACHE.clear()
        text = _DATE_CACHE[key] = time.strftime(fmt, time.gmtime(int(ts)))
    return text


def _http_date(ts: float) -> str:
    return _fmt_time(ts, "%a, %d %b %Y %H:%M:%S GMT")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] | None = None


class KbsApp:
    """The whole KBS: :meth:`handle` turns one parsed HTTP request into a :class:`Reply`."""

    def __init__(self, config: KbsConfig, store: Store | None = None):
        self.config = config
        # What needs no storage first: a start that fails here leaves nothing behind.
        self.admin = AdminAuth(
            config.admin_mode,
            [IdentityProvider(**vars(i)) for i in config.admin_idps],
            [Acl(role, ep) for role, ep in config.admin_acls],
        )
        self.policy_engine = PolicyEngine(config.policy_limits)
        self.max_pending = config.max_pending_sessions
        self._pending: OrderedDict[str, float] = OrderedDict()  # session id -> expiry, oldest first
        self.store = store or open_store(config.storage_url)
        if config.session_storage_url:
            self.session_store = open_store(config.session_storage_url)
        elif self.store.url.startswith(("sqlite:", "localfs:")):
            # One process owns a SQLite file: sessions (short-lived, write-heavy) stay in memory
            # unless session_storage_type says otherwise. PostgreSQL shares them between replicas.
            self.session_store = open_store("memory://")
        else:
            self.session_store = self.store
        self.session_ttl = 60 * config.session_timeout_min
        self.body_limit = config.http_server.payload_request_size * 1024 * 1024
        self.header_limit = config.http_server.request_header_size * 1024
        self.rvps = Rvps(self.store)
        if config.signer_key_path:
            signer = TokenSigner.from_files(
                config.signer_key_path, config.signer_cert_path, config.signer_cert_url
            )
        else:
            signer = TokenSigner.from_store(self.store)
        self.attestation = AttestationService(
            self.store,
            self.rvps,
            signer,
            duration_min=config.token_duration_min,
            issuer=config.token_issuer,
            developer=config.token_developer,
            build=config.token_build,
            verbose_token=config.verbose_token,
            engine=self.policy_engine,
            verifier_settings=config.verifier_settings,
        )
        self.tokens = TokenVerifier(
            own_keys=[signer.key.public_key()],
            trusted_certs_paths=config.trusted_certs_paths,
            trusted_jwk_sets=config.trusted_jwk_sets,
            insecure_header_jwk=config.insecure_header_jwk,
        )
        self.store.put(
            NS_KBS, RESOURCE_POLICY_KEY, default_resource_policy().encode(), overwrite=False
        )
        self._resource_policy: RegoPolicy | None = None
        self._decisions: dict[tuple[str, str, str, str], tuple[bool, str]] = {}
        self.metrics = Metrics()

    # ------------------------------------------------------------------------------- ASGI

    def refuse(self, e: KbsHttpError, method: str, path: str, client: str) -> Reply:
        log.warning("refused %s %s from %s: %s: %s", method, path, client, e.variant, e.detail)
        return Reply(e.status, e.body(), list(_JSON))

    async def handle(
        self,
        method: str,
        path: str,
        query_string: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        body: bytes,
        client: str,
        early: KbsHttpError | None = None,
    ) -> Reply:
        """One request in, one reply out (``content-length`` set); never raises."""
        start = time.perf_counter()
        reply: Reply
        try:
            if early is not None:
                raise early
            reply = await self._route(method, path, query_string, raw_headers, body)
        except KbsHttpError as e:
            reply = self.refuse(e, method, path, client)
        except RecursionError:  # a nested document some parser below us followed too deep
            err = KbsHttpError("HTTPFailed", "request: expected JSON of reasonable depth, found "
                               "a document nested too deeply to read", status=400)  # fmt: skip
            reply = self.refuse(err, method, path, client)
        except Exception as e:  # a bug: still answer ErrorInformation, never a bare 500 page
            log.exception("internal error on %s %s", method, path)
            err = KbsHttpError("HTTPFailed", f"internal error: {type(e).__name__}: {e}")
            reply = Reply(500, err.body(), list(_JSON))
        if reply.headers is None:
            reply.headers = []
        reply.headers.append((b"content-length", str(len(reply.body)).encode()))
        m = self.metrics
        m.inc("kbs_http_requests_total", method=method, status=str(reply.status))
        m.observe("kbs_http_request_duration_seconds", time.perf_counter() - start, method=method)
        m.observe("kbs_http_request_size_bytes", float(len(body)))
        m.observe("kbs_http_response_size_bytes", float(len(reply.body)))
        logs.access(method, path, reply.status, (time.perf_counter() - start) * 1000, client)
        return reply

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(60)
            self._forget_expired()
            try:
                n = self.session_store.sweep(NS_SESSION)
                if n:
                    log.debug("swept %d expired sessions", n)
            except CocoError as e:
                log.warning("session sweep failed: %s", e)

    # ------------------------------------------------------------------------------ routing

    async def _route(
        self,
        method: str,
        path: str,
        query_bytes: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> Reply:
        if path == "/healthz":
            if method != "GET":
                raise KbsHttpError("MethodNotAllowed", f"{method} /healthz: only GET")
            return Reply(200, b"", [(b"content-type", b"text/plain")])
        if path == "/readyz":
            if method != "GET":
                raise KbsHttpError("MethodNotAllowed", f"{method} /readyz: only GET")
            try:
                await asyncio.to_thread(self.store.ready)
            except CocoError as e:
                raise KbsHttpError("HTTPFailed", f"storage not ready: {e}", status=503) from None
            return Reply(200, b"ready\n", [(b"content-type", b"text/plain")])
        if path == "/metrics":
            if method != "GET":
                raise KbsHttpError("MethodNotAllowed", f"{method} /metrics: only GET")
            return Reply(
                200, self.metrics.render(), [(b"content-type", b"text/plain; version=0.0.4")]
            )
        if not path.startswith("/kbs/v0/"):
            raise KbsHttpError(
                "InvalidRequestPath", f"Invalid request path: {path}: expected /kbs/v0/..."
            )
        if method not in ("GET", "POST", "PUT", "DELETE"):
            raise KbsHttpError(
                "MethodNotAllowed", f"{method} {path}: expected GET, POST, PUT or DELETE"
            )
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        rest = path[len("/kbs/v0/") :]
        parts = rest.split("/")
        plugin, sub = parts[0], parts[1:]
        query_string = query_bytes.decode("latin-1")
        uri = path + ("?" + query_string if query_string else "")
        if method == "POST" and plugin == "auth" and not sub:
            return self._auth(body)
        if method == "POST" and plugin == "attest" and not sub:
            return await self._attest(headers, body)
        if plugin == "attestation-policy" and method == "POST" and not sub:
            self._admin(headers, uri)
            return self._set_attestation_policy(body)
        if plugin == "resource-policy" and not sub and method in ("POST", "GET"):
            self._admin(headers, uri)
            if method == "GET":
                ids = [
                    k.removesuffix(".rego") for k in self.store.keys(NS_KBS) if k.endswith(".rego")
                ]
                return Reply(200, json.dumps(ids).encode(), list(_JSON))
            return self._set_resource_policy(body)
        if plugin == "reference-value":
            if method == "POST" and not sub:
                self._admin(headers, uri)
                message = _read_json(body, "reference-value body", "RvpsError")
                try:
                    self.rvps.register(message)
                except RvpsError as e:
                    raise KbsHttpError("RvpsError", f"RVPS error: {e}") from None
                return Reply(200)
            if method == "GET" and sub:
                self._admin(headers, uri)
                rv_id = "/".join(sub)
                value = self.rvps.query(rv_id)
                if value is None:
                    raise KbsHttpError(
                        "RvpsError", f"No reference value found for the given id: {rv_id}"
                    )
                return Reply(200, json.dumps(value).encode(), list(_JSON))
        if plugin == "resource":
            return await self._resource(method, headers, uri, sub, query_string, body)
        raise KbsHttpError("PluginNotFound", f"Plugin {plugin} not found")

    def _admin(self, headers: dict[str, str], uri: str) -> None:
        try:
            self.admin.check(headers.get("authorization"), uri)
        except AdminAuthError as e:
            raise KbsHttpError("AdminAuthAccess", str(e)) from None

    # ------------------------------------------------------------------------------ RCAR

    def _auth(self, body: bytes) -> Reply:
        m = self.metrics
        m.inc("kbs_auth_requests_total")
        doc = _read_json(body, "Request (/kbs/v0/auth body)", "AttestationError")
        try:
            req = Request.from_json(doc)
            extra = len(json.dumps(req.extra_params, separators=(",", ":")))
            if extra > MAX_EXTRA_PARAMS:
                raise ProtocolError(
                    f"Request.extra-params: expected at most {MAX_EXTRA_PARAMS} bytes of JSON, "
                    f"found {extra}"
                )
            if not _SEMVER.match(req.version):
                raise ProtocolError(f"Request.version: {req.version!r} is not a semantic version")
            if req.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"KBS Client Protocol Version Mismatch: expect ={PROTOCOL_VERSION} while the "
                    f"request is {req.version}"
                )
            if req.tee not in verifier_names():
                raise ProtocolError(
                    f"unknown TEE {req.tee!r}: this KBS verifies {', '.join(verifier_names())}"
                )
        except ProtocolError as e:
            m.inc("kbs_auth_errors_total")
            raise KbsHttpError(
                "AttestationError", f"Attestation error: RCAR handshake Auth failed: {e}"
            ) from None
        now = time.time()
        self._forget_expired(now)
        if len(self._pending) >= self.max_pending:
            m.inc("kbs_auth_errors_total")
            raise KbsHttpError(
                "AttestationError",
                f"Attestation error: RCAR handshake Auth failed: this KBS already holds "
                f"{len(self._pending)} sessions waiting for /attest, its limit "
                f"(attestation_service.max_pending_sessions = {self.max_pending}); retry later",
                status=503,
            )
        nonce = base64.b64encode(os.urandom(32)).decode()
        challenge = Challenge(nonce, "")
        sid = uuid.uuid4().hex
        expires = now + self.session_ttl
        state = session.Authed(sid, req.tee, challenge, session.rfc3339(expires))
        self.session_store.put(NS_SESSION, sid, state.dump(), expires=expires)
        self._pending[sid] = expires
        m.inc("kbs_auth_successes_total")
        return Reply(
            200, json.dumps(challenge.to_json()).encode(), [*_JSON, self._cookie(sid, expires)]
        )

    def _forget_expired(self, now: float | None = None) -> None:
        """Drop expired sessions from the pending count (the oldest come first)."""
        now = time.time() if now is None else now
        pending = self._pending
        while pending:
            sid, expires = next(iter(pending.items()))
            if expires > now:
                break
            del pending[sid]

    @staticmethod
    def _cookie(sid: str, expires: float) -> tuple[bytes, bytes]:
        return (b"set-cookie", f"{SESSION_COOKIE}={sid}; Expires={_http_date(expires)}".encode())

    @staticmethod
    def _session_id(headers: dict[str, str]) -> str | None:
        cookie = headers.get("cookie")
        if not cookie:
            return None
        for part in cookie.split(";"):
            name, _, value = part.strip().partition("=")
            if name == SESSION_COOKIE and re.fullmatch(r"[0-9a-f]{32}", value):
                return value
        return None

    def _load_session(self, sid: str) -> session.Session | None:
        return session.load(self.session_store.get(NS_SESSION, sid))

    async def _attest(self, headers: dict[str, str], body: bytes) -> Reply:
        m = self.metrics
        m.inc("kbs_attestation_requests_total")

        def fail(msg: str, variant: str = "AttestationError") -> KbsHttpError:
            m.inc("kbs_attestation_errors_total")
            return KbsHttpError(variant, f"Attestation error: RCAR handshake Attest failed: {msg}")

        sid = self._session_id(headers)
        if sid is None:
            raise fail(f"no valid {SESSION_COOKIE} cookie: call /kbs/v0/auth first")
        state = self._load_session(sid)
        if state is None:
            raise fail(f"session {sid} not found or expired")
        if not isinstance(state, session.Authed):
            raise fail(f"session {sid}: its nonce was already used; start again with /kbs/v0/auth")
        # Claim the nonce: only one /attest per session, even with concurrent replicas.
        self._pending.pop(sid, None)
        if not self.session_store.delete(NS_SESSION, sid):
            raise fail(f"session {sid}: its nonce was already used; start again with /kbs/v0/auth")
        tee, challenge = state.tee, state.challenge
        doc = _read_json(body, "Attestation (/kbs/v0/attest body)", "AttestationError")
        try:
            att = Attestation.from_json(doc)
        except ProtocolError as e:
            raise fail(str(e)) from None
        init_data = None
        if att.init_data is not None:
            try:  # unreadable init-data is the client's fault: 400, before any verification
                init_data = parse_init_data(att.init_data)
            except CocoError as e:
                m.inc("kbs_attestation_errors_total")
                raise KbsHttpError(
                    "AttestationError",
                    f"Attestation error: RCAR handshake Attest failed: {e}",
                    status=400,
                ) from None
        rd = att.runtime_data
        if rd.nonce != challenge.nonce:
            raise fail("runtime-data.nonce is not the nonce of this session's challenge")
        try:  # kty/alg were checked by the parser; the key itself must load
            rd.tee_pubkey.public_key("runtime-data.tee-pubkey")
        except ProtocolError as e:
            raise fail(str(e)) from None
        hash_alg = challenge.hash_algorithm()
        ev = att.tee_evidence
        requests = [
            VerificationRequest(
                tee,
                ev.primary_evidence,
                rd.nonce,
                rd.tee_pubkey,
                ev.additional_evidence,
                hash_alg,
                init_data,
            )
        ]
        try:
            for dev_tee, dev_evidence in ev.additional().items():
                requests.append(
                    VerificationRequest(
                        dev_tee, dev_evidence, rd.nonce, rd.tee_pubkey, None, hash_alg
                    )
                )
        except ProtocolError as e:
            raise fail(str(e)) from None
        try:  # off the event loop: verifiers are CPU work, policies run in bounded workers
            token, payload = await asyncio.to_thread(self.attestation.issue, requests)
        except CocoError as e:
            m.inc("kbs_attestation_failures_total", tee_type=tee)
            log.warning("attestation of session %s (%s) failed: %s", sid, tee, e)
            raise KbsHttpError(
                "AttestationError", f"Attestation error: RCAR handshake Attest failed: {e}"
            ) from None
        self.tokens.remember(token, payload)
        expires = time.time() + self.session_ttl
        attested = session.Attested(sid, token, session.rfc3339(expires))
        self.session_store.put(NS_SESSION, sid, attested.dump(), expires=expires)
        m.inc("kbs_attestation_successes_total", tee_type=tee)
        return Reply(
            200, json.dumps({"token": token}).encode(), [*_JSON, self._cookie(sid, expires)]
        )

    # ------------------------------------------------------------------------------ admin

    def _json_body(self, body: bytes, what: str) -> dict[str, Any]:
        obj = _read_json(body, f"{what} body", "SerdeError")
        if not isinstance(obj, dict):
            raise KbsHttpError("SerdeError", f"{what}: expected a JSON object")
        return obj

    def _set_attestation_policy(self, body: bytes) -> Reply:
        obj = self._json_body(body, "attestation-policy")
        unknown = set(obj) - {"type", "policy_id", "policy"}
        if unknown:
            raise KbsHttpError(
                "SerdeError", f"attestation-policy: unknown field(s) {sorted(unknown)}"
            )
        policy_id = obj.get("policy_id")
        if not isinstance(policy_id, str):
            raise KbsHttpError("SerdeError", "attestation-policy: policy_id: expected a string")
        try:
            text = _b64url_text(obj.get("policy"), "attestation-policy.policy")
            self.attestation.set_policy(policy_id, text)
        except (ValueError, CocoError) as e:
            raise KbsHttpError(
                "PolicyEngineError", f"Set attestation policy failed: {e}", status=400
            ) from None
        log.info("attestation policy %s set", policy_id)
        return Reply(200)

    def _set_resource_policy(self, body: bytes) -> Reply:
        obj = self._json_body(body, "resource-policy")
        unknown = set(obj) - {"policy"}
        if unknown:
            raise KbsHttpError("SerdeError", f"resource-policy: unknown field(s) {sorted(unknown)}")
        try:
            text = _b64url_text(obj.get("policy"), "resource-policy.policy")
            policy = compile_resource_policy(text)
            policy.check_recursion()
        except (ValueError, RegoError) as e:
            raise KbsHttpError(
                "PolicyEngineError", f"Set resource policy failed: {e}", status=400
            ) from None
        self.store.put(NS_KBS, RESOURCE_POLICY_KEY, text.encode())
        self._resource_policy = policy
        log.info("resource policy set")
        return Reply(200)

    def resource_policy(self) -> RegoPolicy:
        raw = self.store.get(NS_KBS, RESOURCE_POLICY_KEY)
        text = raw.decode() if raw is not None else default_resource_policy()
        cached = self._resource_policy
        if cached is not None and cached.text == text:
            return cached
        self._resource_policy = compile_resource_policy(text)
        return self._resource_policy

    # ------------------------------------------------------------------------------ resources

    async def _resource(
        self, method: str, headers: dict[str, str], uri: str, sub: list[str], qs: str, body: bytes
    ) -> Reply:
        m = self.metrics
        m.inc("kbs_plugin_requests_total", plugin="resource")
        key = "/".join(sub)
        try:
            ResourceUri.from_path(key, "resource")
        except ResourceUriError as e:
            m.inc("kbs_plugin_errors_total", plugin="resource")
            raise KbsHttpError("InvalidRequestPath", f"Invalid request path: {e}") from None
        if len(key.encode()) > MAX_RESOURCE_KEY:
            m.inc("kbs_plugin_errors_total", plugin="resource")
            raise KbsHttpError(
                "InvalidRequestPath",
                f"Invalid request path: resource/{key[:64]}...: expected at most "
                f"{MAX_RESOURCE_KEY} bytes of <repository>/<type>/<tag>, found {len(key.encode())}",
                status=400,
            )
        if method in ("POST", "PUT", "DELETE"):
            self._admin(headers, uri)
            if method == "DELETE":
                if not self.store.delete(NS_REPOSITORY, key):
                    raise KbsHttpError(
                        "PluginInternalError", f"Plugin internal error: resource not found: {key}"
                    )
                m.inc("kbs_resource_deletes_total", resource_path=key)
                log.info("resource %s deleted", key)
            else:
                self.store.put(NS_REPOSITORY, key, body)
                m.inc("kbs_resource_writes_total", resource_path=key)
                log.info("resource %s written (%d bytes)", key, len(body))
            return Reply(200, b"", [(b"content-type", b"text/xml")])
        # GET: an attested caller.
        token = None
        sid = self._session_id(headers)
        if sid is not None:
            state = self._load_session(sid)
            if isinstance(state, session.Attested):
                token = state.token
        if token is None:
            auth = headers.get("authorization", "")
            if auth.startswith("Bearer "):
                token = auth[len("Bearer ") :].strip()
        if not token:
            raise KbsHttpError("TokenNotFound", "Attestation Token not found")
        try:
            claims = self.tokens.verify(token)
        except TokenVerifierError as e:
            raise KbsHttpError("TokenVerifierError", f"Token Verifier error: {e}") from None
        data = {"plugin": "resource", "resource-path": sub, "query": dict(parse_qsl(qs))}
        m.inc("kbs_policy_evaluations_total")
        try:
            policy = self.resource_policy()
            # The decision is a pure function of (policy, verified token, request data).
            dkey = (policy.digest, token, key, qs)
            decision = self._decisions.get(dkey)
            if decision is None:
                result = await asyncio.to_thread(self.policy_engine.evaluate, policy, claims, data)
                reason = result.get("deny_reason")
                decision = (result.get("allow") is True, reason if isinstance(reason, str) else "")
                self._decisions[dkey] = decision
                if len(self._decisions) > 8192:
                    self._decisions.pop(next(iter(self._decisions)))
        except RegoError as e:
            m.inc("kbs_policy_errors_total")
            raise KbsHttpError("PolicyEngineError", f"Policy engine error: {e}") from None
        allowed, reason = decision
        if not allowed:
            m.inc("kbs_policy_violations_total")
            raise KbsHttpError(
                "PolicyDeny",
                f"Access denied by policy: resource {key}: refused by the KBS resource policy"
                + (f": {reason[:500]}" if reason else ""),
            )
        m.inc("kbs_policy_approvals_total")
        value = self.store.get(NS_REPOSITORY, key)
        if value is None:
            m.inc("kbs_plugin_errors_total", plugin="resource")
            raise KbsHttpError(
                "PluginInternalError", f"Plugin internal error: resource not found: {key}"
            )
        try:
            jwe = jwe_encrypt(tee_pubkey_of(claims), value)
        except (JoseError, TokenVerifierError) as e:
            raise KbsHttpError("JweError", f"JWE error: {e}") from None
        m.inc("kbs_resource_reads_total", resource_path=key)
        return Reply(200, json.dumps(jwe).encode(), list(_JSON))


__all__ = ["KbsApp", "default_resource_policy"]
