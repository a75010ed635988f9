"""The ttRPC services this project speaks, each declared once from its .proto.

Names on the wire are upstream's: ``attestation_agent.AttestationAgentService``, the CDH's
``api.*`` services (all five on the CDH socket, with ``keyprovider.KeyProviderService``), the kata
agent's ``grpc.AgentService`` and ``grpc.Health``.
"""

from __future__ import annotations

from coco.rpc.protos import (
    agent_pb2,
    attestation_agent_pb2,
    confidential_data_hub_pb2,
    health_pb2,
    keyprovider_pb2,
)
from coco.rpc.service import Service

ATTESTATION_AGENT = Service.from_proto(attestation_agent_pb2, "AttestationAgentService")

SEALED_SECRET = Service.from_proto(confidential_data_hub_pb2, "SealedSecretService")
GET_RESOURCE = Service.from_proto(confidential_data_hub_pb2, "GetResourceService")
SECURE_MOUNT = Service.from_proto(confidential_data_hub_pb2, "SecureMountService")
IMAGE_PULL = Service.from_proto(confidential_data_hub_pb2, "ImagePullService")

KEY_PROVIDER = Service.from_proto(keyprovider_pb2, "KeyProviderService")

# upstream default sockets
AA_SOCKET = "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"
CDH_SOCKET = "unix:///run/confidential-containers/cdh.sock"

# the kata agent (grpc.AgentService, grpc.Health), served in the guest, called by the shim
AGENT = Service.from_proto(agent_pb2, "AgentService")
HEALTH = Service.from_proto(health_pb2, "Health")

# the remote hypervisor (hypervisor.Hypervisor) and podvminfo.PodVMInfo, served by the
# cloud-api-adaptor on one socket, called by the shim's remote sandbox
from coco.rpc.protos import hypervisor_pb2, podvminfo_pb2  # noqa: E402

HYPERVISOR = Service.from_proto(hypervisor_pb2, "Hypervisor")
PODVMINFO = Service.from_proto(podvminfo_pb2, "PodVMInfo")
HYPERVISOR_SOCKET = "/run/peerpod/hypervisor.sock"
