"""Per-peer tunnel statistics (the source of the per-gateway-pair metrics), over real tunnels
on loopback with fast keepalive probes, for both multiplexed transports."""

from __future__ import annotations

import asyncio

import pytest

from ca.authority import CertificateAuthority
from gateway.gateway import LinkStats
from tests.gateway.conftest import LogCapture, close_writer, connect_via, start_pair, stop_pair


def west_link(stats: list[LinkStats], transport: str) -> LinkStats | None:
    return next((s for s in stats if s.peer == "west" and s.transport == transport), None)


@pytest.mark.parametrize("transport", ["tls", "quic"])
async def test_link_stats_count_streams_handshakes_and_answered_probes(
    transport: str,
    logs: LogCapture,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    echo_port: int,
) -> None:
    pair = await start_pair(
        east_ca,
        west_ca,
        echo_port,
        transport,
        tls={"keepalive_interval": 0.05},
        keepalive_interval=0.05,
    )
    try:
        assert west_link(pair.east.link_stats(), transport) is None  # nothing dialled yet
        for _ in range(3):
            status, reason, _, writer = await connect_via(pair.east)
            assert status == 200, reason
            await close_writer(writer)
        link = west_link(pair.east.link_stats(), transport)
        assert link is not None
        assert (link.connected, link.streams, link.handshake_failures) == (True, 3, 0)
        assert link.handshakes == link.connections >= 1  # one per pooled connection
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while (link.probes_answered < 3 or link.rtt is None) and loop.time() < deadline:
            await asyncio.sleep(0.05)
            link = west_link(pair.east.link_stats(), transport)
            assert link is not None
        assert link.probes_answered >= 3, link
        assert link.rtt is not None
        assert 0 < link.rtt < 1.0
        assert link.probes - link.probes_answered <= link.connections  # none lost on loopback
        # The accepting side dials nothing: it reports no link toward east.
        assert pair.west.link_stats() == []
    finally:
        await stop_pair(pair)
