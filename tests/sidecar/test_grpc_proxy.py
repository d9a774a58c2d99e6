"""gRPC (HTTP/2) through real sidecars on loopback: each call routed on its own over pooled
HTTP/2 upstream connections, with the policy's retries, timeouts, limits, faults and mirror.

The client is grpcio (its own HTTP/2 stack), the apps the rig's gRPC echo workload (grpcio
server), the inner hops real mutual TLS, and a fake gateway for the remote cluster.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from clusters.rig.api import echo_pb2, echo_pb2_grpc
from clusters.rig.grpc_echo import GrpcEchoControl
from clusters.rig.grpc_echo import make_server as make_grpc_server
from mesh import telemetry as tm
from mesh.model import (
    ClusterWeight,
    ConnectionPool,
    Fault,
    FaultAbort,
    Mirror,
    OutlierDetection,
    Retries,
    Subset,
    SubsetWeight,
    TrafficPolicy,
)
from sidecar.traffic.record import GRPC_STATUS
from tests.sidecar.conftest import Pki
from tests.sidecar.fake_telemetry import FakeTelemetry, source_spans
from tests.sidecar.http_rig import SVC, VIP, HttpRig, start_http_rig, stop_http_rig

V1 = {"version": "v1"}
V2 = {"version": "v2"}


class GrpcRig:
    def __init__(self, rig: HttpRig) -> None:
        self.rig = rig
        self.controls: dict[str, GrpcEchoControl] = {}
        self.servers: list[grpc.Server] = []
        # grpcio picks its own source port: every connection is "to" the service VIP.
        rig.source.outbound._original_dst_of = lambda sock: (VIP, rig.app_port)

    def start_apps(self) -> None:
        for pod in self.rig.pods:
            pod.stop_app()  # the HTTP echo start_http_rig started
            ctl = self.controls[pod.name] = GrpcEchoControl()
            server = make_grpc_server(pod.cluster, pod.name, pod.app_ip, self.rig.app_port, ctl)
            server.start()
            self.servers.append(server)

    def calls(self, n: int, delay_ms: int = 0, parallel: bool = False) -> list[tuple[str, str]]:
        """`n` calls on one channel: (pod or status code name, details)."""
        host, port = self.rig.source.outbound.address
        addr = f"{host}:{port}"
        with grpc.insecure_channel(addr) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)

            def one() -> tuple[str, str]:
                try:
                    reply = stub.Call(echo_pb2.CallRequest(delay_ms=delay_ms), timeout=10)
                    return reply.pod, reply.cluster
                except grpc.RpcError as e:
                    return e.code().name, e.details() or ""

            if not parallel:
                return [one() for _ in range(n)]
            req = echo_pb2.CallRequest(delay_ms=delay_ms)
            futs = [stub.Call.future(req, timeout=10) for _ in range(n)]
            out = []
            for f in futs:
                try:
                    r = f.result()
                    out.append((r.pod, r.cluster))
                except grpc.RpcError as e:
                    out.append((e.code().name, e.details() or ""))
            return out

    def stop(self) -> None:
        for s in self.servers:
            s.stop(0)


@pytest.fixture
async def grig(pki: Pki) -> AsyncIterator[GrpcRig]:
    r = await start_http_rig(
        pki, [("east", "a", V1), ("east", "b", V1), ("east", "c", V2)], protocol="GRPC"
    )
    g = GrpcRig(r)
    g.start_apps()
    try:
        yield g
    finally:
        g.stop()
        await stop_http_rig(r)


def policy(**kw: Any) -> TrafficPolicy:
    kw.setdefault("cluster_weights", (ClusterWeight("local", 100),))
    return TrafficPolicy(SVC, **kw)


async def test_calls_are_balanced_per_call_over_one_pooled_connection_per_endpoint(
    grig: GrpcRig,
) -> None:
    grig.rig.apply(policy())
    out = await asyncio.to_thread(grig.calls, 60)
    seen = collections.Counter(p for p, _ in out)
    assert set(seen) == {"a", "b", "c"}, seen
    h2 = grig.rig.source.outbound.h2
    assert h2.pool.opened == 3
    assert h2.pool.streams == 60


async def test_retries_hide_unavailable(grig: GrpcRig) -> None:
    grig.rig.apply(policy(retries=Retries(3, retry_on=("unavailable",))))
    grig.controls["a"].fail_ratio = 0.5
    out = await asyncio.to_thread(grig.calls, 60)
    assert all(p in ("a", "b", "c") for p, _ in out), out
    assert grig.controls["a"].failed >= 3


async def test_per_try_timeout_is_deadline_exceeded(grig: GrpcRig) -> None:
    grig.rig.apply(policy(retries=Retries(1, per_try_timeout=0.2, retry_on=("5xx",))))
    [(code, detail)] = await asyncio.to_thread(grig.calls, 1, 1000)
    assert code == "DEADLINE_EXCEEDED"
    assert detail.startswith("upstream timeout")


async def test_max_requests_refused_as_unavailable(grig: GrpcRig) -> None:
    grig.rig.apply(policy(connection_pool=ConnectionPool(http2_max_requests=2)))
    out = await asyncio.to_thread(grig.calls, 8, 400, True)
    refused = [d for p, d in out if p == "UNAVAILABLE"]
    assert len(refused) == 6, out
    assert all(d.startswith("max requests") for d in refused)


async def test_fault_abort_at_its_percentage_is_a_grpc_status(grig: GrpcRig) -> None:
    grig.rig.apply(policy(fault=Fault(abort=FaultAbort(50, 503))))
    out = await asyncio.to_thread(grig.calls, 100)
    aborted = [d for p, d in out if p == "UNAVAILABLE"]
    assert 30 <= len(aborted) <= 70
    assert all(d.startswith("fault abort") for d in aborted)
    assert sum(c.calls for c in grig.controls.values()) == 100 - len(aborted)


async def test_mirrored_calls_reach_the_mirror_subset(
    grig: GrpcRig,
) -> None:
    subsets = (Subset("v1", (("version", "v1"),)), Subset("v2", (("version", "v2"),)))
    grig.rig.apply(
        policy(
            subsets=subsets,
            subset_weights=(SubsetWeight("v1", 100),),
            mirror=Mirror(subset="v2", percentage=100),
        )
    )
    out = await asyncio.to_thread(grig.calls, 20)
    assert {p for p, _ in out} <= {"a", "b"}, out
    mirror = grig.controls["c"]  # v2: primary routing never picks it, only the mirror
    async with asyncio.timeout(5):
        while grig.rig.source.outbound.h2.stats["mirrored"] < 20:  # noqa: ASYNC110 - polling
            await asyncio.sleep(0.02)
    assert mirror.calls == 20


async def test_outlier_ejects_an_endpoint_answering_unavailable(grig: GrpcRig) -> None:
    od = OutlierDetection(
        consecutive_5xx_errors=2, interval=0.2, base_ejection_time=30, max_ejection_percent=100
    )
    grig.rig.apply(policy(outlier_detection=od, retries=Retries(0)))  # every failure shows
    grig.controls["b"].fail_ratio = 1.0
    out = await asyncio.to_thread(grig.calls, 40)
    assert collections.Counter(p for p, _ in out)["UNAVAILABLE"] == 2
    assert grig.rig.source.outbound.h2.stats["ejections"] == 1


async def test_a_body_within_the_replay_limit_is_retried_and_a_larger_one_is_not(
    grig: GrpcRig,
) -> None:
    grig.rig.apply(policy(retries=Retries(2, retry_on=("unavailable",))))
    for ctl in grig.controls.values():
        ctl.fail_ratio = 1.0
    host, port = grig.rig.source.outbound.address

    def call(size: int) -> str:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            try:
                stub.Call(echo_pb2.CallRequest(text="x" * size), timeout=10)
            except grpc.RpcError as e:
                return e.code().name
        return "OK"

    assert await asyncio.to_thread(call, 200 * 1024) == "UNAVAILABLE"
    assert sum(c.calls for c in grig.controls.values()) == 3  # the first try and 2 retries
    assert await asyncio.to_thread(call, 300 * 1024) == "UNAVAILABLE"
    assert sum(c.calls for c in grig.controls.values()) == 4  # over 256 KiB: tried once


async def test_a_cancelled_call_releases_its_upstream_stream(grig: GrpcRig) -> None:
    grig.rig.apply(policy())
    host, port = grig.rig.source.outbound.address
    h2 = grig.rig.source.outbound.h2

    def cancel_one() -> None:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            fut = stub.Call.future(echo_pb2.CallRequest(delay_ms=3000), timeout=10)
            deadline = time.monotonic() + 5
            while sum(c.calls for c in grig.controls.values()) == 0:
                assert time.monotonic() < deadline, "the call never reached an app"
                time.sleep(0.01)
            assert fut.cancel()

    await asyncio.to_thread(cancel_one)
    runtime = next(iter(grig.rig.source.outbound.http._runtimes.values()))
    async with asyncio.timeout(5):
        while h2.stats["client_resets"] < 1 or runtime.pool.budget.requests:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert runtime.pool.budget.requests == 0


async def test_max_connections_one_rotates_the_connection_among_endpoints(grig: GrpcRig) -> None:
    grig.rig.apply(policy(connection_pool=ConnectionPool(max_connections=1)))
    out = await asyncio.to_thread(grig.calls, 30)
    assert {p for p, _ in out} == {"a", "b", "c"}, out  # an idle connection made way each time
    h2 = grig.rig.source.outbound.h2
    assert h2.pool.opened > 3
    runtime = next(iter(grig.rig.source.outbound.http._runtimes.values()))
    assert runtime.pool.budget.connections <= 1


async def test_a_bidirectional_stream_is_forwarded_message_by_message(grig: GrpcRig) -> None:
    """The client sends its next message only after the answer to the previous one: this
    works only if the sidecar forwards the request body as it arrives (no read-ahead)."""
    grig.rig.apply(policy(retries=Retries(2, retry_on=("unavailable",))))
    host, port = grig.rig.source.outbound.address

    def chat() -> list[str]:
        outbox: queue.Queue[echo_pb2.CallRequest | None] = queue.Queue()

        def requests() -> Iterator[echo_pb2.CallRequest]:
            while (item := outbox.get(timeout=10)) is not None:
                yield item

        with grpc.insecure_channel(f"{host}:{port}") as channel:
            replies = echo_pb2_grpc.EchoStub(channel).Chat(requests(), timeout=10)
            texts = []
            for i in range(5):
                outbox.put(echo_pb2.CallRequest(text=f"m{i}"))
                texts.append(next(replies).text)
            outbox.put(None)
            assert list(replies) == []
            return texts

    assert await asyncio.to_thread(chat) == [f"m{i}" for i in range(5)]


async def test_a_call_gets_the_source_span_retry_events_and_a_metrics_record(
    grig: GrpcRig,
) -> None:
    tel = FakeTelemetry()
    grig.rig.source.outbound.http.telemetry = tel
    grig.rig.apply(policy(retries=Retries(2, retry_on=("unavailable",))))
    grig.controls["a"].fail_ratio = 1.0  # a call that lands on a is retried elsewhere
    trace_id, app_span = secrets.token_hex(16), secrets.token_hex(8)
    host, port = grig.rig.source.outbound.address

    def calls() -> list[str]:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            meta = (("traceparent", f"00-{trace_id}-{app_span}-01"),)
            return [
                stub.Call(echo_pb2.CallRequest(), timeout=10, metadata=meta).pod for _ in range(12)
            ]

    pods = await asyncio.to_thread(calls)
    assert set(pods) <= {"b", "c"}, pods
    spans = source_spans(tel, 12, trace_id, app_span)
    for span in spans:
        attrs = span.attributes
        assert attrs[tm.SERVICE] == SVC.fqdn
        assert attrs[tm.STATUS] == 200
        assert attrs[GRPC_STATUS] == 0
        assert attrs[tm.PROTOCOL] == "grpc"
        assert attrs[tm.PATH] == "/fedgate.rig.echo.Echo/Call"
        assert attrs[tm.RETRIES] == len(span.events)
    retried = [s for s in spans if s.events]
    assert retried, "no call landed on a first"
    assert len(retried) == grig.controls["a"].failed
    [(name, event)] = retried[0].events
    assert name == "retry"
    assert event["why"] == "status 200, grpc-status 14"
    records = [r for r in tel.records if r.hop == tm.SOURCE]
    assert len(records) == 12
    assert {(r.protocol, r.code, r.service, r.destination_cluster) for r in records} == {
        ("grpc", "200", SVC.fqdn, "east")
    }
    assert all(r.request_bytes > 0 and r.response_bytes > 0 for r in records)
