"""A kernel that refuses GSO on a socket: the driver falls back to one datagram per call and
stops trying GSO there, losing nothing (`gateway.quic_udp`). The refusal is real, not faked:
Linux answers a `UDP_SEGMENT` send on a socket with `SO_NO_CHECK` set with EINVAL (segmentation
needs the UDP checksum), exactly as it answers EIO on a device without checksum offload."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from gateway import quic_socket, quic_udp
from tests.gateway.conftest import LOOPBACK
from tests.gateway.test_quic_path import Collector, _collect

SO_NO_CHECK = 11  # Linux: transmit UDP without a checksum


class Sender(Collector):
    """Also keeps the errors the driver reports to its protocol (QUIC would see them)."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[Exception] = []

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


async def test_a_socket_that_refuses_gso_sends_every_datagram_plainly_and_in_order() -> None:
    receiver, sender = Collector(), Sender()
    rx = quic_udp.open_endpoint(quic_udp.bind_socket(LOOPBACK, 0), receiver)
    sock = quic_socket.open_client_socket(socket.AF_INET, rx.get_extra_info("sockname"))
    sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    tx = quic_udp.open_endpoint(sock, sender)
    try:
        first = [bytes([i]) * 1000 for i in range(10)]
        tx.send_batch(first)  # one GSO attempt: refused, then ten plain sends
        await _collect(receiver, len(first))
        assert receiver.got == first
        assert sender.errors == []  # the refusal was handled, not reported to QUIC
        assert tx.counters["udp_datagrams_sent"] == 10
        assert tx.counters["udp_send_calls"] == 10
        # GSO stays off for this socket: the next run costs no failed attempt first.
        second = [bytes([50 + i]) * 1000 for i in range(5)]
        tx.send_batch(second)
        await _collect(receiver, len(first) + len(second))
        assert receiver.got == first + second
        assert tx.counters["udp_send_calls"] == 15
    finally:
        tx.close()
        rx.close()


async def test_the_same_batch_on_a_socket_that_accepts_gso_is_one_call() -> None:
    """The positive control: without `SO_NO_CHECK` the batch above is one send."""
    receiver = Collector()
    rx = quic_udp.open_endpoint(quic_udp.bind_socket(LOOPBACK, 0), receiver)
    tx = quic_udp.open_endpoint(
        quic_socket.open_client_socket(socket.AF_INET, rx.get_extra_info("sockname")), Collector()
    )
    try:
        batch = [bytes([i]) * 1000 for i in range(10)]
        tx.send_batch(batch)
        await _collect(receiver, len(batch))
        assert receiver.got == batch
        assert tx.counters["udp_send_calls"] == 1
    finally:
        tx.close()
        rx.close()


def test_so_no_check_is_what_makes_the_kernel_refuse() -> None:
    """Guards the premise: if a kernel ever accepted GSO with SO_NO_CHECK, the first test
    would pass without exercising the fallback."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind((LOOPBACK, 0))
        tx.connect(rx.getsockname())
        tx.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        cmsg = [(quic_udp.SOL_UDP, quic_udp.UDP_SEGMENT, struct.pack("=H", 1000))]
        with pytest.raises(OSError, match=r"Invalid argument|Input/output error") as refused:
            tx.sendmsg([b"a" * 1000, b"b" * 1000], cmsg)
        assert refused.value.errno in (errno.EINVAL, errno.EIO)
    finally:
        rx.close()
        tx.close()
