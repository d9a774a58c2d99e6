"""HTTP/1.1 through the source sidecar on loopback: requests per second and latency.

    .venv/bin/python -m bench.http_sidecar [--requests 2000]

Three ways to send the same sequential GETs to the echo workload (http.server) behind a
destination sidecar, over real mutual TLS:

- `http, pooled`: the sidecar parses HTTP and reuses its inner mTLS connection (the default);
- `http, no reuse`: the same with pooled connections never reused (a handshake per request);
- `tcp, new conn`: the port declared TCP (no sniffing), so a client connection per request is
  proxied at L4 with a handshake each: what the sidecar did before HTTP awareness.

Prints figures only; a benchmark is not a test. Uses the loopback rig of tests/sidecar.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import time

from ca.authority import CertificateAuthority
from mesh.model import ClusterWeight, TrafficPolicy
from tests.sidecar.conftest import EAST, WEST, Pki
from tests.sidecar.http_rig import SVC, HttpRig, start_http_rig, stop_http_rig


def _run(rig: HttpRig, n: int, keep_alive: bool) -> list[float]:
    times = []
    conn = rig.connection() if keep_alive else None
    try:
        for _ in range(n):
            reply = rig.call("/", conn=conn)
            assert reply.status == 200, reply
            times.append(reply.elapsed)
    finally:
        if conn is not None:
            conn.close()
    return times


def _report(label: str, times: list[float], wall: float) -> None:
    q = statistics.quantiles(times, n=100)
    print(
        f"{label:<16} {len(times) / wall:8.0f} req/s   p50 {q[49] * 1000:6.2f} ms"
        f"   p99 {q[98] * 1000:6.2f} ms"
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
    for label, protocol, reuse, keep_alive in (
        ("http, pooled", "HTTP", True, True),
        ("http, no reuse", "HTTP", False, True),
        ("tcp, new conn", "TCP", True, False),
    ):
        rig = await start_http_rig(pki, [("east", "a", {})], protocol=protocol)
        try:
            rig.source.outbound.http.sniff_timeout = 0
            if not reuse:
                rig.source.outbound.http.pool.idle_timeout = -1.0
            rig.apply(policy)
            await asyncio.to_thread(_run, rig, 50, keep_alive)  # warm up
            started = time.perf_counter()
            times = await asyncio.to_thread(_run, rig, n, keep_alive)
            _report(label, times, time.perf_counter() - started)
            print(f"{'':16} inner connections opened: {rig.source.outbound.http.pool.opened}")
        finally:
            await stop_http_rig(rig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    asyncio.run(main(parser.parse_args().requests))
