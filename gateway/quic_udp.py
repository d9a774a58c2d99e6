"""The QUIC tunnel's own UDP driver: burst receive with GRO, batched send with GSO.

aioquic's cost is per packet in Python; the event loop's UDP transport adds a system call and a
callback per datagram on top. `UdpEndpoint` drives a non-blocking socket from the loop's reader
instead:

* receive: on each wake-up, `recvmsg` until EAGAIN (at most `BURST` calls). With `UDP_GRO` the
  kernel hands over up to 64 datagrams of one flow in one buffer, with their size in a cmsg;
  they are split here and fed to the protocol one by one, in one callback, so the connection
  acknowledges the whole burst in one flush.
* send: `send_batch` takes what aioquic produced in one `datagrams_to_send` and sends each run
  of equal-size datagrams (the last of a run may be shorter) with one `sendmsg` carrying a
  `UDP_SEGMENT` cmsg: the kernel (or the NIC) cuts it into datagrams. A kernel or device that
  refuses GSO (EIO, EINVAL, EOPNOTSUPP while a plain send works) turns it off for the socket.
* a full socket buffer (EAGAIN) queues the rest, bounded by `MAX_PENDING` bytes; beyond that a
  datagram is dropped and counted (`udp_send_dropped`): QUIC's loss recovery resends, and the
  congestion controller slows down, which is what a full buffer means anyway.

It looks enough like an `asyncio.DatagramTransport` (`sendto`, `close`, `is_closing`,
`get_extra_info`) for `gateway.tunnel` and `gateway.server`, and calls the same protocol
methods (`connection_made`, `datagram_received`, `error_received`, `connection_lost`).
Linux only (the constants are Linux's); elsewhere GSO/GRO stay off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
UDP_MAX_SEGMENTS = 64
MAX_UDP_PAYLOAD = 65507  # IPv4: 65,535 - 20 (IP) - 8 (UDP)
BURST = 64  # recvmsg calls per wake-up: other sockets get their turn
MAX_PENDING = 4 * 1024 * 1024  # bytes queued while the socket buffer is full
# Socket buffers: the default ~208 KiB receive buffer overflows in a burst (RcvbufErrors),
# and each drop halves the sender's congestion window. Not much more: measured with 4 MiB,
# 16 concurrent streams sometimes cost ~25 % more CPU per byte (a deep queue inflates the RTT
# aioquic sees, and it resends what was only late). The kernel caps it at rmem_max.
SOCKET_BUFFER = 1024 * 1024
_GRO_CMSG = socket.CMSG_SPACE(4)
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT})

Address = Any  # (host, port) or (host, port, flow, scope)


class UdpEndpoint:
    def __init__(
        self,
        sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
        *,
        offload: bool = True,
        counters: dict[str, int] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._protocol = protocol
        self._closing = False
        self._pending: collections.deque[tuple[list[bytes], int, Address]] = collections.deque()
        self._pending_bytes = 0
        self._gso = offload and sock.family in (socket.AF_INET, socket.AF_INET6)
        self._gro = False
        self.counters = counters if counters is not None else {}
        for name in (
            "udp_send_calls",
            "udp_datagrams_sent",
            "udp_recv_calls",
            "udp_datagrams_received",
            "udp_send_dropped",
        ):
            self.counters.setdefault(name, 0)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        if offload:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self._gro = True
            except OSError:
                pass  # an older kernel: one datagram per recvmsg, still in bursts
        self._extra = {"socket": sock, "sockname": sock.getsockname()}
        with contextlib.suppress(OSError):  # a listener is unconnected
            self._extra["peername"] = sock.getpeername()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._on_readable)
        protocol.connection_made(self)  # type: ignore[arg-type]

    # --- the transport surface -------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        if self._pending:
            self._loop.remove_writer(self._sock.fileno())
            self._pending.clear()
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()  # nothing to flush that matters: UDP, and `close` drops the queue anyway

    def sendto(self, data: bytes, addr: Address = None) -> None:
        self.send_batch([data], addr)

    def send_batch(self, datagrams: Sequence[bytes], addr: Address = None) -> None:
        """Send datagrams in order: runs of equal size as one GSO `sendmsg` each."""
        if self._closing or not datagrams:
            return
        i, n = 0, len(datagrams)
        while i < n:
            size = len(datagrams[i])
            j = i + 1
            if self._gso:
                limit = min(UDP_MAX_SEGMENTS, MAX_UDP_PAYLOAD // size)
                while j < n and j - i < limit and len(datagrams[j]) == size:
                    j += 1
                if j < n and j - i < limit and len(datagrams[j]) < size:
                    j += 1  # a shorter datagram may end a run
            self._send(list(datagrams[i:j]), size, addr)
            i = j

    # --- sending -----------------------------------------------------------------------------

    def _send(self, bufs: list[bytes], size: int, addr: Address) -> None:
        if self._pending:
            self._queue(bufs, size, addr)
            return
        try:
            self._sendmsg(bufs, size, addr)
        except (BlockingIOError, InterruptedError):
            self._queue(bufs, size, addr)
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
        except OSError as e:
            if len(bufs) > 1 and (e.errno in _GSO_REFUSED or e.errno == errno.EMSGSIZE):
                plain_error = self._one_by_one(bufs, addr, gso_fault=e.errno != errno.EMSGSIZE)
                if plain_error is None:
                    return
                e = plain_error  # e.g. EMSGSIZE, where GSO said only EINVAL
            self._protocol.error_received(e)

    def _sendmsg(self, bufs: list[bytes], size: int, addr: Address) -> None:
        if len(bufs) == 1:
            if addr is None:
                self._sock.send(bufs[0])
            else:
                self._sock.sendto(bufs[0], addr)
        else:
            cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
            if addr is None:
                self._sock.sendmsg(bufs, cmsg)
            else:
                self._sock.sendmsg(bufs, cmsg, 0, addr)
        self.counters["udp_send_calls"] += 1
        self.counters["udp_datagrams_sent"] += len(bufs)

    def _one_by_one(self, bufs: list[bytes], addr: Address, gso_fault: bool) -> OSError | None:
        """A GSO send failed. If one plain datagram goes through, send the rest one by one,
        and if GSO itself was refused (EIO, EINVAL...) turn it off for this socket. EMSGSIZE
        means segments larger than the route's MTU: a socket that allows fragmentation (the
        listener) sends them plain, fragmented, as before GSO; one that forbids it (a client)
        fails again, and that error says more. Returns the plain send's error, or None."""
        try:
            self._sendmsg(bufs[:1], len(bufs[0]), addr)
        except (BlockingIOError, InterruptedError):
            self._queue(bufs, len(bufs[0]), addr)  # undecided: retry the batch when writable
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
            return None
        except OSError as e:
            return e  # the batch is lost; QUIC resends
        if gso_fault:
            self._gso = False
        for buf in bufs[1:]:
            self._send([buf], len(buf), addr)
        return None

    def _queue(self, bufs: list[bytes], size: int, addr: Address) -> None:
        nbytes = sum(map(len, bufs))
        if self._pending_bytes + nbytes > MAX_PENDING:
            self.counters["udp_send_dropped"] += len(bufs)
            return
        self._pending.append((bufs, size, addr))
        self._pending_bytes += nbytes

    def _on_writable(self) -> None:
        while self._pending:
            bufs, size, addr = self._pending[0]
            try:
                self._sendmsg(bufs, size, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._protocol.error_received(e)  # this batch is lost; QUIC resends
            self._pending.popleft()
            self._pending_bytes -= sum(map(len, bufs))
        self._loop.remove_writer(self._sock.fileno())

    # --- receiving ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        recvmsg = self._sock.recvmsg
        received = self._protocol.datagram_received
        for _ in range(BURST):
            if self._closing:
                return
            try:
                data, ancdata, _, addr = recvmsg(65535, _GRO_CMSG if self._gro else 0)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. ICMP port unreachable on a connected socket
                self._protocol.error_received(e)
                return
            self.counters["udp_recv_calls"] += 1
            segment = 0
            for level, kind, value in ancdata:
                if level == SOL_UDP and kind == UDP_GRO:
                    segment = int.from_bytes(value[:4], sys.byteorder)
            if segment and len(data) > segment:
                view = memoryview(data)
                starts = range(0, len(data), segment)
                self.counters["udp_datagrams_received"] += len(starts)
                for start in starts:
                    received(bytes(view[start : start + segment]), addr)
            else:
                self.counters["udp_datagrams_received"] += 1
                received(data, addr)


def open_endpoint(
    sock: socket.socket,
    protocol: asyncio.DatagramProtocol,
    *,
    offload: bool = True,
    counters: dict[str, int] | None = None,
) -> UdpEndpoint:
    """Drive `sock` (bound or connected) for `protocol`; the endpoint closes the socket."""
    return UdpEndpoint(sock, protocol, offload=offload, counters=counters)


def bind_socket(host: str, port: int) -> socket.socket:
    """A UDP socket bound to (host, port) for a listener (OSError)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock
