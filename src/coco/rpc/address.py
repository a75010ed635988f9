"""ttRPC addresses and the byte streams behind them: parse, listen, dial.

Forms (as ttrpc-rust and the kata agent spell them):

- ``unix:///abs/path``: a Unix socket file. A listener removes a *stale* socket left at the path
  (a socket nobody accepts on) and creates the parent directory; anything else there is an error.
- ``unix://@name``: a Linux abstract socket.
- ``tcp://host:port`` (``[v6]:port`` too); port 0 picks a free port.
- ``vsock://cid:port``: AF_VSOCK; ``cid`` -1 means any (what a guest listens on).
- ``serial:///dev/...``: a character device (a virtio-serial port, a pty) used as one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import tty
from dataclasses import dataclass
from pathlib import Path

from coco.errors import CocoError

FORMS = "unix:///ABS/PATH, unix://@NAME, tcp://HOST:PORT, vsock://CID:PORT or serial:///DEV"
VMADDR_CID_ANY = 0xFFFFFFFF


class AddressError(CocoError):
    """An address that cannot be parsed, listened on or opened."""


@dataclass(frozen=True)
class Address:
    scheme: str  # unix | tcp | vsock | serial
    path: str = ""  # unix: file path, or "@name" for an abstract socket; serial: device path
    host: str = ""  # tcp
    port: int = 0  # tcp, vsock
    cid: int = 0  # vsock

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        if self.scheme == "serial":
            return f"serial://{self.path}"
        if self.scheme == "vsock":
            cid = -1 if self.cid == VMADDR_CID_ANY else self.cid
            return f"vsock://{cid}:{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def sockaddr(self) -> str:
        """The unix socket address for the socket calls (abstract names start with NUL)."""
        return "\0" + self.path[1:] if self.path.startswith("@") else self.path


def _port(text: str, address: str, highest: int = 65535) -> int:
    if not text.isdigit() or int(text) > highest:
        raise AddressError(f"ttrpc address {address!r}: expected a port 0-{highest}, got {text!r}")
    return int(text)


def parse(address: str) -> Address:
    """An :class:`Address`, or :class:`AddressError` naming the accepted forms."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        raise AddressError(f"ttrpc address {address!r}: expected {FORMS}")
    if scheme == "unix":
        if rest.startswith("@") and len(rest) > 1:
            return Address("unix", path=rest)
        if rest.startswith("/") and len(rest) > 1:
            return Address("unix", path=rest)
        raise AddressError(
            f"ttrpc address {address!r}: expected unix:///ABS/PATH or unix://@NAME, got {rest!r}"
        )
    if scheme == "serial":
        if not rest.startswith("/"):
            raise AddressError(f"ttrpc address {address!r}: expected serial:///DEVICE/PATH")
        return Address("serial", path=rest)
    if scheme in ("tcp", "vsock"):
        host, colon, port = rest.rpartition(":")
        if not colon or not host:
            raise AddressError(f"ttrpc address {address!r}: expected {scheme}://HOST:PORT")
        if scheme == "tcp":
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            return Address("tcp", host=host, port=_port(port, address))
        try:
            cid = int(host)
        except ValueError:
            raise AddressError(
                f"ttrpc address {address!r}: expected a numeric vsock CID, got {host!r}"
            ) from None
        if cid == -1:
            cid = VMADDR_CID_ANY
        if not 0 <= cid <= VMADDR_CID_ANY:
            raise AddressError(f"ttrpc address {address!r}: vsock CID {host} out of range")
        return Address("vsock", cid=cid, port=_port(port, address, 0xFFFFFFFF))
    raise AddressError(f"ttrpc address {address!r}: unknown scheme {scheme!r}; expected {FORMS}")


def _vsock_socket(address: Address) -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise AddressError(f"{address}: this Python has no AF_VSOCK (vsock needs Linux)")
    try:
        return socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise AddressError(f"{address}: vsock is not available on this machine: {e}") from None


def clear_stale_socket(path: Path) -> None:
    """Remove ``path`` if it is a socket nobody accepts on; refuse anything else that is there."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressError(f"unix://{path}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    except OSError as e:
        raise AddressError(f"unix://{path}: cannot tell whether the socket is in use: {e}") from e
    finally:
        probe.close()
    raise AddressError(f"unix://{path}: another server is listening on this socket")


async def start_listener(address: Address, handle) -> asyncio.Server:
    """An asyncio server calling ``handle(reader, writer)`` per connection (not for serial)."""
    try:
        if address.scheme == "unix":
            if not address.path.startswith("@"):
                path = Path(address.path)
                path.parent.mkdir(parents=True, exist_ok=True)
                clear_stale_socket(path)
            return await asyncio.start_unix_server(handle, path=address.sockaddr)
        if address.scheme == "tcp":
            return await asyncio.start_server(handle, address.host, address.port)
        if address.scheme == "vsock":
            sock = _vsock_socket(address)
            try:
                sock.bind((address.cid, address.port))
                sock.listen(128)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            return await asyncio.start_server(handle, sock=sock)
    except OSError as e:
        raise AddressError(f"cannot listen on {address}: {e.strerror or e}") from e
    raise AddressError(f"{address}: not a listening address")


def bound_address(address: Address, server: asyncio.Server) -> Address:
    """``address`` with the port the system picked for tcp port 0."""
    if address.scheme == "tcp" and address.port == 0 and server.sockets:
        return Address("tcp", host=address.host, port=server.sockets[0].getsockname()[1])
    return address


async def open_connection(
    address: Address,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Dial ``address`` (or open a serial device); OSError on failure."""
    if address.scheme == "unix":
        return await asyncio.open_unix_connection(address.sockaddr)
    if address.scheme == "tcp":
        return await asyncio.open_connection(address.host, address.port)
    if address.scheme == "vsock":
        sock = _vsock_socket(address)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (address.cid, address.port))
        except OSError:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)
    return await open_char_device(address.path)


async def open_char_device(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A character device (virtio-serial port, pty) as an asyncio stream pair.

    A terminal is switched to raw mode so no byte of a frame is translated. Closing the writer
    closes the device.
    """
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            raise OSError(errno.ENODEV, f"{path} is not a character device")
        if os.isatty(fd):
            tty.setraw(fd)
        wfd = os.dup(fd)
    except BaseException:
        os.close(fd)
        raise
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        rtransport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        os.close(wfd)
        raise
    try:
        wtransport, wprotocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
            os.fdopen(wfd, "wb", buffering=0),
        )
    except BaseException:
        rtransport.close()
        with contextlib.suppress(OSError):
            os.close(wfd)
        raise
    writer = asyncio.StreamWriter(wtransport, wprotocol, reader, loop)
    # closing the writer must stop reading too: one device, one connection
    wprotocol.connection_lost = _chain(wprotocol.connection_lost, rtransport.close)
    return reader, writer


def _chain(first, then):
    def both(exc):
        first(exc)
        then()

    return both
