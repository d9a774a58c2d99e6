"""The h2 gRPC client (`ca.h2grpc`) against the real grpcio config server: its failure paths.

The happy paths run in the existing stream, stall, delta, converge and CA tests over both
clients (`tests/wires.py`); these are the ways a stream ends, and the identity check.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ca.authority import CertificateAuthority
from ca.h2grpc import H2Call, H2Channel, RpcError, TlsCredentials
from ca.verify import utcnow
from federation.api.client import ConfigClient
from federation.api.config_pb2 import ConfigRequest, ConfigResponse
from federation.api.session import NodeInfo
from federation.api.wire import KEEPALIVE_INTERVAL, METHOD
from federation.server import (
    MIN_PING_INTERVAL,
    ConfigDiscoveryServicer,
    ConfigServer,
    SnapshotPublisher,
    serve,
)
from mesh import grpcwire
from mesh.naming import SpiffeId, controller_dns_name
from tests.federation.test_fed_stream import snapshot
from tests.helpers import until
from tests.wires import tls_config_server

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

HELLO = ConfigRequest(node=NodeInfo("sidecar-1", "east").to_proto()).SerializeToString()


@pytest.fixture
async def plain() -> AsyncIterator[tuple[SnapshotPublisher, ConfigServer]]:
    publisher = SnapshotPublisher()
    publisher.update(snapshot("10.0.0.1"))
    running = await serve(ConfigDiscoveryServicer(publisher), "127.0.0.1:0", None)
    try:
        yield publisher, running
    finally:
        await running.stop(None)


async def test_a_config_stream_over_h2_reads_the_snapshot_and_sees_the_server_go(
    plain: tuple[SnapshotPublisher, ConfigServer],
) -> None:
    _, running = plain
    channel = await H2Channel.connect(f"127.0.0.1:{running.port}", None)
    try:
        call = channel.call(METHOD)
        await call.write(HELLO)
        data = await call.read()
        assert data is not None
        assert ConfigResponse.FromString(data).version_info
        # The server goes away mid-stream (GOAWAY, then the connection closes): the call ends
        # UNAVAILABLE and the channel takes no new call.
        await running.stop(None)
        with pytest.raises(RpcError) as ended:
            await _drain(call)
        assert ended.value.code in (grpcwire.UNAVAILABLE, grpcwire.CANCELLED)
        assert channel.core.closing
        with pytest.raises(RpcError) as refused:
            channel.call(METHOD)
        assert refused.value.code == grpcwire.UNAVAILABLE
    finally:
        await channel.aclose()


async def test_a_graceful_goaway_lets_the_open_call_run_and_refuses_new_ones(
    plain: tuple[SnapshotPublisher, ConfigServer],
) -> None:
    publisher, running = plain
    channel = await H2Channel.connect(f"127.0.0.1:{running.port}", None)
    try:
        call = channel.call(METHOD)
        await call.write(HELLO)
        assert await call.read() is not None
        stopping = asyncio.ensure_future(running.stop(30.0))  # GOAWAY, then a grace period
        await until(lambda: channel.core.closing)
        with pytest.raises(RpcError, match="UNAVAILABLE"):
            channel.call(METHOD)
        newer = snapshot("10.0.0.2")
        publisher.update(newer)  # the open stream is still served
        data = await call.read()
        assert data is not None
        assert ConfigResponse.FromString(data).version_info == newer.version
        call.cancel()
        await stopping
    finally:
        await channel.aclose()


async def test_a_message_over_the_limit_ends_the_call_resource_exhausted(
    plain: tuple[SnapshotPublisher, ConfigServer],
) -> None:
    _, running = plain
    channel = await H2Channel.connect(f"127.0.0.1:{running.port}", None, max_message=64)
    try:
        call = channel.call(METHOD)
        await call.write(HELLO)
        with pytest.raises(RpcError) as refused:
            await call.read()
        assert refused.value.code == grpcwire.RESOURCE_EXHAUSTED
        assert "larger than max" in refused.value.details
    finally:
        await channel.aclose()


async def test_a_grpc_status_from_the_server_is_surfaced() -> None:
    publisher = SnapshotPublisher()
    publisher.update(snapshot("10.0.0.1"))
    servicer = ConfigDiscoveryServicer(publisher, authorize=lambda context: "not a known SVID")
    running = await serve(servicer, "127.0.0.1:0", None)
    channel = await H2Channel.connect(f"127.0.0.1:{running.port}", None)
    try:
        call = channel.call(METHOD)
        await call.write(HELLO)
        with pytest.raises(RpcError) as refused:
            await call.read()
        assert refused.value.code == grpcwire.PERMISSION_DENIED
        assert refused.value.details == "not a known SVID"
        with pytest.raises(RpcError) as unknown:
            await channel.unary("/fedgate.config.v1.ConfigDiscovery/NoSuchMethod", b"")
        assert unknown.value.code == grpcwire.UNIMPLEMENTED
    finally:
        await channel.aclose()
        await running.stop(None)


@pytest.fixture
async def tls() -> AsyncIterator[tuple[ConfigServer, TlsCredentials]]:
    """A config server presenting the controller's identity, requiring a client SVID."""
    east = CertificateAuthority.create("east.fedgate.local", utcnow())
    client_svid = east.issue(SpiffeId("east.fedgate.local", "demo", "echo"), utcnow())
    running, control_root = await tls_config_server(east.root_pem)
    try:
        yield running, TlsCredentials(control_root, client_svid.cert_pem, client_svid.key_pem)
    finally:
        await running.stop(None)


async def test_mtls_with_the_controller_identity_streams_config(
    tls: tuple[ConfigServer, TlsCredentials],
) -> None:
    running, creds = tls
    client = ConfigClient(
        f"127.0.0.1:{running.port}",
        node_id="sidecar-1",
        cluster="east",
        credentials=creds,
        server_name_override=controller_dns_name(),
        wire="h2",
    )
    stream = client.snapshots()
    try:
        first = await asyncio.wait_for(anext(stream), 10.0)
        assert first.version
    finally:
        await stream.aclose()


async def test_a_server_with_the_wrong_identity_is_refused(
    tls: tuple[ConfigServer, TlsCredentials],
) -> None:
    running, creds = tls
    with pytest.raises(RpcError) as refused:
        await H2Channel.connect(f"127.0.0.1:{running.port}", creds, "ca.east.fedgate.local")
    assert refused.value.code == grpcwire.UNAVAILABLE
    assert "certificate" in refused.value.details.lower()
    # And a client without an SVID is turned away by the server's mTLS (TLS 1.3: the refusal
    # may come at the handshake or with the first read).
    anonymous = TlsCredentials(creds.root_pem)
    with pytest.raises(RpcError) as refused:
        await _hello(f"127.0.0.1:{running.port}", anonymous)
    assert refused.value.code == grpcwire.UNAVAILABLE


async def _hello(target: str, creds: TlsCredentials) -> None:
    async with await H2Channel.connect(target, creds, controller_dns_name()) as channel:
        call = channel.call(METHOD)
        await call.write(HELLO)
        await _drain(call)


async def _drain(call: H2Call) -> None:
    while await call.read() is not None:
        pass


def test_the_wrong_kind_of_credentials_is_refused_up_front() -> None:
    tls = TlsCredentials(b"roots")
    with pytest.raises(ValueError, match=r"the grpcio client needs grpc\.ChannelCredentials"):
        ConfigClient("127.0.0.1:1", node_id="n", cluster="east", credentials=tls, wire="grpcio")
    with pytest.raises(ValueError, match="unknown gRPC client"):
        ConfigClient("127.0.0.1:1", node_id="n", cluster="east", insecure=True, wire="h3")  # type: ignore[arg-type]
    client = ConfigClient("127.0.0.1:1", node_id="n", cluster="east", credentials=tls)  # h2
    with pytest.raises(ValueError, match=r"the h2 client needs ca\.h2grpc\.TlsCredentials"):
        client.set_credentials(object())  # type: ignore[arg-type]


async def _hold(running: ConfigServer, interval: float, seconds: float) -> tuple[int, str]:
    """Hold a config stream open `seconds` with keepalive pings every `interval` s; the pings
    sent and how the stream ended ("" if it was still up)."""
    channel = await H2Channel.connect(
        f"127.0.0.1:{running.port}", None, keepalive_interval=interval
    )
    try:
        call = channel.call(METHOD)
        await call.write(HELLO)
        try:
            async with asyncio.timeout(seconds):
                await _drain(call)
        except TimeoutError:
            return channel.core.pings, ""
        except RpcError as e:
            return channel.core.pings, str(e)
        return channel.core.pings, "ended OK"
    finally:
        await channel.aclose()


async def test_pings_faster_than_the_controller_allows_earn_goaway_too_many_pings(
    plain: tuple[SnapshotPublisher, ConfigServer],
) -> None:
    # The counterpart of the test below: the server's policy is real and the reason surfaces.
    pings, ended = await _hold(plain[1], 1.0, 20.0)
    assert "too_many_pings" in ended
    assert pings >= 3


async def test_pings_at_the_controllers_minimum_interval_keep_the_stream() -> None:
    # federation.server allows one ping per MIN_PING_INTERVAL (10 s) without data; proxies
    # ping every KEEPALIVE_INTERVAL (30 s): the production margin is the first assertion. The
    # policy itself is checked on a server scaled down to one ping per 2 s, pinged every 3 s:
    # 4 pings, as many as earn GOAWAY when they come too fast (the test above), in 14 s.
    assert KEEPALIVE_INTERVAL >= MIN_PING_INTERVAL + 1.0
    publisher = SnapshotPublisher()
    publisher.update(snapshot("10.0.0.1"))
    running = await serve(
        ConfigDiscoveryServicer(publisher), "127.0.0.1:0", None, min_ping_interval=2.0
    )
    try:
        pings, ended = await _hold(running, 3.0, 14.0)
    finally:
        await running.stop(None)
    assert (pings, ended) == (4, "")
