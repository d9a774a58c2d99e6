"""What tracing and metrics cost a request: latency and throughput as ratios to telemetry off.

    .venv/bin/python -m bench.observability [--requests 1000] [--rounds 3]

Sequential keep-alive GETs through a source sidecar (HTTP parsed, pooled inner mTLS) to a
destination sidecar and its echo app, on loopback (the rig of tests/sidecar): the two hops that
do per-request telemetry work. The same rig runs every mode, interleaved round by round so
that machine noise hits each alike:

- `off`: `mesh.telemetry.OFF` (no SDK object exists: one attribute check per request);
- `metrics`: Prometheus request metrics only;
- `tracing`: OpenTelemetry spans at both sidecars, batched and exported with OTLP/gRPC to a
  collector in another process (tests/e2e/otlp.py on loopback TCP), no metrics;
- `tracing+metrics`: both (what `fedgate sidecar --otlp-endpoint` runs).

Prints figures only; a benchmark is not a test. One process holds the client, both sidecars
and the app, so the exporter threads of both sidecars compete with both proxies for one
interpreter: an upper bound on what tracing costs one sidecar in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import subprocess
import sys
import time

from ca.authority import CertificateAuthority
from fedgate import logs, telemetry
from mesh.model import ClusterWeight, TrafficPolicy
from mesh.telemetry import OFF, Telemetry
from sidecar.sidecar import Sidecar
from tests.sidecar.conftest import EAST, WEST, Pki
from tests.sidecar.http_rig import SVC, HttpRig, start_http_rig, stop_http_rig


def _use(sidecar: Sidecar, t: Telemetry) -> None:
    sidecar.outbound.telemetry = t
    sidecar.outbound.http.telemetry = t
    sidecar.inbound.telemetry = t


def _fresh_connections(rig: HttpRig) -> None:
    """Close the idle inner connections: the destination decides to watch a connection (its
    tap) when it accepts it, so each mode starts on connections accepted under it."""
    http = rig.source.outbound.http
    for runtime in http._runtimes.values():
        http.pool.sweep(runtime.pool, keep=lambda key: False)


def _run(rig: HttpRig, n: int) -> tuple[list[float], float]:
    conn = rig.connection()
    times = []
    try:
        started = time.perf_counter()
        for _ in range(n):
            reply = rig.call("/", conn=conn)
            assert reply.status == 200, reply
            times.append(reply.elapsed)
        return times, time.perf_counter() - started
    finally:
        conn.close()


async def main(n: int, rounds: int, endpoint: str) -> None:
    now = dt.datetime.now(dt.UTC)
    pki = Pki(
        CertificateAuthority.create(EAST, now),
        CertificateAuthority.create(WEST, now),
        CertificateAuthority.create(EAST, now),
        now,
    )

    def settings(metrics: bool, otlp: str = "") -> telemetry.TelemetrySettings:
        return telemetry.TelemetrySettings("fedgate-bench", "bench", "east", otlp, metrics)

    modes: dict[str, Telemetry] = {
        "off": OFF,
        "metrics": telemetry.setup(settings(True)),
        "tracing": telemetry.setup(settings(False, endpoint)),
        "tracing+metrics": telemetry.setup(settings(True, endpoint)),
    }
    rig = await start_http_rig(pki, [("east", "a", {})], protocol="HTTP")
    results: dict[str, tuple[list[float], float]] = {m: ([], 0.0) for m in modes}
    try:
        rig.source.outbound.http.sniff_timeout = 0
        rig.apply(TrafficPolicy(SVC, (ClusterWeight("local", 100),)))
        await asyncio.to_thread(_run, rig, 100)  # warm up: pool, caches, the JIT-free paths
        for _ in range(rounds):
            for mode, t in modes.items():
                for sidecar in (rig.source, *(p.sidecar for p in rig.pods)):
                    _use(sidecar, t)
                _fresh_connections(rig)
                times, wall = await asyncio.to_thread(_run, rig, n)
                all_times, all_wall = results[mode]
                results[mode] = (all_times + times, all_wall + wall)
    finally:
        await stop_http_rig(rig)
    for t in modes.values():
        if isinstance(t, telemetry.ProcessTelemetry):
            await asyncio.to_thread(t.shutdown)  # flush what is queued

    print(f"{n} sequential requests x {rounds} rounds per mode, interleaved")
    print(f"{'mode':<16} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}   vs off: rate  p50   p99")
    base: tuple[float, float, float] | None = None
    for mode, (times, wall) in results.items():
        q = statistics.quantiles(times, n=100)
        rate, p50, p99 = len(times) / wall, q[49] * 1000, q[98] * 1000
        base = base or (rate, p50, p99)
        print(
            f"{mode:<16} {rate:8.0f} {p50:8.3f} {p99:8.3f}   "
            f"{rate / base[0]:13.2f} {p50 / base[1]:5.2f} {p99 / base[2]:5.2f}"
        )


def collector() -> subprocess.Popen[str]:
    """The OTLP collector, in its own process; its first line is its endpoint."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.otlp", "127.0.0.1:0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # Access lines are part of the cost (the destination's per-request line comes with
    # telemetry): render them as the processes do (fedgate.logs: JSON), into /dev/null.
    with open(os.devnull, "w") as sink, collector() as otlp:
        assert otlp.stdout is not None
        endpoint = otlp.stdout.readline().strip()
        real_stderr, sys.stderr = sys.stderr, sink
        try:
            logs.configure("bench")
        finally:
            sys.stderr = real_stderr
        asyncio.run(main(args.requests, args.rounds, endpoint))
        received, _ = otlp.communicate("", timeout=30)  # stdin closed: it reports and exits
    expected = 2 * args.requests * args.rounds * 2  # two tracing modes, two sidecars
    print(f"collector received {received.strip()} spans ({expected} expected)")
