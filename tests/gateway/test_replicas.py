"""Gateway replicas: several gateway processes of one cluster share the `tls` listener
(SO_REUSEPORT); the peer's pool spreads its connections, hence its streams, over them; killing a
replica under load loses only the streams it carried, and new calls go to the survivors."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

from structlog.testing import LogCapture

from ca.authority import CertificateAuthority
from gateway.gateway import Gateway
from tests.gateway.conftest import (
    build_snapshot,
    close_writer,
    connect_via,
    make_gateway,
)
from tests.gateway.test_conformance import echo_roundtrip, vanish


async def test_killing_a_replica_loses_only_its_streams(
    logs: LogCapture, east_ca: CertificateAuthority, west_ca: CertificateAuthority, echo_port: int
) -> None:
    east = make_gateway("east", east_ca, echo_port, tls={"connections_per_peer": 8})
    replicas: list[Gateway] = []
    first = make_gateway("west", west_ca, echo_port)
    first.settings = replace(first.settings, reuse_port=True)
    await first.start()
    port = first.listen_address("tls")[1]
    second = make_gateway("west", west_ca, echo_port)
    second.settings = replace(second.settings, reuse_port=True, tls_port=port)
    await second.start()
    replicas = [first, second]
    await east.start()
    snapshot = build_snapshot(east, first, east_ca, west_ca, transport="tls")
    for gw in (east, *replicas):
        gw.apply(snapshot)
    calls = []
    try:
        for _ in range(16):
            status, reason, reader, writer = await connect_via(east)
            assert status == 200, reason
            writer.write(b"up")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"up"
            calls.append((reader, writer))
        carried = [len(gw.ingress.active) for gw in replicas]
        assert sum(carried) == 16
        vanish(first)  # the first replica dies under load
        survivors = failed = 0
        for reader, writer in calls:
            try:
                writer.write(b"again")
                got = await asyncio.wait_for(reader.readexactly(5), 5)
                assert got == b"again"
                survivors += 1
            except (ConnectionError, asyncio.IncompleteReadError):
                failed += 1
        assert (failed, survivors) == (carried[0], carried[1])
        for _ in range(8):  # new calls go to the surviving replica
            await echo_roundtrip(east)
    finally:
        for _, writer in calls:
            with contextlib.suppress(Exception):
                await close_writer(writer)
        await east.aclose()
        for gw in replicas:
            await gw.aclose()
