"""Soak on the rig: fixed load for a long time, and what every rig process holds at start and end.

A benchmark, not a test: it prints a table and never fails on its figures. It brings up its own
two-cluster rig (restart policy Never, so a process that dies stays visible as dead) and runs,
from east's client pod (`ip netns exec`), a bounded load for `--duration` seconds:

- `--rate` HTTP/1.1 calls per second to the echo service, each on a new connection, spread
  over both clusters by the mesh (the table says how many each cluster answered);
- `--tcp` long-lived TCP connections, each carrying one keep-alive HTTP/1.1 call a second
  (a connection that breaks is counted as a failure and opened again).

For every rig process it samples, after `WARMUP` seconds of load ("start") and just before the
load ends ("end"): RSS (/proc/<pid>/status VmRSS), threads, open file descriptors
(/proc/<pid>/fd) and, for fedgate processes, asyncio tasks (the `fedgate_asyncio_tasks` gauge
on the admin port's /metrics). A sample every `--every` seconds goes to the rig's
`soak-samples.jsonl`, for the trend in between. The rig is torn down at the end, also on error
Ctrl-C or SIGTERM (unless `--keep`).

    sudo nice -n 10 .venv/bin/python bench/soak.py [--rig-prefix fgz] [--duration 3600]
        [--rate 50] [--tcp 4] [--every 300]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clusters.rig import bringup, lifecycle, procs, topology
from clusters.rig.cmd import CommandError, run_in
from clusters.rig.state import ProcessRecord

WARMUP = 20.0  # seconds of load before the start sample: connections and pools are warm
END_MARGIN = 10.0  # seconds before the load ends that the end sample is taken
ECHO = "http://echo.demo.svc.clusterset.local:8080/"

# Runs inside the client pod: `rate` new-connection calls a second on the main thread, `tcp`
# keep-alive connections on threads; one JSON summary line at the end (and one a minute).
LOAD = r"""
import collections, http.client, json, sys, threading, time, urllib.parse
url, rate, tcp, seconds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
u = urllib.parse.urlsplit(url)
end = time.monotonic() + seconds
lock = threading.Lock()
calls, failed = collections.Counter(), collections.Counter()
reasons, clusters = collections.Counter(), collections.Counter()

def call(conn, kind):
    try:
        conn.request("GET", u.path or "/", headers={"Host": u.netloc})
        r = conn.getresponse()
        body = r.read()
        ok, why = r.status == 200, f"HTTP {r.status}"
    except Exception as e:
        ok, why, body = False, f"{type(e).__name__}: {e}"[:120], b""
    with lock:
        calls[kind] += 1
        if not ok:
            failed[kind] += 1
            reasons[f"{kind}: {why}"] += 1
        else:
            try:
                clusters[json.loads(body).get("cluster", "?")] += 1
            except ValueError:
                clusters["?"] += 1
    return ok

def keepalive():
    conn = None
    while time.monotonic() < end:
        if conn is None:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
        if not call(conn, "tcp"):
            conn.close()
            conn = None
        time.sleep(1.0)
    if conn is not None:
        conn.close()

def summary():
    with lock:
        return json.dumps({"calls": dict(calls), "failed": dict(failed),
                           "reasons": reasons.most_common(5), "clusters": dict(clusters)})

threads = [threading.Thread(target=keepalive, daemon=True) for _ in range(tcp)]
for t in threads:
    t.start()
start, i, report = time.monotonic(), 0, time.monotonic() + 60
while (now := time.monotonic()) < end:
    due = start + i / rate
    if due > now:
        time.sleep(due - now)
    i += 1
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    call(conn, "new")
    conn.close()
    if now > report:
        print(summary(), flush=True)
        report = now + 60
for t in threads:
    t.join(timeout=15)
print(summary(), flush=True)
"""

_TASKS = re.compile(r"^fedgate_asyncio_tasks (\S+)$", re.M)


@dataclass(frozen=True)
class Sample:
    alive: bool
    rss_kib: int = 0
    threads: int = 0
    fds: int = 0
    tasks: int | None = None


def _status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _admin(record: ProcessRecord) -> str | None:
    argv = list(record.argv)
    return argv[argv.index("--admin") + 1] if "--admin" in argv[:-1] else None


def _tasks(record: ProcessRecord) -> int | None:
    admin = _admin(record)
    if admin is None:
        return None
    fetch = [
        sys.executable,
        "-c",
        "import sys, urllib.request as u; "
        "print(u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=5).read().decode())",
        f"http://{admin}/metrics",
    ]
    try:
        text = run_in(record.netns, fetch, timeout=15) if record.netns else _run_here(fetch)
    except (CommandError, subprocess.SubprocessError):
        return None
    found = _TASKS.search(text)
    return int(float(found.group(1))) if found else None


def _run_here(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=15, check=True).stdout


def sample(record: ProcessRecord) -> Sample:
    if not procs.owned(record):
        return Sample(alive=False)
    try:
        status = _status(record.pid)
        fds = len(os.listdir(f"/proc/{record.pid}/fd"))
    except OSError:  # exited between the check and the read
        return Sample(alive=False)
    rss = int(status.get("VmRSS", "0 kB").split()[0])
    return Sample(True, rss, int(status.get("Threads", "0")), fds, _tasks(record))


def sample_all(rig: Path) -> dict[str, Sample]:
    return {p.name: sample(p) for p in lifecycle.load(rig).processes}


def _pair(a: float | int | None, b: float | int | None, fmt: str = "{}") -> str:
    if a is None or b is None:
        return "-"
    return f"{fmt.format(a)} → {fmt.format(b)}"


def table(start: dict[str, Sample], end: dict[str, Sample]) -> str:
    rows = [
        "| process | RSS MiB start → end | asyncio tasks | threads | open fds |",
        "|---|---|---|---|---|",
    ]
    for name, s in start.items():
        e = end.get(name, Sample(alive=False))
        if not e.alive:
            rows.append(f"| {name} | dead at the end | - | - | - |")
            continue
        rss = _pair(s.rss_kib / 1024, e.rss_kib / 1024, "{:.1f}")
        rows.append(
            f"| {name} | {rss} | {_pair(s.tasks, e.tasks)} | {_pair(s.threads, e.threads)}"
            f" | {_pair(s.fds, e.fds)} |"
        )
    return "\n".join(rows)


def bring_up(rig: Path, prefix: str) -> None:
    etcd = shutil.which("etcd", path=str(Path(sys.executable).parent)) or shutil.which("etcd")
    assert etcd is not None, "no etcd binary"
    command = bringup.RigCommand(fedgate=(sys.executable, "-m", "fedgate"), etcd=etcd)
    lifecycle.down(rig, prefix)
    bringup.up(rig, 2, command, prefix=prefix, progress=print)


def _log(rig: Path, t: float, samples: dict[str, Sample]) -> None:
    with (rig / "soak-samples.jsonl").open("a") as f:
        f.write(json.dumps({"t": round(t, 1), **{n: s.__dict__ for n, s in samples.items()}}))
        f.write("\n")


def soak(rig: Path, duration: float, rate: float, tcp: int, every: float) -> str:
    pod = lifecycle.load(rig).pod("east", "client")
    assert pod is not None, "no client pod in east"
    argv = [sys.executable, "-I", "-c", LOAD, ECHO, str(rate), str(tcp), str(duration)]
    load = subprocess.Popen(
        ["ip", "netns", "exec", pod.netns, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    began = time.monotonic()
    try:
        time.sleep(min(WARMUP, duration / 4))
        start = sample_all(rig)
        _log(rig, time.monotonic() - began, start)
        end_at = began + max(duration - END_MARGIN, WARMUP)
        while (left := end_at - time.monotonic()) > 0:
            time.sleep(min(every, left))
            if time.monotonic() < end_at:
                _log(rig, time.monotonic() - began, sample_all(rig))
        end = sample_all(rig)
        _log(rig, time.monotonic() - began, end)
        stdout, stderr = load.communicate(timeout=END_MARGIN + 120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    lines = stdout.strip().splitlines()
    if not lines:
        return f"load produced no summary: {stderr.strip()[-300:]}\n\n{table(start, end)}"
    result = json.loads(lines[-1])
    calls, failed = result["calls"], result["failed"]
    head = (
        f"{duration:.0f} s, rate {rate:g}/s new connections + {tcp} keep-alive TCP connections: "
        f"calls {calls}, failed {failed or 0}, answered by {result['clusters']}"
    )
    if result["reasons"]:
        head += f", reasons {result['reasons']}"
    return f"{head}\n\n{table(start, end)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rig-prefix", default="fgz", help="the rig's namespace prefix")
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=50.0, help="new-connection calls/s")
    parser.add_argument("--tcp", type=int, default=4, help="keep-alive TCP connections")
    parser.add_argument("--every", type=float, default=300.0, help="seconds between samples")
    parser.add_argument("--rig-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="leave the rig up afterwards")
    args = parser.parse_args()
    topology.check_prefix(args.rig_prefix)
    if args.duration <= 0 or args.rate <= 0 or args.tcp < 0 or args.every <= 0:
        parser.error("--duration, --rate and --every must be positive, --tcp not negative")
    # SIGTERM unwinds like Ctrl-C, through the `finally` that tears the rig down.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rig = args.rig_dir or Path(tempfile.mkdtemp(prefix="fedgate-soak-"))
    print(f"rig {rig} (prefix {args.rig_prefix})", flush=True)
    try:
        bring_up(rig, args.rig_prefix)
        report = soak(rig, args.duration, args.rate, args.tcp, args.every)
    finally:
        if not args.keep:
            lifecycle.down(rig, args.rig_prefix)
    print()
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
