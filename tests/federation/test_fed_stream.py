"""The config stream over real gRPC on loopback (plaintext here; the lead wires mTLS)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
import pytest
from structlog.testing import capture_logs

from federation.api.client import ConfigClient
from federation.api.config_pb2 import ConfigRequest, ConfigResponse
from federation.api.config_pb2_grpc import ConfigDiscoveryStub
from federation.api.session import NodeInfo
from federation.generate import generate
from federation.merge import merge
from federation.server import ConfigDiscoveryServicer, ConfigServer, SnapshotPublisher, serve
from mesh.model import Snapshot
from tests.federation.fed_factories import export, info
from tests.helpers import until
from tests.wires import wire  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("no_leaked_tasks", "wire")


def snapshot(*addresses: str, roots: tuple[str, ...] | None = None) -> Snapshot:
    clusters = [info("east", roots=roots)]
    return generate(clusters, merge(clusters, [export("east", addresses=addresses)], {}), [])


@pytest.fixture
async def server() -> AsyncIterator[
    tuple[SnapshotPublisher, ConfigDiscoveryServicer, ConfigServer]
]:
    publisher = SnapshotPublisher()
    servicer = ConfigDiscoveryServicer(publisher)
    running = await serve(servicer, "127.0.0.1:0", None)
    try:
        yield publisher, servicer, running
    finally:
        await running.stop(None)


def client(
    port: int,
    name: str = "sidecar-1",
    validate: Callable[[Snapshot], None] | None = None,
    backoff_initial: float = 0.2,
) -> ConfigClient:
    return ConfigClient(
        f"127.0.0.1:{port}",
        node_id=name,
        cluster="east",
        insecure=True,
        validate=validate,
        backoff_initial=backoff_initial,
    )


async def test_client_receives_current_then_newer_snapshots(
    server: tuple[SnapshotPublisher, ConfigDiscoveryServicer, ConfigServer],
) -> None:
    publisher, servicer, running = server
    s1, s2 = snapshot("10.0.0.1"), snapshot("10.0.0.2")
    publisher.update(s1)
    c = client(running.port)
    stream = c.snapshots()
    try:
        assert await asyncio.wait_for(anext(stream), 5.0) == s1
        assert publisher.update(s2)
        assert not publisher.update(s2)
        assert await asyncio.wait_for(anext(stream), 5.0) == s2
        assert c.latest == s2
        await until(lambda: servicer.acks == 2)
    finally:
        await stream.aclose()


async def test_nack_is_logged_and_later_versions_still_arrive(
    server: tuple[SnapshotPublisher, ConfigDiscoveryServicer, ConfigServer],
) -> None:
    publisher, servicer, running = server
    s1, s2, s3 = snapshot("10.0.0.1"), snapshot("10.0.0.2"), snapshot("10.0.0.3")

    def refuse_s2(candidate: Snapshot) -> None:
        if candidate.version == s2.version:
            raise ValueError("cannot apply endpoint 10.0.0.2")

    publisher.update(s1)
    c = client(running.port, "sidecar-nack", validate=refuse_s2)
    stream = c.snapshots()
    try:
        with capture_logs() as logs:
            assert await asyncio.wait_for(anext(stream), 5.0) == s1
            waiting = asyncio.ensure_future(anext(stream))  # the client reads while pulled
            publisher.update(s2)
            await until(lambda: servicer.nacks == 1)
            assert not waiting.done()  # the refused snapshot is never yielded
            publisher.update(s3)
            assert await asyncio.wait_for(waiting, 5.0) == s3
        nacks = [e for e in logs if e["event"] == "config NACK"]
        assert len(nacks) == 1
        assert nacks[0]["node"] == "sidecar-nack"
        assert nacks[0]["cluster"] == "east"
        assert nacks[0]["version"] == s2.version
        assert nacks[0]["kept"] == s1.version
        assert nacks[0]["error"] == "cannot apply endpoint 10.0.0.2"
        assert c.nacks == 1
        assert c.latest == s3
    finally:
        await stream.aclose()


async def test_raw_client_nack_then_a_later_version(
    server: tuple[SnapshotPublisher, ConfigDiscoveryServicer, ConfigServer],
) -> None:
    publisher, servicer, running = server
    publisher.update(snapshot("10.0.0.1"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = ConfigDiscoveryStub(channel).StreamConfig()
        node = NodeInfo("raw", "west", "gateway").to_proto()
        await call.write(ConfigRequest(node=node))
        first = await call.read()
        assert isinstance(first, ConfigResponse)
        await call.write(
            ConfigRequest(node=node, response_nonce=first.nonce, error_detail="unsupported")
        )
        await until(lambda: servicer.nacks == 1)
        later = snapshot("10.0.0.9")
        publisher.update(later)
        second = await asyncio.wait_for(call.read(), 5.0)
        assert isinstance(second, ConfigResponse)
        assert second.version_info == later.version
        call.cancel()


async def test_a_subscriber_that_never_reads_does_not_stall_others(
    server: tuple[SnapshotPublisher, ConfigDiscoveryServicer, ConfigServer],
) -> None:
    publisher, _, running = server
    big_root = "R" * 1_000_000  # large enough to fill the stalled stream's flow-control window
    publisher.update(snapshot("10.0.0.1", roots=(big_root + "0",)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stalled = ConfigDiscoveryStub(channel).StreamConfig()
        await stalled.write(ConfigRequest(node=NodeInfo("stalled", "east").to_proto()))
        c = client(running.port, "healthy")
        stream = c.snapshots()
        try:
            await asyncio.wait_for(anext(stream), 5.0)
            for i in range(1, 6):
                latest = snapshot("10.0.0.1", roots=(big_root + str(i),))
                publisher.update(latest)
                assert await asyncio.wait_for(anext(stream), 5.0) == latest
            assert publisher.subscribers == 2  # the stalled stream is still subscribed
        finally:
            await stream.aclose()
            stalled.cancel()


async def test_slow_subscription_gets_the_newest_snapshot_never_a_backlog() -> None:
    publisher = SnapshotPublisher()
    versions = [snapshot(f"10.0.0.{i}") for i in range(1, 6)]
    with publisher.subscribe() as slow, publisher.subscribe() as fast:
        for s in versions:
            publisher.update(s)  # never waits, whoever is slow
            assert (await fast.next()).snapshot == s
        assert (await slow.next()).snapshot == versions[-1]
        assert slow.superseded == 4
        assert fast.superseded == 0
        assert publisher.superseded == 4
        assert publisher.subscribers == 2
    assert publisher.subscribers == 0
    late = publisher.subscribe()  # a new stream starts with the current snapshot
    assert (await late.next()).snapshot == versions[-1]
    late.close()


async def test_client_reconnects_and_an_unchanged_server_sends_nothing(
    server: tuple[SnapshotPublisher, ConfigDiscoveryServicer, ConfigServer],
) -> None:
    publisher, _, running = server
    s1, s2 = snapshot("10.0.0.1"), snapshot("10.0.0.2")
    publisher.update(s1)
    c = client(running.port, backoff_initial=0.05)
    stream = c.snapshots()
    replacement: ConfigServer | None = None
    try:
        assert await asyncio.wait_for(anext(stream), 5.0) == s1
        waiting = asyncio.ensure_future(anext(stream))
        await running.stop(None)  # the controller restarts on the same port
        servicer = ConfigDiscoveryServicer(publisher)
        replacement = await serve(servicer, f"127.0.0.1:{running.port}", None)
        await until(lambda: c.reconnects >= 1 and publisher.subscribers == 1)
        assert not waiting.done()  # it announced s1, so the new server sent nothing
        publisher.update(s2)
        assert await asyncio.wait_for(waiting, 5.0) == s2
    finally:
        await stream.aclose()
        if replacement is not None:
            await replacement.stop(None)


def test_client_refuses_to_go_plaintext_by_accident() -> None:
    with pytest.raises(ValueError, match="credentials"):
        ConfigClient("127.0.0.1:1", NodeInfo("n", "east"), None)
    with pytest.raises(ValueError, match="node"):
        ConfigClient("127.0.0.1:1", insecure=True)
    with pytest.raises(ValueError, match="not both"):
        ConfigClient("127.0.0.1:1", NodeInfo("n", "east"), node_id="m", insecure=True)
    built = ConfigClient("127.0.0.1:1", node_id="gw", cluster="west", kind="gateway", insecure=True)
    assert built.node == NodeInfo("gw", "west", "gateway")


async def test_unauthorized_stream_is_refused() -> None:
    publisher = SnapshotPublisher()
    publisher.update(snapshot("10.0.0.1"))
    servicer = ConfigDiscoveryServicer(publisher, authorize=lambda context: "not a known SVID")
    running = await serve(servicer, "127.0.0.1:0", None)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = ConfigDiscoveryStub(channel).StreamConfig()
            # The server refuses before reading anything, so the refusal may end the call
            # before or while we write: a write racing it fails with grpc's own error
            # (INTERNAL "execute_batch", or "RPC already finished"). The call's final status
            # is what the refusal is.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(ConfigRequest(node=NodeInfo("intruder", "east").to_proto()))
            assert await call.code() == grpc.StatusCode.PERMISSION_DENIED
            assert await call.details() == "not a known SVID"
    finally:
        await running.stop(None)


def test_the_publisher_forgets_the_fragments_of_deleted_services() -> None:
    clusters = [info("east")]
    both = [export("east", name="a"), export("east", name="b")]
    publisher = SnapshotPublisher()
    publisher.update(generate(clusters, merge(clusters, both, {}), []))
    assert publisher.published is not None
    assert publisher.published.payload  # encoded: one fragment per service
    assert len(publisher.fragments) == 2
    publisher.update(generate(clusters, merge(clusters, both[:1], {}), []))
    assert len(publisher.fragments) <= 1
