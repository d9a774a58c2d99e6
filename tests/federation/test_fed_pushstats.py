"""Push latency per subscriber, measured by the real servicer over real gRPC (loopback)."""

from __future__ import annotations

import grpc.aio
import pytest

from federation.api.config_pb2 import ConfigRequest, ConfigResponse
from federation.api.config_pb2_grpc import ConfigDiscoveryStub
from federation.api.session import NodeInfo
from federation.pushstats import BUCKETS, Histogram, PushStats
from federation.server import ConfigDiscoveryServicer, SnapshotPublisher, serve
from tests.federation.test_fed_stream import snapshot
from tests.helpers import until

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def test_push_latency_runs_from_publication_or_stream_opening_to_the_ack() -> None:
    clock = Clock()
    publisher = SnapshotPublisher(clock=clock)
    servicer = ConfigDiscoveryServicer(publisher)
    running = await serve(servicer, "127.0.0.1:0", None)
    try:
        clock.t = 5.0
        s1 = snapshot("10.0.0.1")
        publisher.update(s1)  # published at 5 s
        clock.t = 10.0  # the proxy connects 5 s later: its wait starts at its hello
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = ConfigDiscoveryStub(channel).StreamConfig()
            node = NodeInfo("gw-west", "west", "gateway").to_proto()
            await call.write(ConfigRequest(node=node))
            first = await call.read()
            assert isinstance(first, ConfigResponse)
            clock.t = 10.25
            await call.write(
                ConfigRequest(
                    node=node, version_info=first.version_info, response_nonce=first.nonce
                )
            )
            await until(lambda: servicer.acks == 1)
            sub = servicer.push.subscribers["gw-west"]
            assert (sub.kind, sub.cluster, sub.version) == ("gateway", "west", s1.version)
            assert sub.latency == pytest.approx(0.25)

            clock.t = 20.0
            s2 = snapshot("10.0.0.2")
            publisher.update(s2)
            second = await call.read()
            assert isinstance(second, ConfigResponse)
            clock.t = 21.5
            await call.write(
                ConfigRequest(
                    node=node, version_info=second.version_info, response_nonce=second.nonce
                )
            )
            await until(lambda: servicer.acks == 2)
            assert sub.latency == pytest.approx(1.5)
            hist = servicer.push.latency[("gateway", "west")]
            assert hist.count == 2
            assert hist.total == pytest.approx(1.75)
            assert servicer.push.acks == {("gateway", "west"): 2}

            s3 = snapshot("10.0.0.3")
            publisher.update(s3)
            third = await call.read()
            assert isinstance(third, ConfigResponse)
            await call.write(
                ConfigRequest(
                    node=node,
                    version_info=s2.version,
                    response_nonce=third.nonce,
                    error_detail="refused",
                )
            )
            await until(lambda: servicer.nacks == 1)
            assert servicer.push.nacks == {("gateway", "west"): 1}
            call.cancel()
        await until(lambda: "gw-west" not in servicer.push.subscribers)
    finally:
        await running.stop(None)


def test_histogram_is_cumulative_with_inf_last() -> None:
    h = Histogram()
    for v in (0.001, 0.2, 0.2, 99.0):
        h.observe(v)
    pairs = h.cumulative()
    assert pairs[0] == (str(BUCKETS[0]), 1)
    assert dict(pairs)["0.25"] == 3
    assert pairs[-1] == ("+Inf", 4)
    assert [n for _, n in pairs] == sorted(n for _, n in pairs)
    assert h.count == 4


def test_an_ack_for_a_forgotten_version_counts_without_a_latency() -> None:
    stats = PushStats()
    sub = stats.opened("p", "sidecar", "east")
    assert stats.acked(sub, "old", None, 0.0, 3.0) is None
    assert stats.acks == {("sidecar", "east"): 1}
    assert stats.latency == {}
    replaced = stats.opened("p", "sidecar", "east")  # the proxy reconnected
    stats.closed(sub)  # the old stream's late close leaves the new entry alone
    assert stats.subscribers["p"] is replaced


def test_lag_counts_from_the_first_offer_of_a_version_the_proxy_does_not_run() -> None:
    push = PushStats()
    sub = push.opened("echo-1.east", "sidecar", "east", version="v1")
    sub.offered("v1", 1.0)  # the hello announced the current version
    assert sub.lag(5.0) == 0.0
    sub.offered("v2", 6.0)
    sub.offered("v3", 7.0)  # still behind since v2
    assert sub.lag(10.0) == 4.0
    push.acked(sub, "v2", 6.0, 0.0, 10.5, current="v3")  # an older one: still behind
    assert sub.lag(11.0) == 5.0
    push.nacked(sub, "v3")
    assert sub.nacked == "v3"
    assert [s.node for s in push.behind(11.0, more_than=4.0)] == ["echo-1.east"]
    push.acked(sub, "v3", 7.0, 0.0, 12.0, current="v3")
    assert sub.lag(20.0) == 0.0
    assert sub.nacked == ""
    assert push.behind(20.0) == []


def test_a_version_coming_back_to_what_the_proxy_runs_ends_the_lag() -> None:
    sub = PushStats().opened("gw", "gateway", "west", version="a")
    sub.offered("b", 1.0)
    sub.offered("a", 2.0)  # b was withdrawn before the proxy took it: a is current again
    assert sub.lag(9.0) == 0.0
