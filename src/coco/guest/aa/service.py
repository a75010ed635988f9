"""The Attestation Agent: evidence, tokens, runtime measurements and init-data, for the guest.

:class:`AttestationAgent` is the logic (blocking, thread-safe); :class:`AaTtrpcService` answers
upstream's ttRPC service ``attestation_agent.AttestationAgentService`` with it, and :func:`serve`
runs that on upstream's default socket. Error statuses are INTERNAL with upstream's texts
(``[ERROR:attestation-agent] AA-KBC get token failed``, ...) followed by ``: <cause>`` so that a
caller learns why (upstream's bare texts are a known complaint).

``BindInitData`` is implemented (upstream's ttRPC server answers NOT_FOUND, only its gRPC server
implements it): a TPM extends PCR8 with the digest, SNP and TDX check that HOST_DATA / MRCONFIGID
hold it (the host set them at launch), and a TEE without a binding (sample) answers OK with a
warning, as upstream's ``Unsupported``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from coco.errors import AttestationError, CocoError
from coco.guest.aa.config import AaConfig, AaError
from coco.guest.aa.eventlog import DEFAULT_PATH, RuntimeEventLog, event_text
from coco.guest.kbc import CcKbc, Token
from coco.rpc import Code, RpcError
from coco.rpc.protos import attestation_agent_pb2 as pb
from coco.tee.base import Attester

log = logging.getLogger(__name__)

SAMPLE_DEVICE_ENV = "ENABLE_SAMPLE_DEVICE"
OK, NOT_SUPPORTED, NOT_ENABLED = 0, 1, 2
_FITTED_TEES = ("snp", "tdx")  # report data goes into a 64-byte field


class AttestationAgent:
    """One attester, one KBS client, one event log."""

    def __init__(
        self,
        config: AaConfig | None = None,
        attester: Attester | None = None,
        *,
        eventlog_path: Path | str = DEFAULT_PATH,
        init_data_toml: str | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.config = config or AaConfig()
        if attester is None:
            from coco.tee.detect import detect_attester

            attester = detect_attester()
        self.attester = attester
        self.init_data_toml = init_data_toml
        self._environ = os.environ if environ is None else environ
        self._lock = threading.Lock()
        self._kbc: CcKbc | None = None
        self._eventlog: RuntimeEventLog | None = None
        if self.config.eventlog.enable_eventlog:
            self._eventlog = RuntimeEventLog(eventlog_path)

    def close(self) -> None:
        if self._kbc is not None:
            self._kbc.close()

    # -- evidence -----------------------------------------------------------------------------
    def get_tee_type(self) -> str:
        return self.attester.tee

    def get_additional_tees(self) -> list[str]:
        return ["sampledevice"] if SAMPLE_DEVICE_ENV in self._environ else []

    def get_evidence(self, runtime_data: bytes) -> bytes:
        """The primary evidence JSON with ``runtime_data`` as the report data."""
        tee = self.attester.tee
        if tee in _FITTED_TEES and len(runtime_data) > 64:
            raise AaError(
                f"{tee} evidence: runtime data: expected at most 64 bytes, got {len(runtime_data)}"
            )
        with self._lock:
            evidence = self.attester.get_evidence(runtime_data)
        return json.dumps(evidence, separators=(",", ":")).encode()

    def get_additional_evidence(self, runtime_data: bytes) -> bytes:
        """``{"<tee>": <evidence>}`` of the additional devices; empty when there are none."""
        if SAMPLE_DEVICE_ENV not in self._environ:
            return b""
        log.warning("using the INSECURE sample device attester (%s is set)", SAMPLE_DEVICE_ENV)
        ev = {"svn": "2", "report_data": base64.b64encode(runtime_data).decode()}
        return json.dumps({"sampledevice": ev}, separators=(",", ":")).encode()

    # -- tokens -------------------------------------------------------------------------------
    def kbc(self) -> CcKbc:
        kbs = self.config.kbs
        if kbs is None:
            raise AaError(
                "token: no KBS configured: expected [token_configs.kbs] url in aa.toml, or "
                "aa_kbc_params=cc_kbc::<url>"
            )
        if self._kbc is None:
            self._kbc = CcKbc.with_attester(
                kbs.url, self.attester, cert=kbs.cert, key_algorithm=kbs.key_algorithm,
                init_data_toml=self.init_data_toml,
            )  # fmt: skip
        return self._kbc

    def kbs_token(self) -> Token:
        """A fresh KBS token (a new RCAR handshake with a new ephemeral key)."""
        with self._lock:
            return self.kbc().token(refresh=True)

    def get_token(self, token_type: str) -> bytes:
        """``kbs``: JSON ``{"token": ..., "tee_keypair": <PEM>}``, as upstream's AA answers."""
        if token_type == "kbs":
            tok = self.kbs_token()
            reply = {"token": tok.value, "tee_keypair": tok.private_key_pem()}
            return json.dumps(reply).encode()
        if token_type == "coco_as":
            raise AaError("token type coco_as: not supported by this AA (use kbs)")
        raise AaError(f"token type {token_type!r}: expected kbs")

    # -- runtime measurements -----------------------------------------------------------------
    def extend_runtime_measurement(
        self, domain: str, operation: str, content: str, register_index: int | None = None
    ) -> int:
        """Record and measure one event; returns OK, NOT_SUPPORTED or NOT_ENABLED (upstream's)."""
        if self._eventlog is None:
            return NOT_ENABLED
        extend = getattr(self.attester, "extend_runtime_measurement", None)
        if extend is None:
            return NOT_SUPPORTED
        text = event_text(domain, operation, content)
        pcr = self.config.eventlog.init_pcr if register_index is None else register_index
        register = self.attester.measurement_register(pcr)  # type: ignore[attr-defined]
        algorithm = self.attester.runtime_measurement_algorithm  # type: ignore[attr-defined]
        tee = self.attester.tee
        try:
            with self._lock:
                self._eventlog.append(text, register, algorithm, lambda d: extend(d, pcr))
        except AttestationError as e:
            hint = ""
            if tee == "tpm" and 17 <= pcr <= 22:
                hint = " (TPM PCRs 17-22 take extensions from locality 4 only: use 16 or 23)"
            raise AaError(
                f"runtime measurement on the {tee} register for PCR {pcr}: not recorded: {e}{hint}"
            ) from None
        return OK

    # -- init-data ----------------------------------------------------------------------------
    def bind_init_data(self, digest: bytes) -> bool:
        """Bind ``digest`` to the TEE; False when this TEE has no binding (sample)."""
        a = self.attester
        with self._lock:
            if hasattr(a, "bind_init_data"):
                a.bind_init_data(digest)  # TPM: extend PCR8
                return True
            if hasattr(a, "host_data"):
                _expect(a.tee, "HOST_DATA", digest[:32].ljust(32, b"\0"), a.host_data())
                return True
            if hasattr(a, "mr_config_id"):
                _expect(a.tee, "MRCONFIGID", digest[:48].ljust(48, b"\0"), a.mr_config_id())
                return True
        log.warning("init-data: the %s TEE cannot bind it: not bound", a.tee)
        return False


def _expect(tee: str, field: str, expected: bytes, found: bytes) -> None:
    if expected != found:
        raise AaError(
            f"init-data: the {tee} {field} is not the init-data digest: expected "
            f"{expected.hex()}, found {found.hex()}"
        )


# ------------------------------------------------------------------------------------------ ttRPC


class AaTtrpcService:
    """``attestation_agent.AttestationAgentService`` over an :class:`AttestationAgent`."""

    def __init__(self, aa: AttestationAgent) -> None:
        self.aa = aa

    async def _run(self, what: str, func: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(func, *args)
        except (CocoError, OSError, ValueError) as e:
            log.warning("%s: %s", what, e)
            raise RpcError(Code.INTERNAL, f"[ERROR:attestation-agent] {what}: {e}") from None

    async def GetEvidence(self, req: Any, ctx: Any) -> Any:
        ev = await self._run("AA-KBC get evidence failed", self.aa.get_evidence, req.RuntimeData)
        return pb.GetEvidenceResponse(Evidence=ev)

    async def GetAdditionalEvidence(self, req: Any, ctx: Any) -> Any:
        ev = await self._run(
            "AA-KBC get additional evidence failed",
            self.aa.get_additional_evidence,
            req.RuntimeData,
        )
        return pb.GetEvidenceResponse(Evidence=ev)

    async def GetToken(self, req: Any, ctx: Any) -> Any:
        tok = await self._run("AA-KBC get token failed", self.aa.get_token, req.TokenType)
        return pb.GetTokenResponse(Token=tok)

    async def ExtendRuntimeMeasurement(self, req: Any, ctx: Any) -> Any:
        index = req.RegisterIndex if req.HasField("RegisterIndex") else None
        result = await self._run(
            "AA extend runtime measurement failed", self.aa.extend_runtime_measurement,
            req.Domain, req.Operation, req.Content, index,
        )  # fmt: skip
        return pb.ExtendRuntimeMeasurementResponse(Result=result)

    async def BindInitData(self, req: Any, ctx: Any) -> Any:
        await self._run("AA bind init data failed", self.aa.bind_init_data, req.Digest)
        return pb.BindInitDataResponse()

    async def GetTeeType(self, req: Any, ctx: Any) -> Any:
        return pb.GetTeeTypeResponse(tee=self.aa.get_tee_type())

    async def GetAdditionalTees(self, req: Any, ctx: Any) -> Any:
        return pb.GetAdditionalTeesResponse(additional_tees=self.aa.get_additional_tees())


async def serve(aa: AttestationAgent, socket: str, ready: Any = None) -> None:
    """Serve ``aa`` on ``socket`` until cancelled or SIGINT/SIGTERM; ``ready(address)`` is called
    once listening."""
    import signal

    from coco.rpc import Server
    from coco.rpc.services import ATTESTATION_AGENT

    server = Server()
    server.register(ATTESTATION_AGENT, AaTtrpcService(aa))
    address = await server.listen(socket)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    log.info("attestation agent (%s) serving on %s", aa.get_tee_type(), address)
    if ready is not None:
        ready(address)
    try:
        await server.serve_forever()
    finally:
        await server.stop()
        aa.close()
