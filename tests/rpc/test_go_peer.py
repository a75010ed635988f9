"""coco.rpc against an independent peer: containerd's own Go ttrpc library (Debian's
golang-github-containerd-ttrpc-dev), as a client of our server and as a server for our client.

The Go program (goclient/main.go) is built once per source and Go version into a cache dir. A
missing Go toolchain fails these tests: run scripts/install-system-deps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from coco.rpc import Client, Code, RpcError, frames
from coco.rpc.protos import attestation_agent_pb2 as aa
from coco.rpc.services import ATTESTATION_AGENT

from .conftest import arun, serving

SOURCE = Path(__file__).parent / "goclient" / "main.go"
GOCODE = Path("/usr/share/gocode")
AA = ATTESTATION_AGENT.name


def _cache_root() -> Path:
    # not $XDG_CACHE_HOME: the suite points that at a fresh directory per run (tests/conftest.py),
    # and the Go build is worth keeping between runs (it is keyed by its source)
    return Path.home() / ".cache" / "coco-tests"


@pytest.fixture(scope="session")
def goclient() -> Path:
    go = shutil.which("go")
    if go is None or not (GOCODE / "src/github.com/containerd/ttrpc").is_dir():
        pytest.fail(
            "the Go peer needs golang-go and golang-github-containerd-ttrpc-dev: "
            "run scripts/install-system-deps",
            pytrace=False,
        )
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    root = _cache_root()
    binary = root / f"goclient-{key}"
    if binary.exists():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        env = {
            **os.environ,
            "GO111MODULE": "off",
            "GOPATH": f"{tmp}/gopath:{GOCODE}",
            "GOCACHE": str(root / "gocache"),
            "GOFLAGS": "",
        }
        out = Path(tmp) / "goclient"
        build = subprocess.run(
            [go, "build", "-o", str(out), str(SOURCE)], env=env, capture_output=True, text=True
        )
        if build.returncode != 0:
            pytest.fail(f"building {SOURCE} failed:\n{build.stderr}", pytrace=False)
        out.replace(binary)
    return binary


async def go(binary: Path, *args: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        str(binary), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


class Echo:
    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def GetEvidence(self, request, ctx):
        return aa.GetEvidenceResponse(Evidence=request.RuntimeData)

    def GetTeeType(self, request, ctx):
        return aa.GetTeeTypeResponse(tee="sample")

    async def GetToken(self, request, ctx):
        self.timeouts.append(ctx.timeout)
        await asyncio.Event().wait()


def test_go_client_against_our_server(tmp_path, goclient) -> None:
    impl = Echo()

    async def main() -> dict[str, dict]:
        async with serving(tmp_path, {ATTESTATION_AGENT: impl}) as address:
            calls = {
                # GetEvidenceRequest{RuntimeData="hello"}, encoded by hand
                "evidence": ("call", address, AA, "GetEvidence", "0a0568656c6c6f"),
                "tee": ("call", address, AA, "GetTeeType", ""),
                "method": ("call", address, AA, "Nope", ""),
                "service": ("call", address, "attestation_agent.Nope", "GetTeeType", ""),
                "declared": ("call", address, AA, "BindInitData", ""),
                "oversized": ("call", address, AA, "GetEvidence", f"zeros:{4 << 20}"),
                "deadline": ("call", address, AA, "GetToken", "", "300"),
                "many": ("many", address, AA, "GetEvidence", "32"),
            }
            results = await asyncio.gather(*(go(goclient, *c) for c in calls.values()))
            return dict(zip(calls, results, strict=True))

    r = arun(main())
    assert r["evidence"] == {"code": 0, "message": "", "payload": "0a0568656c6c6f"}
    assert r["tee"] == {"code": 0, "message": "", "payload": "0a0673616d706c65"}
    assert r["method"] == {"code": Code.UNIMPLEMENTED, "message": "method Nope", "payload": ""}
    assert r["service"]["code"] == Code.UNIMPLEMENTED
    assert r["service"]["message"] == "service attestation_agent.Nope"
    assert r["declared"]["code"] == Code.NOT_FOUND
    assert r["declared"]["message"] == f"/{AA}/BindInitData is not supported"
    # the Go client of Debian's ttrpc 1.1.1 sends it; our server skips it and answers on its stream
    assert r["oversized"]["code"] == Code.RESOURCE_EXHAUSTED
    assert r["oversized"]["message"].startswith("message length 41943")
    assert r["oversized"]["message"].endswith("exceed maximum message size of 4194304")
    # the Go client stops waiting at its own deadline or gets ours: the same text either way
    assert r["deadline"]["message"] == "context deadline exceeded"
    assert len(impl.timeouts) == 1 and 0 < impl.timeouts[0] <= 0.3
    assert r["many"] == {"ok": 32}


@contextlib.asynccontextmanager
async def go_server(binary: Path, sock: Path):
    """The Go peer serving on ``sock``, and our client connected to it."""
    proc = await asyncio.create_subprocess_exec(
        str(binary), "serve", str(sock), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert await proc.stdout.readline() == b"ready\n"
        async with await Client.connect(f"unix://{sock}") as client:
            yield client
    finally:
        proc.stdin.close()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


def test_our_client_against_the_go_server(tmp_path, goclient) -> None:
    svc = "coco.test.Echo"
    msg = aa.GetEvidenceRequest  # any message does for an echo

    async def main():
        async with go_server(goclient, tmp_path / "go.sock") as client:

            async def status(service: str, method: str, **kw) -> tuple[int, str]:
                with pytest.raises(RpcError) as err:
                    await client.call(service, method, msg(), msg, **kw)
                return err.value.code, err.value.message

            echoes = await asyncio.gather(
                *(client.call(svc, "Echo", msg(RuntimeData=b"%d" % i), msg) for i in range(20))
            )
            results = {
                "echo": [e.RuntimeData for e in echoes],
                "fail": await status(svc, "Fail"),
                "method": await status(svc, "Nope"),
                "service": await status("coco.test.Nope", "Echo"),
                "deadline": await status(svc, "Sleep", timeout=0.3),
                "big": await status(svc, "Big"),
            }
            # the oversized reply was skipped whole: the connection is still in step
            results["after"] = (
                await client.call(svc, "Echo", msg(RuntimeData=b"x"), msg)
            ).RuntimeData
            return results

    r = arun(main())
    assert r["echo"] == [b"%d" % i for i in range(20)]
    assert r["fail"] == (Code.PERMISSION_DENIED, "denied by the Go peer")
    assert r["method"] == (Code.UNIMPLEMENTED, "method Nope")
    assert r["service"] == (Code.UNIMPLEMENTED, "service coco.test.Nope")
    assert r["deadline"][0] == Code.DEADLINE_EXCEEDED
    assert r["big"][0] == Code.RESOURCE_EXHAUSTED
    assert r["big"][1].endswith(f"exceed maximum message size of {frames.MAX_MESSAGE}")
    assert r["after"] == b"x"
