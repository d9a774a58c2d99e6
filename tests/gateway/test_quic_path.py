"""The QUIC tunnel's client sockets on loopback: path MTU discovery settings, the datagram size
each side uses (the server learns the client's from `max_udp_payload_size`), GSO/GRO batching
(`gateway.quic_udp`), and that a replaced socket no longer reaches its connection. The same on
a real veth link with set MTUs, and migration, are in `test_quic_netns.py`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from ca.authority import CertificateAuthority
from gateway import quic_socket, quic_udp
from gateway.quic_socket import ClientSocket
from tests.gateway.conftest import (
    LOOPBACK,
    Pair,
    build_snapshot,
    close_writer,
    connect_via,
    make_gateway,
)


def _lo_mtu() -> int:
    # IPv4 caps a route's MTU at 65,535 (loopback's device MTU is 65,536).
    return min(65535, int(Path("/sys/class/net/lo/mtu").read_text()))


def test_client_socket_forbids_fragmentation_and_reads_the_path_mtu() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((LOOPBACK, 0))
        sock = quic_socket.open_client_socket(socket.AF_INET, server.getsockname())
        with sock:
            assert not sock.getblocking()
            assert sock.getpeername() == server.getsockname()
            discover = sock.getsockopt(socket.IPPROTO_IP, quic_socket.IP_MTU_DISCOVER)
            assert discover == quic_socket.IP_PMTUDISC_DO
            assert quic_socket.path_mtu(sock) == _lo_mtu()
            assert quic_socket.datagram_size(sock, 8952) == min(8952, _lo_mtu() - 28)
            assert quic_socket.datagram_size(sock, 1 << 20) == _lo_mtu() - 28
            assert quic_socket.local_address(sock).startswith(f"{LOOPBACK}:")


def test_datagram_size_never_goes_below_quics_minimum() -> None:
    class TinyPath(socket.socket):
        def getsockopt(self, *args: Any) -> Any:
            return 576  # a path QUIC cannot use: keep 1,200 and let the send fail loudly

    with TinyPath(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert quic_socket.datagram_size(sock, 1350) == 1200


class Recorder:
    def __init__(self) -> None:
        self.current: object = None
        self.got: list[Any] = []

    def is_current(self, transport: asyncio.BaseTransport) -> bool:
        return transport is self.current

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.got.append(("data", data))

    def error_received(self, exc: Exception) -> None:
        self.got.append(("error", exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self.got.append(("lost", exc))


async def test_a_replaced_socket_no_longer_reaches_its_connection() -> None:
    loop = asyncio.get_running_loop()
    owner = Recorder()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind((LOOPBACK, 0))
        old, _ = await loop.create_datagram_endpoint(
            lambda: ClientSocket(owner), sock=quic_socket.open_client_socket(2, peer.getsockname())
        )
        new, _ = await loop.create_datagram_endpoint(
            lambda: ClientSocket(owner), sock=quic_socket.open_client_socket(2, peer.getsockname())
        )
        owner.current = old
        peer.sendto(b"to old", old.get_extra_info("sockname"))
        for _ in range(100):
            if owner.got:
                break
            await asyncio.sleep(0.01)
        assert owner.got == [("data", b"to old")]
        owner.current = new  # migrated: the old socket's datagrams and close are ignored
        peer.sendto(b"late", old.get_extra_info("sockname"))
        peer.sendto(b"to new", new.get_extra_info("sockname"))
        old.close()
        for _ in range(100):
            if len(owner.got) > 1:
                break
            await asyncio.sleep(0.01)
        new.close()  # after old.close(): the old one's connection_lost is scheduled first
        for _ in range(100):
            if owner.got[-1][0] == "lost":
                break
            await asyncio.sleep(0.01)
        assert owner.got == [("data", b"to old"), ("data", b"to new"), ("lost", None)]


@pytest.mark.parametrize(("east_size", "west_size"), [(1400, 8952), (8952, 1400)])
async def test_both_sides_send_at_most_the_smaller_datagram_size(
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    echo_port: int,
    east_size: int,
    west_size: int,
) -> None:
    east = make_gateway("east", east_ca, echo_port, max_datagram_size=east_size)
    west = make_gateway("west", west_ca, echo_port, max_datagram_size=west_size)
    await east.start()
    await west.start()
    pair = Pair(east, west, build_snapshot(east, west, east_ca, west_ca))
    try:
        east.apply(pair.snapshot)
        west.apply(pair.snapshot)
        status, reason, reader, writer = await connect_via(east)
        assert status == 200, reason
        payload = bytes(range(256)) * 4096  # 1 MiB: many full-size datagrams each way
        writer.write(payload)
        writer.write_eof()
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 20) == payload
        await close_writer(writer)
        (conn,) = east.pools["quic"].connections()
        assert conn.max_datagram_size == 1400
        (inbound,) = west.status()["inbound"]
        assert inbound["max_datagram_size"] == 1400
        assert inbound["peer_address"].startswith(f"{LOOPBACK}:")
        peer = east.status()["outbound"]["quic"]["peers"]["west"]
        assert peer["max_datagram_size"] == 1400
        assert peer["migrations"] == 0
        # GSO and GRO on loopback: the listener sent and received many datagrams per call.
        udp = west.status()["counters"]["tunnel_server"]
        assert udp["udp_datagrams_sent"] > 2 * udp["udp_send_calls"], udp
        assert udp["udp_datagrams_received"] > 2 * udp["udp_recv_calls"], udp
        assert udp["udp_send_dropped"] == 0
    finally:
        await east.aclose()
        await west.aclose()


class Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append(data)


async def _collect(proto: Collector, count: int) -> None:
    for _ in range(200):
        if len(proto.got) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"received {len(proto.got)} of {count} datagrams")


async def test_gso_sends_runs_of_equal_size_in_one_call_and_gro_splits_them_back() -> None:
    receiver, sender = Collector(), Collector()
    rx = quic_udp.open_endpoint(quic_udp.bind_socket(LOOPBACK, 0), receiver)
    tx = quic_udp.open_endpoint(
        quic_socket.open_client_socket(socket.AF_INET, rx.get_extra_info("sockname")), sender
    )
    try:
        # Two runs: 30 x 1,000 B ended by a shorter one, then 5 x 1,000 B; then one 1,200 B.
        datagrams = [bytes([i]) * 1000 for i in range(30)] + [b"s" * 500]
        datagrams += [bytes([100 + i]) * 1000 for i in range(5)] + [b"L" * 1200]
        tx.send_batch(datagrams)
        await _collect(receiver, len(datagrams))
        assert receiver.got == datagrams  # split at the right places, in order
        assert tx.counters["udp_send_calls"] == 3
        assert tx.counters["udp_datagrams_sent"] == len(datagrams)
        assert rx.counters["udp_datagrams_received"] == len(datagrams)
        assert rx.counters["udp_recv_calls"] < len(datagrams)  # GRO kept runs together
    finally:
        tx.close()
        rx.close()


async def test_without_offload_every_datagram_is_its_own_call() -> None:
    receiver = Collector()
    rx = quic_udp.open_endpoint(quic_udp.bind_socket(LOOPBACK, 0), receiver, offload=False)
    tx = quic_udp.open_endpoint(
        quic_socket.open_client_socket(socket.AF_INET, rx.get_extra_info("sockname")),
        Collector(),
        offload=False,
    )
    try:
        datagrams = [bytes([i]) * 1200 for i in range(20)]
        tx.send_batch(datagrams)
        await _collect(receiver, len(datagrams))
        assert receiver.got == datagrams
        assert tx.counters["udp_send_calls"] == 20
        assert rx.counters["udp_recv_calls"] == 20
    finally:
        tx.close()
        rx.close()
