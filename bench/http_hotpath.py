"""CPU per HTTP/1.1 request of the source and destination sidecars, in one process (a benchmark:
prints, never asserts).

    .venv/bin/python -m bench.http_hotpath [--rate 1000] [--seconds 5] [--rounds 5] [--profile]

The loopback HTTP rig of tests/sidecar (`tests.sidecar.http_rig`): a source sidecar and one
destination sidecar, both on this process's uvloop event loop, in front of the rig's echo
workload (http.server threads). Telemetry as in a rig process: metrics on (the destination's
HTTP tap and both sidecars' metrics records) and the access log through `fedgate.logs` to
/dev/null. The load is bench/footprint.py's (1 KiB POSTs, open loop at `--rate` over 16
keep-alive connections) and the echo runs as a process of its own, so this process's only busy
thread is the event loop's, running exactly the two sidecars: its CPU time
(`time.thread_time`) over a round, per request answered, is their cost per request. `--profile`
prints a cProfile of that thread for one round (slower: its figure is not comparable).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from fedgate import logs, telemetry
from mesh.model import ClusterWeight, TrafficPolicy
from tests.sidecar.conftest import new_pki
from tests.sidecar.http_rig import HOST, SVC, VIP, HttpRig, Pod, start_http_rig, stop_http_rig

ROOT = Path(__file__).resolve().parent.parent


def _echo(pod: Pod, port: int) -> subprocess.Popen[bytes]:
    """The pod's echo workload in a process of its own (its threads off this one's GIL)."""
    pod.stop_app()
    argv = [sys.executable, "-m", "clusters.rig.echo", "--cluster", pod.cluster, "--pod", pod.name]
    return subprocess.Popen([*argv, "--host", pod.app_ip, "--port", str(port)], cwd=ROOT)


async def _round(
    rig: HttpRig, a: argparse.Namespace, seconds: float
) -> tuple[float, dict[str, Any]]:
    """(loop-thread CPU seconds, the load generator's report) for one run of the load."""
    host, port = rig.source.outbound.address
    argv = [sys.executable, str(ROOT / "bench" / "footprint.py"), "--role", "load"]
    argv += ["--target", f"{host}:{port}", "--vhost", HOST]
    argv += ["--rate", str(a.rate), "--duration", str(seconds)]
    cpu0 = time.thread_time()
    load = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, cwd=ROOT)
    out, _ = await load.communicate()
    return time.thread_time() - cpu0, json.loads(out)


async def main(a: argparse.Namespace) -> None:
    pki = new_pki()
    tel = telemetry.setup(telemetry.TelemetrySettings("fedgate-sidecar", "bench.east", "east"))
    rig = await start_http_rig(pki, [("east", "a", {})])
    echo = _echo(rig.pods[0], rig.app_port)
    try:
        # Every client connection is "to" the service (the load generator's ports are unknown).
        rig.source.outbound._original_dst_of = lambda sock: (VIP, rig.app_port)
        rig.source.outbound.http.sniff_timeout = 0
        rig.source.outbound.http.telemetry = tel
        rig.pods[0].sidecar.inbound.telemetry = tel
        rig.apply(TrafficPolicy(SVC, (ClusterWeight("local", 100),)))
        await _round(rig, a, 1.0)  # warm up: the echo is up, connections pooled
        profiler = cProfile.Profile() if a.profile else None
        best = float("inf")
        for _ in range(1 if profiler else a.rounds):
            if profiler is not None:
                profiler.enable()
            cpu, ld = await _round(rig, a, a.seconds)
            if profiler is not None:
                profiler.disable()
            per = cpu / max(ld["ok"], 1) * 1e6
            best = min(best, per)
            print(
                f"{ld['ok']} requests, {ld['rate']:5.0f}/s, p50 {ld['p50_ms']:6.2f} ms: the "
                f"sidecars' loop thread {per:6.1f} us CPU per request ({ld['errors']} errors)"
            )
        print(f"best of {a.rounds}: {best:.1f} us CPU per request (source + destination)")
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(a.sort).print_stats(a.top)
            print(out.getvalue())
    finally:
        echo.terminate()
        echo.wait(10)
        await stop_http_rig(rig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, default=1000, help="requests per second asked")
    p.add_argument("--seconds", type=float, default=5.0, help="of load per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--sort", default="tottime")
    p.add_argument("--top", type=int, default=45)
    args = p.parse_args()
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull  # the access lines (fedgate.logs writes to stderr)
        logs.configure("sidecar", "east")
        try:
            uvloop.run(main(args))
        finally:
            sys.stderr = sys.__stderr__
