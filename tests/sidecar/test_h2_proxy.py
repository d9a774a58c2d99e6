"""Plain HTTP/2 (h2c) through real sidecars on loopback, with curl --http2-prior-knowledge:
many requests on one client connection, each routed on its own; a TCP port sniffed as HTTP/2.

The apps are the rig's HTTP/2 echo (`clusters.rig.h2_echo`, python-hyper h2 on asyncio, in a
thread of its own), the client is curl (nghttp2), the inner hops real mutual TLS.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import subprocess
import threading
from collections.abc import AsyncIterator

import pytest

from clusters.rig.echo import EchoControl
from clusters.rig.h2_echo import serve_h2
from mesh import telemetry as tm
from mesh.model import (
    ClusterWeight,
    Fault,
    FaultAbort,
    HttpRoute,
    RequestMatch,
    StringMatch,
    TrafficPolicy,
)
from tests.sidecar.conftest import Pki
from tests.sidecar.fake_telemetry import FakeTelemetry, source_spans
from tests.sidecar.http_rig import SVC, VIP, HttpRig, start_http_rig, stop_http_rig


class H2Apps:
    """The h2 echo of every pod, on one event loop in a thread (like a separate process)."""

    def __init__(self, rig: HttpRig) -> None:
        self.controls = {p.name: EchoControl() for p in rig.pods}
        for pod in rig.pods:
            pod.stop_app()
        self._rig = rig
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(5), "h2 echo apps did not start"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        rig = self._rig
        tasks = [
            asyncio.create_task(
                serve_h2(p.cluster, p.name, p.app_ip, rig.app_port, self.controls[p.name])
            )
            for p in rig.pods
        ]
        await asyncio.sleep(0.05)  # let the servers bind before the first request
        self._ready.set()
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


async def h2_rig(pki: Pki, protocol: str) -> tuple[HttpRig, H2Apps]:
    """Pods a and b; the port declared `protocol`."""
    rig = await start_http_rig(pki, [("east", "a", {}), ("east", "b", {})], protocol=protocol)
    # curl picks its own source port: every connection is "to" the service VIP.
    rig.source.outbound._original_dst_of = lambda sock: (VIP, rig.app_port)
    apps = H2Apps(rig)
    return rig, apps


def curl(rig: HttpRig, n: int, *headers: str) -> list[tuple[int, str, str]]:
    """`n` requests, (status, pod, HTTP version) each. One connection per request: curl 7.88
    (Debian 12) breaks when it reuses a prior-knowledge connection (curl#10634, fixed in 8.0),
    so multiplexing on one app connection is tested with grpcio (test_grpc_proxy.py)."""
    host, port = rig.source.outbound.address
    fmt = "%{http_code} %header{x-fedgate-pod} %{http_version}\\n"
    argv = ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "20"]
    argv += ["--parallel", "--parallel-immediate", "--parallel-max", str(n)]  # no reuse
    argv += ["-H", "host: api.shop.svc.clusterset.local", "-w", fmt]
    argv += [arg for header in headers for arg in ("-H", header)]
    argv += ["-o", "/dev/null"] * n + [f"http://{host}:{port}/?i=[1-{n}]"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    rows = []
    for line in res.stdout.splitlines():
        code, pod, version = [*line.split(" "), "", ""][:3]
        rows.append((int(code), pod, version))
    assert len(rows) == n, res.stdout
    return rows


@pytest.fixture
async def rig_apps(pki: Pki) -> AsyncIterator[tuple[HttpRig, H2Apps]]:
    rig, apps = await h2_rig(pki, "HTTP2")
    try:
        yield rig, apps
    finally:
        await stop_http_rig(rig)
        apps.stop()


async def test_http2_requests_are_routed_each_over_pooled_upstream_connections(
    rig_apps: tuple[HttpRig, H2Apps],
) -> None:
    rig, _ = rig_apps
    rig.apply(TrafficPolicy(SVC, cluster_weights=(ClusterWeight("local", 100),)))
    rows = await asyncio.to_thread(curl, rig, 50)
    assert {(c, v) for c, _, v in rows} == {(200, "2")}
    seen = collections.Counter(p for _, p, _ in rows)
    assert set(seen) == {"a", "b"}, seen
    h2 = rig.source.outbound.h2
    # One upstream connection per endpoint, many streams on each (more than the echo's 100
    # concurrent streams at once would open another).
    assert h2.pool.opened == 2
    assert h2.stats["connections"] == 50
    assert h2.stats["requests"] == 50


async def test_http2_on_a_tcp_port_is_sniffed_by_its_preface(pki: Pki) -> None:
    rig, apps = await h2_rig(pki, "TCP")
    try:
        rig.apply(TrafficPolicy(SVC, cluster_weights=(ClusterWeight("local", 100),)))
        rows = await asyncio.to_thread(curl, rig, 10)
        assert {(c, v) for c, _, v in rows} == {(200, "2")}
        assert rig.source.outbound.http.stats["sniffed_h2"] == 10  # one connection each
        assert rig.source.outbound.h2.stats["requests"] == 10
    finally:
        await stop_http_rig(rig)
        apps.stop()


async def test_sidecar_answers_to_plain_http2_carry_status_and_reason(
    rig_apps: tuple[HttpRig, H2Apps],
) -> None:
    rig, _ = rig_apps
    abort = Fault(abort=FaultAbort(100, 418))
    timed = HttpRoute(
        "slow", (RequestMatch(uri=StringMatch("prefix", "/delay/")),), timeout=0.2, fault=Fault()
    )
    rig.apply(
        TrafficPolicy(
            SVC, cluster_weights=(ClusterWeight("local", 100),), fault=abort, routes=(timed,)
        )
    )
    host, port = rig.source.outbound.address

    def one(path: str) -> tuple[str, float]:
        fmt = "%{http_code} %header{x-fedgate-reason}|%{time_total}"
        argv = ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "5", "-o", "/dev/null"]
        argv += ["-H", "host: api.shop.svc.clusterset.local", "-w", fmt]
        res = subprocess.run(
            [*argv, f"http://{host}:{port}{path}"], capture_output=True, text=True, check=False
        )
        assert res.returncode == 0, res.stderr
        head, secs = res.stdout.split("|")
        return head, float(secs)

    assert (await asyncio.to_thread(one, "/"))[0] == "418 fault abort"
    answer, seconds = await asyncio.to_thread(one, "/delay/2000")
    assert answer == "504 upstream timeout"
    assert 0.2 <= seconds < 0.5


async def test_http2_requests_get_the_source_span_and_a_metrics_record(
    rig_apps: tuple[HttpRig, H2Apps],
) -> None:
    rig, _ = rig_apps
    tel = FakeTelemetry()
    rig.source.outbound.http.telemetry = tel
    rig.apply(TrafficPolicy(SVC, cluster_weights=(ClusterWeight("local", 100),)))
    trace_id, app_span = secrets.token_hex(16), secrets.token_hex(8)
    rows = await asyncio.to_thread(curl, rig, 3, f"traceparent: 00-{trace_id}-{app_span}-01")
    assert {(c, v) for c, _, v in rows} == {(200, "2")}
    for span in source_spans(tel, 3, trace_id, app_span):
        assert span.attributes[tm.STATUS] == 200
        assert span.attributes[tm.PROTOCOL] == "http"
        assert span.attributes[tm.DESTINATION_CLUSTER] == "east"
        assert span.attributes[tm.RETRIES] == 0
    records = [r for r in tel.records if r.hop == tm.SOURCE]
    assert {(r.protocol, r.code, r.service) for r in records} == {("http", "200", SVC.fqdn)}
    assert len(records) == 3
    # No TrafficPolicy route matched; both ends are named by their verified identities.
    workloads = {(r.route, r.source_workload, r.destination_workload) for r in records}
    assert workloads == {(tm.DEFAULT_ROUTE, "client", "api")}
