"""gRPC through the source sidecar on loopback: calls per second and latency.

    .venv/bin/python -m bench.grpc_sidecar [--calls 2000]

Unary calls of the rig's gRPC echo (grpcio server) behind a destination sidecar, over real
mutual TLS, from one grpcio channel:

- `direct`: the client talks to the app itself (no sidecar): the floor;
- `l4, per connection`: the port declared TCP with sniffing off: the channel's one connection
  is relayed as bytes (what the sidecar did before HTTP/2 awareness);
- `h2, per call`: the port declared GRPC: every call is a stream routed on its own over the
  pooled upstream HTTP/2 connection (the default now);
each sequential (one call in flight) and with 16 calls in flight.

Prints figures only; a benchmark is not a test. Uses the loopback rig of tests/sidecar.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import time

import grpc

from ca.authority import CertificateAuthority
from clusters.rig.api import echo_pb2, echo_pb2_grpc
from clusters.rig.grpc_echo import make_server
from mesh.model import ClusterWeight, TrafficPolicy
from tests.sidecar.conftest import EAST, WEST, Pki
from tests.sidecar.http_rig import SVC, VIP, start_http_rig, stop_http_rig

IN_FLIGHT = 16


def _sequential(target: str, n: int) -> tuple[list[float], float]:
    with grpc.insecure_channel(target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        req = echo_pb2.CallRequest(text="hello")
        for _ in range(50):  # warm up
            stub.Call(req, timeout=10)
        times = []
        started = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            stub.Call(req, timeout=10)
            times.append(time.perf_counter() - t)
        return times, time.perf_counter() - started


def _concurrent(target: str, n: int) -> float:
    with grpc.insecure_channel(target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        req = echo_pb2.CallRequest(text="hello")
        stub.Call(req, timeout=10)
        started = time.perf_counter()
        for _ in range(n // IN_FLIGHT):
            futs = [stub.Call.future(req, timeout=10) for _ in range(IN_FLIGHT)]
            for f in futs:
                f.result()
        return (n // IN_FLIGHT) * IN_FLIGHT / (time.perf_counter() - started)


def _report(label: str, times: list[float], wall: float, parallel: float) -> None:
    q = statistics.quantiles(times, n=100)
    print(
        f"{label:<20} {len(times) / wall:7.0f} calls/s   p50 {q[49] * 1000:6.2f} ms"
        f"   p99 {q[98] * 1000:6.2f} ms   {IN_FLIGHT} in flight: {parallel:7.0f} calls/s"
    )


async def main(n: int) -> None:
    now = dt.datetime.now(dt.UTC)
    pki = Pki(
        CertificateAuthority.create(EAST, now),
        CertificateAuthority.create(WEST, now),
        CertificateAuthority.create(EAST, now),
        now,
    )
    policy = TrafficPolicy(SVC, (ClusterWeight("local", 100),))
    for label, protocol in (
        ("direct", ""),
        ("l4, per connection", "TCP"),
        ("h2, per call", "GRPC"),
    ):
        rig = await start_http_rig(pki, [("east", "a", {})], protocol=protocol or "GRPC")
        pod = rig.pods[0]
        pod.stop_app()
        server = make_server(pod.cluster, pod.name, pod.app_ip, rig.app_port)
        server.start()
        try:
            rig.source.outbound.http.sniff_timeout = 0
            rig.source.outbound._original_dst_of = lambda sock, rig=rig: (VIP, rig.app_port)
            rig.apply(policy)
            host, port = rig.source.outbound.address
            target = f"{pod.app_ip}:{rig.app_port}" if not protocol else f"{host}:{port}"
            times, wall = await asyncio.to_thread(_sequential, target, n)
            parallel = await asyncio.to_thread(_concurrent, target, n)
            _report(label, times, wall, parallel)
        finally:
            server.stop(0)
            await stop_http_rig(rig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    asyncio.run(main(parser.parse_args().calls))
