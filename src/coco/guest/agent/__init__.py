"""The Kata agent of the guest: ``grpc.AgentService`` and ``grpc.Health`` over ttRPC.

- :mod:`.config`: agent.toml, the kernel command line and the environment (where to listen, the
  container root, the CDH socket, the initial policy);
- :mod:`.ocispec`: the OCI spec between its protobuf form (oci.proto) and config.json, and every
  request as the JSON document the agent policy judges;
- :mod:`.policy`: the policy gate every request passes before anything happens;
- :mod:`.runc`, :mod:`.process`: containers run by ``runc``, their processes and IO;
- :mod:`.storage`: the storage drivers (image_guest_pull, local, ephemeral, overlayfs,
  virtio-fs/9p, blk tardev layers through dm-verity);
- :mod:`.sandbox`: the sandbox and its containers (what the requests change);
- :mod:`.service`: the ttRPC handlers with upstream's status codes; :mod:`.server`: serving.
"""
