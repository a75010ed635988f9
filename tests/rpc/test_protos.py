"""The compiled protos carry upstream's wire names and field numbers (spot checks against the
spec's tables), and the Health worked frames of the kata spec come out byte for byte."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf.descriptor import FieldDescriptor as F

from coco.rpc import Client, Server, Stub
from coco.rpc.protos import (
    agent_pb2,
    attestation_agent_pb2,
    confidential_data_hub_pb2,
    csi_pb2,
    health_pb2,
    keyprovider_pb2,
    oci_pb2,
    ttrpc_pb2,
    types_pb2,
)
from coco.rpc.services import (
    AGENT,
    ATTESTATION_AGENT,
    GET_RESOURCE,
    HEALTH,
    IMAGE_PULL,
    KEY_PROVIDER,
    SEALED_SECRET,
    SECURE_MOUNT,
)

from .conftest import RawConn, arun


def test_service_names_on_the_wire() -> None:
    assert ATTESTATION_AGENT.name == "attestation_agent.AttestationAgentService"
    assert [s.name for s in (SEALED_SECRET, GET_RESOURCE, SECURE_MOUNT, IMAGE_PULL)] == [
        "api.SealedSecretService",
        "api.GetResourceService",
        "api.SecureMountService",
        "api.ImagePullService",
    ]
    assert KEY_PROVIDER.name == "keyprovider.KeyProviderService"
    assert set(KEY_PROVIDER.methods) == {"WrapKey", "UnWrapKey"}
    assert AGENT.name == "grpc.AgentService" and HEALTH.name == "grpc.Health"
    assert set(HEALTH.methods) == {"Check", "Version"}
    assert len(AGENT.methods) == 42
    assert "UpdateInterface" in AGENT.methods and "UpdateInterfaces" not in AGENT.methods
    assert "PullImage" not in AGENT.methods
    assert AGENT.methods["UpdateInterface"].response is types_pb2.Interface
    assert AGENT.methods["GetVolumeStats"].response is csi_pb2.VolumeStatsResponse
    assert ATTESTATION_AGENT.methods["GetAdditionalEvidence"].response is (
        attestation_agent_pb2.GetEvidenceResponse
    )


@pytest.mark.parametrize(
    ("message", "field", "number", "type_"),
    [
        (ttrpc_pb2.Request, "timeout_nano", 4, F.TYPE_INT64),
        (ttrpc_pb2.Request, "metadata", 5, F.TYPE_MESSAGE),
        (ttrpc_pb2.Response, "payload", 2, F.TYPE_BYTES),
        (attestation_agent_pb2.ExtendRuntimeMeasurementRequest, "RegisterIndex", 4, F.TYPE_UINT64),
        (attestation_agent_pb2.GetAdditionalTeesResponse, "additional_tees", 1, F.TYPE_STRING),
        (confidential_data_hub_pb2.GetResourceRequest, "ResourcePath", 1, F.TYPE_STRING),
        (confidential_data_hub_pb2.SecureMountRequest, "mount_point", 4, F.TYPE_STRING),
        (confidential_data_hub_pb2.ImagePullResponse, "manifest_digest", 1, F.TYPE_STRING),
        (
            keyprovider_pb2.KeyProviderKeyWrapProtocolOutput,
            "KeyProviderKeyWrapProtocolOutput",
            1,
            F.TYPE_BYTES,
        ),
        (agent_pb2.CreateContainerRequest, "OCI", 6, F.TYPE_MESSAGE),
        (agent_pb2.CreateContainerRequest, "shared_mounts", 8, F.TYPE_MESSAGE),
        (agent_pb2.ReseedRandomDevRequest, "data", 2, F.TYPE_BYTES),
        (agent_pb2.FSGroup, "group_id", 2, F.TYPE_UINT32),
        (agent_pb2.Storage, "shared", 8, F.TYPE_BOOL),
        (agent_pb2.CopyFileRequest, "file_mode", 3, F.TYPE_UINT32),
        (agent_pb2.CopyFileRequest, "uid", 5, F.TYPE_INT32),
        (agent_pb2.GuestDetailsResponse, "support_mem_hotplug_probe", 3, F.TYPE_BOOL),
        (agent_pb2.AgentDetails, "extra_features", 6, F.TYPE_STRING),
        (agent_pb2.MemAgentCompactConfig, "compact_sec_max", 5, F.TYPE_INT64),
        (agent_pb2.BlkioStats, "sectors_recursive", 8, F.TYPE_MESSAGE),
        (types_pb2.Interface, "devicePath", 6, F.TYPE_STRING),
        (types_pb2.Interface, "raw_flags", 8, F.TYPE_UINT32),
        (types_pb2.Route, "mtu", 8, F.TYPE_UINT32),
        (oci_pb2.Spec, "Windows", 10, F.TYPE_MESSAGE),
        (oci_pb2.Process, "OOMScoreAdj", 11, F.TYPE_INT64),
        (oci_pb2.Mount, "destination", 1, F.TYPE_STRING),
        (oci_pb2.Linux, "IntelRdt", 13, F.TYPE_MESSAGE),
        (oci_pb2.LinuxDevice, "Major", 3, F.TYPE_INT64),
        (oci_pb2.LinuxSyscall, "errnoret", 3, F.TYPE_UINT32),
        (oci_pb2.LinuxBlockIO, "ThrottleWriteIOPSDevice", 7, F.TYPE_MESSAGE),
        (health_pb2.VersionCheckResponse, "agent_version", 2, F.TYPE_STRING),
        (csi_pb2.VolumeUsage, "unit", 4, F.TYPE_ENUM),
    ],
)
def test_field_numbers(message, field, number, type_) -> None:
    desc = message.DESCRIPTOR.fields_by_name[field]
    assert (desc.number, desc.type) == (number, type_)


def test_register_index_has_presence() -> None:
    req = attestation_agent_pb2.ExtendRuntimeMeasurementRequest(RegisterIndex=0)
    assert req.HasField("RegisterIndex")
    assert req.SerializeToString() == b"\x20\x00"
    assert not attestation_agent_pb2.ExtendRuntimeMeasurementRequest().HasField("RegisterIndex")


# kata-agent-and-shim.md §1.7: Check, stream 1, 30 s deadline, and its reply SERVING
CHECK = (
    bytes.fromhex("0000001a 00000001 01 00 0a0b")
    + b"grpc.Health"
    + bytes.fromhex("1205")
    + b"Check"
    + bytes.fromhex("20 80d88ee16f")
)
SERVING = bytes.fromhex("00000004 00000001 02 00 12 02 0801")


def test_health_worked_frames(tmp_path) -> None:
    seen = []

    async def fake_agent(reader, writer):
        seen.append(await reader.readexactly(len(CHECK)))
        writer.write(SERVING)
        await reader.read()
        writer.close()

    class Agent:
        def Check(self, request, ctx):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def main():
        server = await asyncio.start_unix_server(fake_agent, path=str(tmp_path / "fake.sock"))
        async with server, await Client.connect(f"unix://{tmp_path}/fake.sock") as client:
            status = (await Stub(client, HEALTH).Check(timeout=30)).status
        ours = Server()
        ours.register(HEALTH, Agent())
        await ours.listen(f"unix://{tmp_path}/agent.sock")
        try:
            raw = await RawConn.open(str(tmp_path / "agent.sock"))
            raw.writer.write(CHECK)
            answer = await raw.reader.readexactly(len(SERVING))
            await raw.close()
        finally:
            await ours.stop()
        return status, answer

    status, answer = arun(main())
    assert seen == [CHECK]
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert answer == SERVING
