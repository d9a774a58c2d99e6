"""The tunnel listener: one UDP socket, many peer-gateway QUIC connections, demultiplexed by
connection ID (model: aioquic `asyncio/server.py`, which cannot be reused because it builds
plain `QuicConnection`s, without the mTLS completion).

Datagrams that do not parse as QUIC, belong to no connection, or would open one beyond
`max_connections` are dropped, counted, and logged with their reasons at most every 10 s (a
flood must not flood the logs too). A connection whose handshake fails is logged by
`gateway.quic_mtls` with the reason; one that does not complete its handshake within
`handshake_timeout` is closed, so half-open handshakes cannot hold the connection slots.
Retry (address validation, RFC 9000 §8.1) is not used yet: peers are a small set of gateways,
but a spoofed-source flood would be cheaper to shed with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

import structlog
from aioquic._buffer import Buffer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import NetworkAddress
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from gateway import quic_udp
from gateway.quic_ack import new_connection
from gateway.quic_mtls import PeerPolicy
from gateway.stream import StreamHandler
from gateway.tunnel import CLOSE_SHUTDOWN, TunnelConnection, TunnelSettings
from mesh.naming import SpiffeId

_log = structlog.get_logger("fedgate.gateway.server")
DROP_LOG_INTERVAL = 10.0
CID_LENGTH = 8  # QuicConfiguration.connection_id_length, which TunnelSettings never changes


class TunnelServer(asyncio.DatagramProtocol):
    def __init__(
        self,
        settings: TunnelSettings,
        configuration: Callable[[], QuicConfiguration],
        policy: PeerPolicy,
        stream_handler: StreamHandler,
        identify: Callable[[SpiffeId], str] | None = None,
        log: Any = _log,
    ) -> None:
        self.settings = settings
        self._configuration = configuration  # read per connection: identity may rotate
        self._policy = policy
        self._stream_handler = stream_handler
        self._identify = identify
        self.log = log
        self._transport: Any = None  # a quic_udp.UdpEndpoint
        self._by_cid: dict[bytes, TunnelConnection] = {}
        self._closing = False
        self._dropped: dict[str, int] = {}
        self._drop_logged = -DROP_LOG_INTERVAL
        self.connections: set[TunnelConnection] = set()
        self.counters: dict[str, int] = {
            "datagrams_dropped": 0,
            "connections_refused": 0,
            "connections": 0,
        }

    @property
    def address(self) -> tuple[str, int]:
        assert self._transport is not None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return host, port

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def error_received(self, exc: Exception) -> None:
        self.log.debug("udp error", error=str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        # The shared socket is gone: every connection on it is, too.
        for conn in list(self.connections):
            conn._terminated(f"tunnel socket closed: {exc}" if exc else "tunnel socket closed")

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        data = cast(bytes, data)
        if data and not data[0] & 0x80:
            # Short header (1-RTT, every packet of an established connection): our connection
            # ID sits at a fixed place (RFC 9000 §17.3), no need to parse the header twice
            # (aioquic parses it again); anything unknown takes the full path below.
            known = self._by_cid.get(data[1 : 1 + CID_LENGTH])
            if known is not None:
                known.datagram_received(data, addr)
                return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            self._drop("not a QUIC packet")
            return
        transport = self._transport
        assert transport is not None
        conn = self._by_cid.get(header.destination_cid)
        if conn is None:
            if self._closing:
                self._drop("shutting down", "connections_refused")
                return
            if header.packet_type != QuicPacketType.INITIAL or len(data) < (
                SMALLEST_MAX_DATAGRAM_SIZE
            ):
                self._drop("unknown connection")
                return
            config = self._configuration()
            if header.version is not None and header.version not in config.supported_versions:
                # RFC 9000 §6: answer an unknown version with Version Negotiation.
                transport.sendto(
                    encode_quic_version_negotiation(
                        source_cid=header.destination_cid,
                        destination_cid=header.source_cid,
                        supported_versions=config.supported_versions,
                    ),
                    addr,
                )
                return
            if len(self.connections) >= self.settings.max_connections:
                self._drop("max_connections reached", "connections_refused")
                return
            conn = self._new_connection(config, header.destination_cid, transport)
        conn.datagram_received(data, addr)

    def _drop(self, why: str, counter: str = "datagrams_dropped") -> None:
        """Count a dropped datagram; log at most every DROP_LOG_INTERVAL (a flood must not
        flood the logs too)."""
        self.counters[counter] += 1
        self._dropped[why] = self._dropped.get(why, 0) + 1
        now = time.monotonic()
        if now - self._drop_logged >= DROP_LOG_INTERVAL:
            self._drop_logged = now
            self.log.warning("tunnel datagrams dropped", reasons=dict(self._dropped))
            self._dropped.clear()

    def _new_connection(
        self, config: QuicConfiguration, original_dcid: bytes, transport: Any
    ) -> TunnelConnection:
        quic = new_connection(
            configuration=config,
            original_destination_connection_id=original_dcid,
            peer_policy=self._policy,
            max_streams=self.settings.max_streams,
            lone_ack_delay=self.settings.lone_ack_delay,
        )
        conn = TunnelConnection(
            quic,
            self.settings,
            log=self.log,
            stream_handler=self._stream_handler,
            identify=self._identify,
        )
        conn.use_transport(transport)
        conn.on_cid_issued = lambda cid: self._by_cid.__setitem__(cid, conn)
        conn.on_cid_retired = self._cid_retired
        conn.on_closed = self._closed
        # A peer that never completes its handshake must not hold a slot until the idle
        # timeout (max_connections would let a handshake flood lock real peers out).
        loop = asyncio.get_running_loop()
        loop.call_later(self.settings.handshake_timeout, self._handshake_deadline, conn)
        self._by_cid[original_dcid] = conn
        self._by_cid[quic.host_cid] = conn
        self.connections.add(conn)
        self.counters["connections"] += 1
        return conn

    def _handshake_deadline(self, conn: TunnelConnection) -> None:
        if not conn.connected and not conn.closed:
            conn.close("handshake not completed in time", CLOSE_SHUTDOWN)
            conn._terminated("handshake not completed in time")

    def _cid_retired(self, cid: bytes) -> None:
        self._by_cid.pop(cid, None)

    def _closed(self, conn: TunnelConnection) -> None:
        self.connections.discard(conn)
        for cid in [c for c, p in self._by_cid.items() if p is conn]:
            del self._by_cid[cid]

    async def aclose(self, grace: float = 1.0) -> None:
        """Close every connection (CONNECTION_CLOSE sent), wait briefly, stop listening."""
        self._closing = True  # accept no new connection meanwhile
        conns = list(self.connections)
        for conn in conns:
            conn.close("gateway shutting down", CLOSE_SHUTDOWN)
        if conns:
            await asyncio.wait(
                [asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=grace
            )
        for conn in list(self.connections):
            conn._terminated("gateway shut down")
        if self._transport is not None:
            self._transport.close()


async def serve(
    host: str,
    port: int,
    settings: TunnelSettings,
    configuration: Callable[[], QuicConfiguration],
    policy: PeerPolicy,
    stream_handler: StreamHandler,
    identify: Callable[[SpiffeId], str] | None = None,
    log: Any = _log,
) -> TunnelServer:
    server = TunnelServer(settings, configuration, policy, stream_handler, identify, log)
    sock = quic_udp.bind_socket(host, port)
    # Burst receive and GSO send (`gateway.quic_udp`); its counters join the server's.
    quic_udp.open_endpoint(sock, server, offload=settings.udp_offload, counters=server.counters)
    return server
