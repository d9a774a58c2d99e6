"""Multiplexed sidecar-to-sidecar connections end to end on the loopback rig: real sidecars,
real TLS, a real CONNECT-speaking gateway, real echo apps (see tests/sidecar/loopback.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator

import pytest

from tests.helpers import until
from tests.sidecar.conftest import EAST, Logs, Pki, endpoint, spiffe
from tests.sidecar.loopback import VIP, Rig, start_rig, stop_rig
from tests.sidecar.test_proxy import close, converse, wait_log

CLIENT = spiffe(EAST, "client").uri


@pytest.fixture
async def rig(pki: Pki, logs: Logs) -> AsyncIterator[Rig]:
    r = await start_rig(pki)
    try:
        async with asyncio.timeout(60):  # a bug must fail the test, not hang it
            yield r
    finally:
        await stop_rig(r)


async def echo_call(rig: Rig, size: int = 1024) -> bytes:
    """One app connection: `size` bytes echoed, then half-close; the app's goodbye."""
    reader, writer = await rig.dial((VIP, rig.app_port))
    try:
        payload = os.urandom(size)
        writer.write(payload)
        assert await reader.readexactly(size) == payload
        writer.write_eof()
        return await reader.read()
    finally:
        await close(writer)


async def open_call(rig: Rig) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An app connection that is established (one echo done) and left open."""
    reader, writer = await rig.dial((VIP, rig.app_port))
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    return reader, writer


async def assert_reset_soon(reader: asyncio.StreamReader) -> None:
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(5):
            await reader.readexactly(1)


async def test_200_app_connections_share_a_few_handshakes(rig: Rig, logs: Logs) -> None:
    rig.apply(weights=(("east", 100),))
    results = await asyncio.gather(*(echo_call(rig) for _ in range(200)))
    assert results == [b"payments-0:bye"] * 200
    pool = rig.source.outbound.pool
    # No handshake per call: at most the pool's connections to the one destination.
    assert 1 <= rig.east.inbound.handshakes <= pool.max_connections
    assert pool.dials == rig.east.inbound.handshakes
    accepted = [e for e in logs if e["event"] == "inbound accepted" and e["pod"] == "payments-0"]
    assert len(accepted) == 200
    assert {e["caller"] for e in accepted} == {CLIENT}  # each stream keeps the caller
    closed = [e for e in logs if e["event"] == "outbound closed"]
    assert len(closed) == 200
    assert all(e["smux"].startswith("m") and "reason" not in e for e in closed)
    # Half-close and large transfers work over a stream as over a connection.
    assert await converse(rig, (VIP, rig.app_port)) == b"payments-0:bye"


async def test_remote_calls_share_one_connect_through_the_gateway(rig: Rig, logs: Logs) -> None:
    rig.apply(weights=(("west", 100),))
    results = await asyncio.gather(*(echo_call(rig) for _ in range(20)))
    assert results == [b"payments-w0:bye"] * 20
    assert len(rig.gateway.requests) == rig.west.inbound.handshakes <= 4
    accepted = [e for e in logs if e["event"] == "inbound accepted" and e["pod"] == "payments-w0"]
    assert [e["caller"] for e in accepted] == [CLIENT] * 20


async def test_revoking_the_caller_resets_its_streams(rig: Rig, logs: Logs) -> None:
    rig.apply(weights=(("east", 100),))
    calls = [await open_call(rig) for _ in range(3)]
    assert len(rig.east.inbound.muxed) == 1
    denied = dataclasses.replace(
        rig.snapshot(version="v2", weights=(("east", 100),)), denied=(CLIENT,)
    )
    for sc in (rig.source, rig.east, rig.west):
        sc.apply(denied)
    for reader, writer in calls:  # every stream of the caller's pooled connection fails
        await assert_reset_soon(reader)
        await close(writer)
    await until(lambda: not rig.east.inbound.muxed, what="the inbound closed the connection")
    await until(lambda: not rig.source.outbound.pool.connections(), what="the pool let it go")
    closed = await wait_log(logs, "smux connection closed", reason="denied")
    assert closed["peer"] == CLIENT
    # New calls are refused at the handshake (the caller's identity is denied), ...
    reader, writer = await rig.dial((VIP, rig.app_port))
    writer.write(b"x")
    await assert_reset_soon(reader)
    await close(writer)
    refused = await wait_log(logs, "inbound refused", reason="denied")
    assert refused["pod"] == "payments-0"
    # ... and served again on a new connection once the deny entry is lifted.
    rig.apply(version="v3", weights=(("east", 100),))
    assert await echo_call(rig) == b"payments-0:bye"


async def test_revoking_the_destination_closes_the_pooled_connection(rig: Rig, logs: Logs) -> None:
    rig.apply(weights=(("east", 100),))
    reader, writer = await open_call(rig)
    server = spiffe(EAST, "payments").uri
    denied = dataclasses.replace(
        rig.snapshot(version="v2", weights=(("east", 100),)), denied=(server,)
    )
    rig.source.apply(denied)  # only the source learns it: its own pool must act
    await assert_reset_soon(reader)
    await close(writer)
    assert not rig.source.outbound.pool.connections()
    closed = await wait_log(logs, "smux connection closed", reason="denied", pod="client-0")
    assert closed["peer"] == server


async def test_a_peer_identity_the_routes_drop_closes_its_connection(rig: Rig, logs: Logs) -> None:
    rig.apply(weights=(("east", 100),))
    reader, writer = await open_call(rig)
    assert len(rig.source.outbound.pool.connections()) == 1
    # The endpoint now must present another identity: the pooled connection to it goes.
    rig.apply(
        version="v2",
        weights=(("east", 100),),
        endpoints=(endpoint("east", "127.0.0.2", "payments-0", sa="ledger"),),
    )
    await assert_reset_soon(reader)
    await close(writer)
    await until(lambda: not rig.source.outbound.pool.connections(), what="connection closed")
    gone = await wait_log(logs, "smux connection closed", pod="client-0")
    assert "no longer allowed" in gone["reason"]


async def test_a_destination_without_multiplexing_is_served_per_connection(
    pki: Pki, logs: Logs
) -> None:
    rig = await start_rig(pki, dest_multiplex=False)
    try:
        rig.apply(weights=(("east", 100),))
        for _ in range(3):
            assert await echo_call(rig) == b"payments-0:bye"
        assert rig.source.outbound.pool.dials == 0
        assert rig.east.inbound.handshakes == 3  # one per call, as before multiplexing
        closed = [e for e in logs if e["event"] == "outbound closed"]
        # The first call offered smux (its ticket belongs to that context); the next ones
        # go per connection at once, the third resuming the second's session.
        assert [("smux" in e, e["tls_resumed"]) for e in closed] == [
            (False, False),
            (False, False),
            (False, True),
        ]
    finally:
        await stop_rig(rig)


async def test_an_idle_connection_closes_and_the_next_call_dials_anew(pki: Pki, logs: Logs) -> None:
    rig = await start_rig(pki, source_settings={"mux_idle_timeout": 0.2})
    try:
        rig.apply(weights=(("east", 100),))
        pool = rig.source.outbound.pool
        assert await echo_call(rig) == b"payments-0:bye"
        assert len(pool.connections()) == 1
        await until(lambda: not pool.connections(), what="the idle connection closed")
        idle = await wait_log(logs, "smux connection closed", pod="client-0")
        assert idle["reason"] == "idle for 0.2 s"
        assert await echo_call(rig) == b"payments-0:bye"
        assert pool.dials == 2
        assert rig.east.inbound.handshakes == 2
    finally:
        await stop_rig(rig)
