"""HTTP/1.1 through real sidecars on loopback: routing per request, pooling, resilience, faults.

The client is http.client, the apps the rig's echo workload (http.server), the inner hops real
mutual TLS (and a fake gateway for the remote cluster).
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from mesh.model import (
    ClusterWeight,
    ConnectionPool,
    Fault,
    FaultAbort,
    FaultDelay,
    HttpRoute,
    LocalityFailover,
    Mirror,
    OutlierDetection,
    RequestMatch,
    Retries,
    StringMatch,
    Subset,
    SubsetWeight,
    TrafficPolicy,
)
from tests.helpers import until
from tests.sidecar.conftest import Logs, Pki
from tests.sidecar.http_rig import SVC, HttpRig, start_http_rig, stop_http_rig

V1 = {"version": "v1"}
V2 = {"version": "v2"}
SUBSETS = (Subset("v1", (("version", "v1"),)), Subset("v2", (("version", "v2"),)))


@pytest.fixture
async def rig(pki: Pki, logs: Logs) -> AsyncIterator[HttpRig]:
    r = await start_http_rig(pki, [("east", "a", V1), ("east", "b", V1), ("west", "w", V1)])
    try:
        yield r
    finally:
        await stop_http_rig(r)


def policy(**kw: Any) -> TrafficPolicy:
    kw.setdefault("cluster_weights", (ClusterWeight("local", 100),))
    return TrafficPolicy(SVC, **kw)


def pods(replies: list[Any]) -> collections.Counter[str]:
    return collections.Counter(r.pod if r.status == 200 else str(r.status) for r in replies)


async def test_requests_on_one_connection_are_routed_each_and_reuse_inner_connections(
    rig: HttpRig, logs: Logs
) -> None:
    rig.apply(policy())
    replies = await rig.many(40)
    assert pods(replies) == {"a": pytest.approx(20, abs=12), "b": pytest.approx(20, abs=12)}
    assert set(pods(replies)) == {"a", "b"}  # per request, not per connection
    http = rig.source.outbound.http
    assert http.pool.opened == 2  # one inner mTLS connection per endpoint, reused
    assert http.pool.reused == 38
    [one] = [e for e in logs if e["event"] == "http request"][:1]
    assert one["method"] == "GET"
    assert one["status"] == 200
    assert one["dst_cluster"] == "east"


async def test_bodies_by_length_chunked_and_large_reach_the_app(rig: HttpRig) -> None:
    rig.apply(policy())
    small = await rig.acall("/post", method="POST", body=b"x" * 1000)
    assert small.json["received_bytes"] == 1000

    def chunks() -> Iterator[bytes]:
        yield b"a" * 3000
        yield b"b" * 5000

    chunked = await rig.acall(
        "/chunked",
        method="POST",
        body=chunks(),
        headers={"Transfer-Encoding": "chunked"},
        encode_chunked=True,
    )
    # echo (http.server) reads Content-Length only: the sidecar sent a length, having read ahead.
    assert chunked.status == 200
    assert chunked.json["received_bytes"] == 8000
    big = await rig.acall("/big", method="PUT", body=b"z" * 700_000)
    assert big.status == 200
    assert big.json["received_bytes"] == 700_000


async def test_head_and_no_content_responses_keep_the_connection_usable(rig: HttpRig) -> None:
    rig.apply(policy())

    def run() -> list[int]:
        conn = rig.connection()
        try:
            out = [rig.call("/", method="HEAD", conn=conn).status]
            out.append(rig.call("/status/204", conn=conn).status)
            out.append(rig.call("/", conn=conn).status)
            return out
        finally:
            conn.close()

    assert await asyncio.to_thread(run) == [200, 204, 200]


async def test_retries_hide_an_endpoint_failing_half_its_requests(rig: HttpRig) -> None:
    rig.pod("a").control.fail_ratio = 0.5
    rig.apply(policy(retries=Retries(3, retry_on=("5xx",))))
    replies = await rig.many(100)
    assert [r.status for r in replies] == [200] * 100
    assert rig.pod("a").control.failed > 10  # the failures happened; nobody saw them
    assert rig.source.outbound.http.stats["retries"] == rig.pod("a").control.failed


async def test_without_retries_the_failures_show(rig: HttpRig) -> None:
    rig.pod("a").control.fail_ratio = 1.0
    rig.apply(policy(retries=Retries(0)))  # `attempts: 0` turns Istio's default retries off
    replies = await rig.many(40)
    assert 5 < sum(r.status == 503 for r in replies) < 35


async def test_per_try_timeout_fires_per_try_and_retries_elsewhere(rig: HttpRig) -> None:
    rig.apply(policy(retries=Retries(2, per_try_timeout=0.15, retry_on=("5xx",))))
    reply = await rig.acall("/delay/1000")
    assert reply.status == 504
    assert reply.headers["x-fedgate-reason"] == "upstream timeout"
    # Three tries of 0.15 s plus at most 25 + 75 ms of backoff.
    assert 0.45 <= reply.elapsed < 0.75, reply.elapsed
    assert b"per-try timeout 0.15 s" in reply.body


async def test_overall_timeout_fires_at_its_value(rig: HttpRig) -> None:
    rig.apply(policy(timeout=0.3, retries=Retries(5, per_try_timeout=0.2, retry_on=("5xx",))))
    reply = await rig.acall("/delay/2000")
    assert reply.status == 504
    assert 0.3 <= reply.elapsed < 0.45, reply.elapsed
    fast = await rig.acall("/delay/50")
    assert fast.status == 200


async def test_connection_pool_limits_answer_503_with_the_reason(rig: HttpRig, logs: Logs) -> None:
    limits = ConnectionPool(max_connections=1, http1_max_pending_requests=2)
    rig.apply(policy(connection_pool=limits, cluster_weights=(ClusterWeight("local", 100),)))
    replies = await asyncio.gather(*(rig.acall("/delay/400") for _ in range(8)))
    codes = collections.Counter(r.status for r in replies)
    assert codes == {200: 3, 503: 5}, codes
    refused = [r for r in replies if r.status == 503]
    assert {r.headers["x-fedgate-reason"] for r in refused} == {"pending overflow"}
    assert any(
        e["event"] == "http request failed" and e["reason"] == "pending overflow" for e in logs
    )
    # Never more than one connection at a time (a waiter for the other endpoint closes the
    # idle one to open its own).
    services = rig.source.outbound.http.status()["services"]
    assert isinstance(services, dict)
    assert services[f"api.shop.svc.clusterset.local:{rig.app_port}"]["connections"] <= 1


async def test_max_requests_limit(rig: HttpRig) -> None:
    rig.apply(policy(connection_pool=ConnectionPool(http2_max_requests=2)))
    replies = await asyncio.gather(*(rig.acall("/delay/300") for _ in range(5)))
    assert collections.Counter(r.status for r in replies) == {200: 2, 503: 3}
    assert {r.headers.get("x-fedgate-reason") for r in replies if r.status == 503} == {
        "max requests"
    }


async def test_outlier_ejects_after_consecutive_5xx_and_returns(rig: HttpRig, logs: Logs) -> None:
    rig.pod("a").control.fail_ratio = 1.0
    od = OutlierDetection(3, interval=0.1, base_ejection_time=1.0, max_ejection_percent=100)
    rig.apply(policy(outlier_detection=od, retries=Retries(0)))  # every failure shows
    first = await rig.many(20)
    assert sum(r.status == 503 for r in first) == 3  # exactly the three that ejected it
    assert any(e["event"] == "outlier ejected" and e["host"] == rig.pod("a").ip for e in logs)
    rig.pod("a").control.fail_ratio = 0.0
    await asyncio.sleep(1.2)
    later = await rig.many(30)
    assert all(r.status == 200 for r in later)
    assert pods(later)["a"] > 3  # back in rotation
    assert any(e["event"] == "outlier returned" for e in logs)


async def test_fault_abort_and_delay_at_their_percentages(rig: HttpRig) -> None:
    fault = Fault(FaultDelay(50, 0.03), FaultAbort(30, 418))
    rig.apply(policy(fault=fault))
    replies = await rig.many(200)
    aborted = [r for r in replies if r.status == 418]
    assert 40 <= len(aborted) <= 80  # 30 % of 200, +-3.5 s.d.
    assert {r.headers["x-fedgate-reason"] for r in aborted} == {"fault abort"}
    delayed = sum(r.elapsed >= 0.03 for r in replies)
    assert 70 <= delayed <= 130
    stats = rig.source.outbound.http.stats
    assert stats["fault_aborts"] == len(aborted)


async def test_subset_weights_canary_and_header_route(pki: Pki) -> None:
    rig = await start_http_rig(pki, [("east", "a", V1), ("east", "b", V1), ("east", "c", V2)])
    try:
        tester = RequestMatch(headers=(("x-tester", StringMatch("exact", "yes")),))
        rig.apply(
            policy(
                subsets=SUBSETS,
                subset_weights=(SubsetWeight("v1", 90), SubsetWeight("v2", 10)),
                routes=(
                    HttpRoute("testers", (tester,), subset_weights=(SubsetWeight("v2", 100),)),
                ),
            )
        )
        replies = await rig.many(300)
        share = pods(replies)["c"] / 300
        assert 0.05 <= share <= 0.15, pods(replies)
        testers = await rig.many(20, headers={"X-Tester": "yes"})
        assert pods(testers) == {"c": 20}
    finally:
        await stop_http_rig(rig)


async def test_mirror_copies_requests_to_the_mirror_subset(pki: Pki) -> None:
    rig = await start_http_rig(pki, [("east", "a", V1), ("east", "c", V2)])
    try:
        rig.apply(
            policy(
                subsets=SUBSETS,
                subset_weights=(SubsetWeight("v1", 100),),
                mirror=Mirror(subset="v2", percentage=50),
            )
        )
        replies = await rig.many(100)
        assert pods(replies) == {"a": 100}  # answers come from the primary only
        for _ in range(50):
            if rig.source.outbound.http.stats["mirrored"] >= rig.pod("c").control.shadow > 0:
                break
            await asyncio.sleep(0.02)
        shadow = rig.pod("c").control.shadow
        assert 30 <= shadow <= 70
        assert rig.pod("c").control.requests == shadow  # nothing but mirrored requests
    finally:
        await stop_http_rig(rig)


async def test_remote_cluster_through_the_gateway_reuses_one_tunnel(rig: HttpRig) -> None:
    rig.apply(policy(cluster_weights=(ClusterWeight("remote", 100),)))
    replies = await rig.many(20)
    assert pods(replies) == {"w": 20}
    assert len(rig.gateway.requests) == 1  # one CONNECT, one inner TLS connection, 20 requests


async def test_failover_spills_to_the_remote_cluster_as_local_endpoints_fail(
    rig: HttpRig,
) -> None:
    rig.regions.update(east="us-east", west="us-west")
    od = OutlierDetection(1, interval=0.05, base_ejection_time=30, max_ejection_percent=100)
    rig.apply(
        policy(
            locality_failover=LocalityFailover(70),
            outlier_detection=od,
            retries=Retries(2, retry_on=("connect-failure", "5xx")),
            cluster_weights=(),
        )
    )
    healthy = await rig.many(60)
    assert pods(healthy)["w"] == 0  # the local tier is healthy: nothing spills
    await asyncio.to_thread(rig.pod("a").stop_app)
    half = await rig.many(200)
    assert all(r.status == 200 for r in half)  # retries hide the failures meanwhile
    # One of two local endpoints: 50 % healthy / 70 % -> the local tier keeps 71 %.
    spill = pods(half)["w"] / 200
    assert 0.18 <= spill <= 0.40, pods(half)
    await asyncio.to_thread(rig.pod("b").stop_app)
    gone = await rig.many(60)
    assert all(r.status == 200 for r in gone)
    assert pods(gone)["w"] >= 55


async def test_policy_change_applies_to_the_next_request_not_the_one_in_flight(
    rig: HttpRig,
) -> None:
    rig.apply(policy())
    slow = asyncio.create_task(rig.acall("/delay/400"))
    await asyncio.sleep(0.1)
    rig.apply(policy(cluster_weights=(ClusterWeight("remote", 100),)), version="v2")
    assert (await slow).status == 200  # not dropped
    assert pods(await rig.many(5)) == {"w": 5}


async def test_malformed_request_gets_400_with_a_reason(rig: HttpRig) -> None:
    rig.apply(policy())

    def raw() -> bytes:
        conn = rig.connection()
        sock = conn.sock
        assert isinstance(sock, socket.socket)
        try:
            sock.sendall(
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            )
            return sock.recv(4096)
        finally:
            conn.close()

    answer = await asyncio.to_thread(raw)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"x-fedgate-reason: malformed request" in answer


async def test_http_on_a_tcp_port_is_sniffed(pki: Pki) -> None:
    rig = await start_http_rig(pki, [("east", "a", V1)], protocol="TCP")
    try:
        rig.pod("a").control.fail_ratio = 0.5
        rig.apply(policy(retries=Retries(5, retry_on=("5xx",))))
        replies = await rig.many(20)
        assert [r.status for r in replies] == [200] * 20  # retried: it was parsed as HTTP
        assert rig.source.outbound.http.stats["sniffed_http"] == 1
    finally:
        await stop_http_rig(rig)


async def test_tcp_connections_obey_max_connections_and_outlier_ejection(
    pki: Pki, logs: Logs
) -> None:
    rig = await start_http_rig(pki, [("east", "a", V1), ("east", "b", V1)], protocol="TCP")
    try:
        rig.source.outbound.http.sniff_timeout = 0  # per-connection (L4) proxying
        od = OutlierDetection(1, interval=0.05, base_ejection_time=30, max_ejection_percent=100)
        rig.apply(policy(connection_pool=ConnectionPool(max_connections=1), outlier_detection=od))

        def run() -> tuple[int, str]:
            first = rig.connection()
            try:
                status = rig.call("/", conn=first).status
                try:
                    rig.call("/")  # a second connection while the first is open
                    second = "served"
                except (ConnectionError, http.client.HTTPException) as e:
                    second = type(e).__name__
            finally:
                first.close()
            return status, second

        assert await asyncio.to_thread(run) == (200, "ConnectionResetError")
        assert any(e.get("reason") == "max connections" for e in logs)
        # The first connection's slot is free once its handler ended (not when curl closed).
        await until(lambda: rig.source.outbound.active == 0, what="the first connection released")
        # A dead app behind one endpoint: its connection fails once, then it is ejected.
        await asyncio.to_thread(rig.pod("a").stop_app)
        outcomes = []
        for _ in range(12):
            try:
                outcomes.append((await rig.acall("/")).pod)
            except (ConnectionError, http.client.HTTPException):
                outcomes.append("failed")
            await asyncio.sleep(0.02)
        assert outcomes.count("failed") <= 1
        assert outcomes[-6:] == ["b"] * 6
        assert any(e["event"] == "outlier ejected" and e.get("mode") == "tcp" for e in logs)
    finally:
        await stop_http_rig(rig)
