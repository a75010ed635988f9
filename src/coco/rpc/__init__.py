"""ttRPC, the RPC protocol of containerd that the kata agent, the AA and the CDH speak.

- :mod:`coco.rpc.frames`: the 10-byte frame header and the 4 MiB limit;
- :mod:`coco.rpc.server` / :mod:`coco.rpc.client`: asyncio server and client (+ a sync client);
- :mod:`coco.rpc.address`: ``unix://``, ``tcp://``, ``vsock://`` and ``serial://`` transports;
- :mod:`coco.rpc.service`: a service declared once (name, methods, message types), used by both
  sides; :mod:`coco.rpc.services` holds the declared ones; :mod:`coco.rpc.protos` the .proto files
  and the modules ``scripts/gen-protos`` compiles from them.
"""

from coco.rpc.address import AddressError
from coco.rpc.client import Client, SyncClient
from coco.rpc.frames import MAX_MESSAGE, OversizedMessageError
from coco.rpc.server import CallContext, Server
from coco.rpc.service import Method, Service, Stub
from coco.rpc.status import Code, RpcError, UnavailableError

__all__ = [
    "MAX_MESSAGE",
    "AddressError",
    "CallContext",
    "Client",
    "Code",
    "Method",
    "OversizedMessageError",
    "RpcError",
    "Server",
    "Service",
    "Stub",
    "SyncClient",
    "UnavailableError",
]
