"""Stalled config streams (issue 15): whatever stops a stream from delivering, the lag shows on
the replica and the proxy resyncs on its own. Real gRPC on loopback; the stall is injected
by a server session that stops sending after its first response (what a lost wake-up in the
take/offer loop, or a session that wrongly believes the proxy is up to date, looks like)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc.aio
import pytest

from federation import server as server_module
from federation.api import grpcio_stream
from federation.api.client import ConfigClient
from federation.api.config_pb2 import ConfigRequest, ConfigResponse
from federation.api.config_pb2_grpc import ConfigDiscoveryServicer as ConfigDiscoveryServicerBase
from federation.api.config_pb2_grpc import (
    ConfigDiscoveryStub,
    add_ConfigDiscoveryServicer_to_server,
)
from federation.api.session import DeltaSource, NodeInfo, Payload, ServerSession
from federation.server import ConfigDiscoveryServicer, ConfigServer, SnapshotPublisher, serve
from mesh.codec import dumps, snapshot_to_json
from mesh.model import Snapshot
from tests.federation.test_fed_stream import snapshot
from tests.helpers import until
from tests.wires import wire  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("no_leaked_tasks", "wire")


class StallingSession(ServerSession):
    """Sends its first response, then nothing, as the issue's sidecar saw; a stream opened
    with `full` (a proxy resyncing) is served normally."""

    def __init__(self, hello: ConfigRequest) -> None:
        super().__init__(hello)
        self._stall = not hello.full
        self._sent_one = False

    def offer(
        self, version: str, payload: Payload, delta: DeltaSource | None = None
    ) -> ConfigResponse | None:
        if self._stall and self._sent_one:
            return None
        response = super().offer(version, payload, delta)
        self._sent_one = self._sent_one or response is not None
        return response


@pytest.fixture
def stalling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "ServerSession", StallingSession)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@contextlib.asynccontextmanager
async def started(servicer: ConfigDiscoveryServicer) -> AsyncIterator[ConfigServer]:
    running = await serve(servicer, "127.0.0.1:0", None)
    try:
        yield running
    finally:
        await running.stop(None)


@contextlib.asynccontextmanager
async def raw_call(
    servicer: ConfigDiscoveryServicer,
) -> AsyncIterator[grpc.aio.StreamStreamCall[ConfigRequest, ConfigResponse]]:
    """A config stream to `servicer` driven by hand (no ConfigClient)."""
    async with (
        started(servicer) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        call = ConfigDiscoveryStub(channel).StreamConfig()
        try:
            yield call
        finally:
            call.cancel()


def three_versions(publisher: SnapshotPublisher) -> tuple[Snapshot, Snapshot, Snapshot]:
    """Three snapshots, the first published."""
    s1, s2, s3 = snapshot("10.0.0.1"), snapshot("10.0.0.2"), snapshot("10.0.0.3")
    publisher.update(s1)
    return s1, s2, s3


def proxy(port: int, name: str, **timing: float) -> ConfigClient:
    return ConfigClient(f"127.0.0.1:{port}", node_id=name, cluster="east", insecure=True, **timing)


@pytest.mark.usefixtures("stalling")
async def test_a_stalled_stream_shows_its_lag_and_the_proxy_resyncs_from_the_heartbeat() -> None:
    publisher = SnapshotPublisher()
    servicer = ConfigDiscoveryServicer(publisher, heartbeat=0.05)
    s1, s2, s3 = snapshot("10.0.0.1"), snapshot("10.0.0.2"), snapshot("10.0.0.3")
    publisher.update(s1)
    async with started(servicer) as running:
        c = proxy(running.port, "sidecar-stuck", resync_after=0.5, silence_limit=30.0)
        stream = c.snapshots()
        waiting: asyncio.Future[Snapshot] | None = None
        try:
            assert await asyncio.wait_for(anext(stream), 5.0) == s1
            waiting = asyncio.ensure_future(anext(stream))
            publisher.update(s2)
            publisher.update(s3)
            # The replica sends nothing, but the lag is there from the offer on.
            await until(lambda: servicer.streams()[0]["lag_seconds"] > 0.2)
            row = servicer.streams()[0]
            assert (row["node"], row["version"], row["sent"]) == (
                "sidecar-stuck",
                s1.version,
                s1.version,
            )
            assert not waiting.done()
            # The heartbeats name s3; 0.5 s later the proxy reconnects asking for everything.
            assert await asyncio.wait_for(waiting, 5.0) == s3
            assert c.stalls == 1
            assert c.latest == s3
            await until(lambda: [r["lag_seconds"] for r in servicer.streams()] == [0.0])
            assert servicer.streams()[0]["version"] == s3.version
            assert servicer.heartbeats > 0
        finally:
            if waiting is not None and not waiting.done():
                waiting.cancel()
                await asyncio.wait({waiting})
            await stream.aclose()


@pytest.mark.usefixtures("stalling")
async def test_a_silent_stream_is_dropped_by_the_proxy() -> None:
    publisher = SnapshotPublisher()
    servicer = ConfigDiscoveryServicer(publisher, heartbeat=3600.0)  # no heartbeat either
    s1, s2 = snapshot("10.0.0.1"), snapshot("10.0.0.2")
    publisher.update(s1)
    async with started(servicer) as running:
        c = proxy(running.port, "sidecar-silent", resync_after=30.0, silence_limit=0.5)
        stream = c.snapshots()
        try:
            assert await asyncio.wait_for(anext(stream), 5.0) == s1
            publisher.update(s2)
            assert await asyncio.wait_for(anext(stream), 5.0) == s2
            assert c.stalls >= 1
        finally:
            await stream.aclose()


async def test_a_proxy_that_takes_nothing_is_dropped_by_the_replica() -> None:
    publisher = SnapshotPublisher()
    servicer = ConfigDiscoveryServicer(publisher, write_timeout=0.5)
    big_root = "R" * 1_000_000  # fills the stalled stream's flow-control window
    publisher.update(snapshot("10.0.0.1", roots=(big_root + "0",)))
    async with (
        started(servicer) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stalled = ConfigDiscoveryStub(channel).StreamConfig()
        await stalled.write(ConfigRequest(node=NodeInfo("reads-nothing", "east").to_proto()))
        await until(lambda: servicer.fulls == 1)  # the first version is taken
        # Each version is taken (and its write started) before the next is published, until
        # the proxy's windows are full and a write waits longer than `write_timeout`.
        for i in range(1, 40):
            publisher.update(snapshot("10.0.0.1", roots=(big_root + str(i),)))
            await until(lambda sent=i + 1: servicer.fulls == sent or servicer.dropped == 1)
            if servicer.dropped:
                break
        # Dropped: its subscription and statistics are gone at once (the UNAVAILABLE status
        # reaches the proxy once its windows drain; that is grpc's business).
        await until(lambda: servicer.dropped == 1 and publisher.subscribers == 0)
        assert servicer.streams() == []
        stalled.cancel()


async def test_lag_runs_from_publication_until_the_ack_of_the_current_version() -> None:
    clock = Clock()
    publisher = SnapshotPublisher(clock=clock)
    servicer = ConfigDiscoveryServicer(publisher)
    s1, s2, s3 = three_versions(publisher)
    async with raw_call(servicer) as call:
        node = NodeInfo("gw-west", "west", "gateway").to_proto()
        await call.write(ConfigRequest(node=node))
        first = await call.read()
        assert isinstance(first, ConfigResponse)
        assert first.current_version == s1.version
        await call.write(ConfigRequest(node=node, version_info=s1.version, **nonce(first)))
        await until(lambda: servicer.streams()[0]["version"] == s1.version)
        assert servicer.streams()[0]["lag_seconds"] == 0.0
        clock.t = 5.0
        publisher.update(s2)  # published at 5 s, not answered yet
        second = await call.read()
        assert isinstance(second, ConfigResponse)
        clock.t = 6.0
        publisher.update(s3)
        third = await call.read()
        assert isinstance(third, ConfigResponse)
        clock.t = 12.0
        assert servicer.streams()[0]["lag_seconds"] == 7.0  # behind since s2's publication
        # An ACK of s2 (older than current): behind only since s3's publication; a NACK of s3
        # keeps that.
        await call.write(ConfigRequest(node=node, version_info=s2.version, **nonce(second)))
        await call.write(
            ConfigRequest(node=node, version_info=s2.version, error_detail="no", **nonce(third))
        )
        await until(lambda: servicer.streams()[0]["nacked"] == s3.version)
        assert servicer.streams()[0]["lag_seconds"] == 6.0
        assert servicer.streams()[0]["version"] == s2.version
        clock.t = 13.0
        publisher.update(s2)  # back to what it runs: up to date again
        assert servicer.streams()[0]["lag_seconds"] == 0.0


def nonce(response: ConfigResponse) -> dict[str, str]:
    return {"response_nonce": response.nonce}


# --- the cause found: an answer written after the stream ended killed the config stream ---


class ScriptedCall:
    """A config stream call that serves `responses`, then waits for `more`; writing
    `fail_on` (a nonce) raises what grpc.aio raises for a call whose status has arrived."""

    def __init__(self, responses: list[ConfigResponse], fail_on: str = "") -> None:
        self.queue: asyncio.Queue[ConfigResponse] = asyncio.Queue()
        for r in responses:
            self.queue.put_nowait(r)
        self.fail_on = fail_on
        self.written: list[ConfigRequest] = []

    async def write(self, request: ConfigRequest) -> None:
        self.written.append(request)
        if self.fail_on and request.response_nonce == self.fail_on:
            raise asyncio.InvalidStateError("RPC already finished.")

    async def read(self) -> ConfigResponse:
        return await self.queue.get()

    def cancel(self) -> bool:
        return True


async def test_a_stream_that_ends_before_the_ack_is_written_reconnects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s1, s2, s3 = snapshot("10.0.0.1"), snapshot("10.0.0.2"), snapshot("10.0.0.3")
    payload = {s.version: dumps(snapshot_to_json(s)) for s in (s1, s2, s3)}
    first = ServerSession(ConfigRequest(node=NodeInfo("sidecar-1", "east").to_proto()))
    r1, r2 = (first.offer(s.version, payload[s.version]) for s in (s1, s2))
    assert r1 is not None
    assert r2 is not None
    # The replica sent s2 and the stream ended before the proxy's ACK of it went out.
    calls = [ScriptedCall([r1, r2], fail_on=r2.nonce), ScriptedCall([])]

    class Stub:
        def __init__(self, channel: object) -> None:
            pass

        def StreamConfig(self) -> ScriptedCall:  # noqa: N802 - the gRPC method name
            return calls.pop(0) if len(calls) > 1 else calls[0]

    second = calls[1]
    # grpc.aio's own failure mode (a write after the status arrived), so grpcio in both runs.
    monkeypatch.setattr(grpcio_stream, "ConfigDiscoveryStub", Stub)
    c = ConfigClient(
        "127.0.0.1:1",
        node_id="sidecar-1",
        cluster="east",
        insecure=True,
        wire="grpcio",
        backoff_initial=0.01,
    )
    stream = c.snapshots()
    try:
        assert await asyncio.wait_for(anext(stream), 5.0) == s1
        assert await asyncio.wait_for(anext(stream), 5.0) == s2  # accepted, so yielded
        waiting = asyncio.ensure_future(anext(stream))
        await until(lambda: len(second.written) == 1)  # it reconnected, announcing s2
        assert second.written[0].version_info == s2.version
        assert c.reconnects == 1
        third = ServerSession(second.written[0]).offer(s3.version, payload[s3.version])
        assert third is not None
        second.queue.put_nowait(third)
        assert await asyncio.wait_for(waiting, 5.0) == s3
    finally:
        await stream.aclose()


async def test_the_lag_follows_what_a_resync_says_the_proxy_runs() -> None:
    """A resync can make the ACK of a response already in flight stale (it is ignored): the
    lag must then follow the version the proxy names in its next resync, not stay for ever."""
    publisher = SnapshotPublisher()
    servicer = ConfigDiscoveryServicer(publisher)
    s1, s2, s3 = three_versions(publisher)
    async with raw_call(servicer) as call:
        node = NodeInfo("sidecar-r", "east").to_proto()
        await call.write(ConfigRequest(node=node, accept_delta=True))
        r1 = await call.read()
        assert isinstance(r1, ConfigResponse)
        await call.write(ConfigRequest(node=node, version_info=s1.version, **nonce(r1)))
        publisher.update(s2)
        r2 = await call.read()
        publisher.update(s3)
        r3 = await call.read()
        assert isinstance(r2, ConfigResponse)
        assert isinstance(r3, ConfigResponse)
        # It could not apply r2 but (say) got s3 whole from r3: resync, then ACK s3.
        await call.write(
            ConfigRequest(node=node, version_info=s1.version, resync=True, **nonce(r2))
        )
        await call.write(ConfigRequest(node=node, version_info=s3.version, **nonce(r3)))
        r4 = await call.read()  # s3 again, as a delta from s1: it runs s3, so resync
        assert isinstance(r4, ConfigResponse)
        assert r4.base_version == s1.version
        await call.write(
            ConfigRequest(node=node, version_info=s3.version, resync=True, **nonce(r4))
        )
        await until(lambda: servicer.streams()[0]["lag_seconds"] == 0.0)
        assert servicer.streams()[0]["version"] == s3.version


async def test_only_proxies_that_understand_heartbeats_get_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    beaten: list[str] = []

    class Recording(ServerSession):
        def heartbeat(self, current: str) -> ConfigResponse:
            beaten.append(self.node.id)
            return super().heartbeat(current)

    monkeypatch.setattr(server_module, "ServerSession", Recording)
    publisher = SnapshotPublisher()
    servicer = ConfigDiscoveryServicer(publisher, heartbeat=0.05)
    three_versions(publisher)
    async with raw_call(servicer) as old, raw_call(servicer) as new:
        # A proxy from before heartbeats (it would NACK one), then a current one.
        await old.write(ConfigRequest(node=NodeInfo("old", "east").to_proto()))
        await until(lambda: publisher.subscribers == 1)
        await new.write(ConfigRequest(node=NodeInfo("new", "east").to_proto(), heartbeat=True))
        await until(lambda: beaten.count("new") >= 3)
        assert "old" not in beaten


async def test_a_snapshot_accepted_as_the_stream_ends_is_still_handed_over() -> None:
    """Real gRPC: the replica sends s2 and ends the stream at once (it is going away). The
    proxy accepts (applies) s2; its ACK cannot go out. Before issue 15 the ACK's failure came
    first and s2 was never yielded: the proxy ran s2 but reported s1 (its /config, metrics,
    CA anchors) until the next version, since its reconnect announced s2."""
    s1, s2 = snapshot("10.0.0.1"), snapshot("10.0.0.2")
    payload = {s.version: dumps(snapshot_to_json(s)) for s in (s1, s2)}
    opened: list[str] = []

    class EndsAfterS2(ConfigDiscoveryServicerBase):
        async def StreamConfig(  # noqa: N802 - the gRPC method name
            self, request_iterator: object, context: server_module.Context
        ) -> None:
            hello = await context.read()
            assert isinstance(hello, ConfigRequest)
            opened.append(hello.version_info)
            session = ServerSession(hello)
            for s in (s1, s2):
                response = session.offer(s.version, payload[s.version])
                if response is not None:
                    await context.write(response)
                    if s is s1:
                        await context.read()  # its ACK
            if len(opened) > 1:
                await context.read()  # later streams stay open until the proxy leaves

    grpc_server = grpc.aio.server()
    add_ConfigDiscoveryServicer_to_server(EndsAfterS2(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    c = proxy(port, "sidecar-1", backoff_initial=0.01)
    stream = c.snapshots()
    try:
        assert await asyncio.wait_for(anext(stream), 5.0) == s1
        assert await asyncio.wait_for(anext(stream), 5.0) == s2
        waiting = asyncio.ensure_future(anext(stream))
        await until(lambda: opened[1:] == [s2.version])  # it came back announcing s2
        waiting.cancel()
        await asyncio.wait({waiting})
    finally:
        await stream.aclose()
        await grpc_server.stop(None)
