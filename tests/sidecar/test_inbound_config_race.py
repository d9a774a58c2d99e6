"""A destination sidecar decides a stream on the config current when its header arrives.

A policy applied while the caller's handshake ran (after its TCP connect, before its stream
header) once never reached that stream: the inbound decided on the config it held at the
connect, and `enforce` had run before the stream was registered. On loopback, with real
sidecars and mTLS (`tests.sidecar.loopback`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from ca.tls import client_context
from mesh.codec import StreamHeader, encode_header, reply_from_json, split_frame
from mesh.model import AuthorizationPolicy, AuthorizationRule, AuthzSource
from tests.sidecar.conftest import EAST, PAYMENTS, Logs, Pki, spiffe
from tests.sidecar.loopback import Rig, start_rig, stop_rig


@pytest.fixture
async def rig(pki: Pki, logs: Logs) -> AsyncIterator[Rig]:
    r = await start_rig(pki)
    try:
        yield r
    finally:
        await stop_rig(r)


async def test_a_policy_applied_during_the_handshake_decides_the_stream(rig: Rig) -> None:
    caller = spiffe(EAST, "client")
    ctx = client_context(rig.pki.svid(rig.pki.east, caller), rig.pki.bundle)
    # The TLS handshake is done when this returns: the inbound has taken the connection.
    reader, writer = await asyncio.open_connection("127.0.0.2", rig.inbound_port, ssl=ctx)
    try:
        deny = AuthorizationPolicy(
            "no-client", PAYMENTS, "DENY", (AuthorizationRule((AuthzSource((caller.uri,)),)),)
        )
        rig.east.apply(dataclasses.replace(rig.snapshot(version="v2"), authorization=(deny,)))
        writer.write(encode_header(StreamHeader(PAYMENTS, rig.app_port, "east")))
        async with asyncio.timeout(5):
            answer = await reader.read()
    finally:
        writer.close()
    frame = split_frame(answer)
    assert frame is not None, answer
    reply = reply_from_json(frame[0])
    assert reply.status == 403, reply
    assert "denied by authorization policy shop/no-client" in reply.reason
    assert rig.apps["east"].connections == 0
