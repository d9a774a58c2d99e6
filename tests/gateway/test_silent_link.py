"""A silently dropped link between two gateways (issue 15: the WAN dropped with nftables, no
RST, no ICMP), on loopback: east dials west through a relay that can go silent, forwarding
nothing either way while its sockets stay open.

A call whose stream east opens on the dead link, or that writes on a stream opened before
(an inner connection the sidecar pooled), ends within the silence timeout plus the suspect
probe's (`gateway.liveness`: 1 s + 0.5 s), not after 3 missed periodic probes: refused as a
peer-unreachable connect failure, or reset, both of which the sidecar retries elsewhere; the
peer is then unreachable for every sidecar (the pool's peer health). A busy healthy link, and
a long one whose replies come later than the silence timeout, are never declared dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from structlog.testing import LogCapture

from ca.authority import CertificateAuthority
from gateway.gateway import Gateway
from gateway.health import HealthSettings
from mesh.connect import ConnectRequest, encode_request, response_peer_unreachable
from mesh.model import Snapshot
from tests.gateway.conftest import (
    ECHO,
    ECHO_PORT,
    LOOPBACK,
    build_snapshot,
    close_writer,
    connect_via,
    make_gateway,
)
from tests.helpers import until

# ~1.5 s by the settings; generous for a loaded 2-core machine, well under the 3 periodic
# probes (3-4 s) and the 5 s client timeout that ended such calls before.
REFUSED_WITHIN = 3.0


class TcpRelay:
    """Relays TCP connections to `target`; `silent` drops every byte either way, `delay`
    holds each back that many seconds (a long link)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.silent = False
        self.delay = 0.0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_w]
        for a, b in ((reader, up_w), (up_r, writer)):
            task = asyncio.create_task(self._pump(a, b), name="test:relay")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            loop = asyncio.get_running_loop()
            while data := await r.read(65536):
                if self.silent:
                    continue
                if self.delay:
                    loop.call_later(self.delay, w.write, data)  # in order: FIFO timers
                else:
                    w.write(data)
                    await w.drain()

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


class UdpRelay(asyncio.DatagramProtocol):
    """Relays one client's datagrams to `target` and back; `silent` drops them all, `delay`
    holds each back that many seconds."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.silent = False
        self.delay = 0.0
        self._client: Any = None
        self._front: Any = None
        self._back: Any = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._front, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(LOOPBACK, 0))
        self._back, _ = await loop.create_datagram_endpoint(
            lambda: _Back(self), remote_addr=self.target
        )
        port: int = self._front.get_extra_info("sockname")[1]
        return port

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._client = addr
        if not self.silent:
            self._later(self._back.sendto, data)

    def back(self, data: bytes) -> None:
        if not self.silent and self._client is not None:
            self._later(self._front.sendto, data, self._client)

    def _later(self, send: Any, *args: Any) -> None:
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, send, *args)
        else:
            send(*args)

    async def aclose(self) -> None:
        self._front.close()
        self._back.close()


class _Back(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay.back(data)


@dataclass
class Link:
    east: Gateway
    west: Gateway
    relay: TcpRelay | UdpRelay


@pytest.fixture(params=["tls", "quic"])
async def link(
    request: pytest.FixtureRequest,
    logs: LogCapture,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    echo_port: int,
) -> AsyncIterator[Link]:
    """East and west gateways; east reaches west's `tls` or `quic` listener via a relay.
    `request.param`: the transport, or (transport, east's probe settings)."""
    transport, health = (
        request.param if isinstance(request.param, tuple) else (request.param, HealthSettings())
    )
    east = make_gateway("east", east_ca, echo_port, tls={"health": health}, health=health)
    west = make_gateway("west", west_ca, echo_port)
    await east.start()
    await west.start()
    relay = (TcpRelay if transport == "tls" else UdpRelay)(west.listen_address(transport))
    port = await relay.start()
    snapshot = build_snapshot(east, west, east_ca, west_ca, transport=transport)
    west.apply(snapshot)
    east.apply(via_relay(snapshot, port))
    try:
        yield Link(east, west, relay)
    finally:
        await east.aclose()
        await west.aclose()
        await relay.aclose()


def via_relay(snapshot: Snapshot, port: int) -> Snapshot:
    clusters = []
    for info in snapshot.clusters:
        if info.name == "west" and info.gateway is not None:
            info = replace(info, gateway=replace(info.gateway, tunnel_port=port))
        clusters.append(info)
    return replace(snapshot, clusters=tuple(clusters))


async def echo_call(east: Gateway) -> None:
    """One call through east to west's echo service: the answer comes back."""
    status, reason, reader, writer = await connect_via(east)
    assert status == 200, reason
    try:
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    finally:
        await close_writer(writer)


def peer_health(east: Gateway, transport: str) -> str:
    return east.pools[transport].peer_health("west")


@pytest.mark.parametrize("link", ["tls", "quic"], indirect=True)
async def test_a_call_on_a_silently_dropped_link_is_refused_fast_as_peer_unreachable(
    link: Link,
) -> None:
    transport = "tls" if isinstance(link.relay, TcpRelay) else "quic"
    await echo_call(link.east)  # a pooled link, answered
    assert peer_health(link.east, transport) == "healthy"
    link.relay.silent = True
    began = time.monotonic()
    host, port = link.east.egress_address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(encode_request(ConnectRequest(ECHO, ECHO_PORT, "west", "")))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REFUSED_WITHIN)
    took = time.monotonic() - began
    await close_writer(writer)
    print(f"\n{transport}: refused {took:.2f} s after the link went silent: {head[:80]!r}")
    assert head.startswith(b"HTTP/1.1 502 "), head
    assert b"liveness probe unanswered" in head
    assert response_peer_unreachable(head)  # the sidecar avoids west and retries elsewhere
    # Every sidecar hears of it (the peer-health feed reads this) once the other pooled
    # connections (`tls`: 2), probed at once, missed too; then a call is refused at once.
    await until(lambda: peer_health(link.east, transport) == "unreachable", within=2.0)
    print(f"{transport}: west unreachable {time.monotonic() - began:.2f} s after")
    status, reason, _, w = await connect_via(link.east)
    await close_writer(w)
    assert status == 503
    assert "unreachable" in reason


@pytest.mark.parametrize("link", ["tls", "quic"], indirect=True)
async def test_a_call_that_waits_for_a_dial_over_a_silent_link_is_refused_fast(
    link: Link,
) -> None:
    """No connection to west yet (calls went local until the drop): the first call's dial
    hangs in its handshake (5 s); the call is refused after `dial_wait` (2 s), marked
    peer-unreachable, and retried elsewhere by the sidecar."""
    link.relay.silent = True
    began = time.monotonic()
    status, reason, _, writer = await connect_via(link.east)
    took = time.monotonic() - began
    await close_writer(writer)
    print(f"\n{link.relay.__class__.__name__}: refused {took:.2f} s after: {status} {reason}")
    assert status == 504
    assert "not connected within 2s" in reason
    assert took < REFUSED_WITHIN


@pytest.mark.parametrize("link", ["tls", "quic"], indirect=True)
async def test_a_request_on_a_stream_opened_before_the_drop_ends_fast(link: Link) -> None:
    """An inner connection pooled by a sidecar: its stream was answered before the link went
    silent; a request written on it then gets no answer, and the stream is reset within the
    silence timeout plus the suspect probe's, which the sidecar retries (an unanswered request
    on a pooled connection), instead of waiting 3 missed periodic probes."""
    transport = "tls" if isinstance(link.relay, TcpRelay) else "quic"
    status, reason, reader, writer = await connect_via(link.east)
    assert status == 200, reason
    try:
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        link.relay.silent = True
        began = time.monotonic()
        writer.write(b"request")
        with contextlib.suppress(ConnectionError):
            got = await asyncio.wait_for(reader.read(100), REFUSED_WITHIN)
            assert got == b""  # ended, never answered
        print(f"\n{transport}: pooled stream ended {time.monotonic() - began:.2f} s after")
    finally:
        await close_writer(writer)
    await until(lambda: peer_health(link.east, transport) == "unreachable", within=2.0)


@pytest.mark.parametrize("link", ["tls", "quic"], indirect=True)
async def test_a_busy_healthy_link_is_never_suspected_dead(link: Link) -> None:
    """Calls in parallel, each moving data both ways (`tls`: 20 x 256 KiB; `quic`, slow in
    pure Python and for low volumes: 10 x 64 KiB), for ~4 s: no call refused, no connection
    turned unhealthy, the peer healthy throughout."""
    transport = "tls" if isinstance(link.relay, TcpRelay) else "quic"
    parallel, chunk = (20, 65536) if transport == "tls" else (10, 16384)
    down: list[str] = []

    async def bulk() -> None:
        status, reason, reader, writer = await connect_via(link.east)
        assert status == 200, reason
        try:
            for _ in range(4):
                writer.write(b"x" * chunk)
                await reader.readexactly(chunk)
                if peer_health(link.east, transport) != "healthy":
                    down.append(peer_health(link.east, transport))
        finally:
            await close_writer(writer)

    await echo_call(link.east)
    deadline, rounds = time.monotonic() + 4.0, 0
    while time.monotonic() < deadline and rounds < 200:  # bounded either way
        await asyncio.gather(*(bulk() for _ in range(parallel)))
        rounds += 1
    conns = link.east.pools[transport].connections_to("west")
    suspected = [c.health.suspected for c in conns]
    print(f"\n{transport}: {rounds * parallel} bulk calls, suspect probes {suspected}")
    assert conns
    assert all(c.health.healthy for c in conns)
    assert link.east.pools[transport].counters["losses"] == 0
    assert down == []
    assert link.east.egress.counters["refused"] == 0


LONG_LINK = HealthSettings(silence_timeout=0.3)  # every reply is late on a long link


@pytest.mark.parametrize(
    "link",
    [pytest.param(("tls", LONG_LINK), id="tls"), pytest.param(("quic", LONG_LINK), id="quic")],
    indirect=True,
)
async def test_replies_later_than_the_silence_timeout_on_a_long_link_are_waited_for(
    link: Link,
) -> None:
    """A 0.6 s round trip (longer than the 0.5 s suspect timeout) and a 0.3 s silence
    timeout: the link is suspected while calls wait, but its probe is answered in time (it
    waits 2 round trips, known from the handshake before any probe), so every call is
    answered and nothing is closed or marked down."""
    transport = "tls" if isinstance(link.relay, TcpRelay) else "quic"
    link.relay.delay = 0.3  # from the handshake on: it gives the first round-trip estimate
    await echo_call(link.east)
    await asyncio.gather(*(echo_call(link.east) for _ in range(10)))
    conns = link.east.pools[transport].connections_to("west")
    assert sum(c.health.suspected for c in conns) >= 1  # the silence passed: suspected
    assert link.east.pools[transport].counters["losses"] == 0
    assert peer_health(link.east, transport) == "healthy"
