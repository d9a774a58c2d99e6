"""The client side's UDP sockets for the QUIC tunnel: opening a connected socket, reading the
kernel's path MTU, and a per-socket protocol so a connection can move to a new socket.

* `open_client_socket` connects a non-blocking UDP socket to the peer (the kernel picks the
  source address from its routes) and sets `IP_PMTUDISC_DO` / `IPV6_PMTUDISC_DO`: a datagram
  larger than the path MTU fails with EMSGSIZE instead of being fragmented, since one lost
  fragment would lose the whole QUIC packet.
* `datagram_size` is `min(configured, path MTU - IP/UDP headers)`, the largest QUIC datagram
  that crosses the path in one piece (RFC 9000 §14: never below 1,200).
* `ClientSocket` forwards a socket's events to its connection only while that socket is the
  connection's current one: after a migration, the old socket's late errors and its
  `connection_lost` must not end the connection.

Not here: deciding when to migrate and what QUIC does about it (`gateway.tunnel`).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any, Protocol

from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE

# Linux values; the socket module does not export them all.
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
IP_MTU = 14
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DO = 2
IPV6_MTU = 24
IPV4_UDP_OVERHEAD = 20 + 8
IPV6_UDP_OVERHEAD = 40 + 8

# Send errors on a connected socket that mean its source address is gone or no longer routes
# to the peer (the lead's measurement: ENETUNREACH once the address is deleted). A fresh socket
# connected to the same peer picks a new source address.
MIGRATE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EINVAL})


class SocketOwner(Protocol):
    """What `ClientSocket` forwards to (a `TunnelConnection`)."""

    def is_current(self, transport: asyncio.BaseTransport) -> bool: ...

    def datagram_received(self, data: bytes | str, addr: Any) -> None: ...

    def error_received(self, exc: Exception) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


class ClientSocket(asyncio.DatagramProtocol):
    def __init__(self, owner: SocketOwner) -> None:
        self._owner = owner
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def _current(self) -> bool:
        return self._transport is not None and self._owner.is_current(self._transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._current():
            self._owner.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        if self._current():
            self._owner.error_received(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._current():
            self._owner.connection_lost(exc)


def open_client_socket(family: int, peer: Any) -> socket.socket:
    """A non-blocking UDP socket connected to `peer`, with path MTU discovery on (OSError)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        sock.connect(peer)  # UDP: no packet sent, only the route and source address chosen
    except BaseException:
        sock.close()
        raise
    return sock


def path_mtu(sock: socket.socket) -> int | None:
    """The kernel's path MTU toward the connected peer (route MTU, lowered by ICMP), or None
    where the kernel does not say."""
    try:
        if sock.family == socket.AF_INET6:
            return sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
        return sock.getsockopt(socket.IPPROTO_IP, IP_MTU)
    except OSError:
        return None


def datagram_size(sock: socket.socket, configured: int) -> int:
    """The QUIC datagram size for this socket's path: at most `configured`, at most what fits
    the path MTU, never below QUIC's minimum (a path that small cannot carry QUIC at all)."""
    mtu = path_mtu(sock)
    if mtu is None:
        return configured
    overhead = IPV6_UDP_OVERHEAD if sock.family == socket.AF_INET6 else IPV4_UDP_OVERHEAD
    return max(SMALLEST_MAX_DATAGRAM_SIZE, min(configured, mtu - overhead))


def local_address(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
