"""Faults to inject into a running rig, and the bounded client loops that count what callers see.

Shared by `bench/chaos.py` (a table of every issue-15 fault) and `tests/e2e/test_chaos.py` (the
same faults, asserted), so that the bench measures exactly what the tests assert.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clusters.rig import bringup, config_repo, lifecycle
from clusters.rig.cmd import run_in

CHAIN = "FGCHAOS"
REDIS_POLICY = """\
apiVersion: fedgate.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: redis
  namespace: demo
spec:
  host: redis.demo.svc.clusterset.local
  clusterWeights:
    - cluster: local
      weight: 70
    - cluster: remote
      weight: 30
"""

# One call per iteration (h2: 10 concurrent streams), a new client connection each; one JSON
# line per call: time, ok, why. Bounded by its `seconds` argument; SIGTERM ends it after the
# call under way (a test that has seen what it asserts needs no more).
LOAD = r"""
import json, signal, subprocess, sys, time, urllib.request, urllib.error
mode, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

def calls():
    if mode == "http":
        with opener.open(target, timeout=5) as r:
            return [(r.status == 200, str(r.status))]
    if mode == "redis":
        out = subprocess.run(["redis-cli", "-h", target, "-p", "6379", "PING"],
                             capture_output=True, text=True, timeout=5)
        return [(out.stdout.strip() == "PONG", (out.stdout + out.stderr).strip()[:120])]
    n = 10  # curl 7.88: one connection per transfer with prior knowledge (curl#10634)
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "--noproxy", "*",
                          "--max-time", "5", "--parallel", "--parallel-immediate",
                          "--parallel-max", str(n), "-w", "%{http_code} %{errormsg}\\n",
                          *(["-o", "/dev/null"] * n), f"{target}?i=[1-{n}]"],
                         capture_output=True, text=True, timeout=15)
    return [(line.startswith("200"), line.strip()) for line in out.stdout.splitlines()]

end = time.monotonic() + seconds
while time.monotonic() < end and not stop:
    t = time.time()
    try:
        got = calls()
    except urllib.error.HTTPError as e:
        body = e.read()[:160].decode(errors="replace")
        got = [(False, body if body.startswith(str(e.code)) else f"{e.code} {body}")]
    except Exception as e:
        got = [(False, f"{type(e).__name__}: {e}"[:140])]
    for ok, why in got:
        print(json.dumps({"t": t, "ok": ok, "why": why}), flush=True)
    time.sleep(0.05)
"""


@dataclass(frozen=True)
class Call:
    t: float  # wall-clock time the call started
    ok: bool
    why: str


def start_load(
    rig: Path, cluster: str, mode: str, target: str, seconds: float
) -> subprocess.Popen[str]:
    """A bounded loop of `mode` calls ("http", "redis", "h2") from `cluster`'s client pod."""
    pod = lifecycle.load(rig).pod(cluster, "client")
    assert pod is not None, f"{cluster}/client"
    argv = [sys.executable, "-I", "-c", LOAD, mode, target, str(seconds)]
    return subprocess.Popen(
        ["ip", "netns", "exec", pod.netns, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def calls(stdout: str) -> list[Call]:
    return [
        Call(float(c["t"]), bool(c["ok"]), str(c["why"]))
        for c in map(json.loads, stdout.splitlines())
    ]


def pid(rig: Path, name: str) -> int:
    record = lifecycle.load(rig).process(name)
    assert record is not None, name
    return record.pid


def kill(name: str) -> Callable[[Path], None]:
    def fault(rig: Path) -> None:
        os.kill(pid(rig, name), signal.SIGKILL)

    return fault


def sigstop(name: str) -> Callable[[Path], Callable[[], None]]:
    def fault(rig: Path) -> Callable[[], None]:
        stopped = pid(rig, name)
        os.kill(stopped, signal.SIGSTOP)
        return lambda: os.kill(stopped, signal.SIGCONT)

    return fault


def wan_drop(rig: Path) -> Callable[[], None]:
    """Drop every packet between east's and west's WAN addresses, silently (timeouts, not
    refusals), with iptables(-nft) rules in west's own namespace; returns the heal."""
    state = lifecycle.load(rig)
    east, west = state.plan("east"), state.plan("west")

    def ipt(*args: str) -> None:
        run_in(west.netns, ["iptables", *args])

    ipt("-N", CHAIN)
    ipt("-A", CHAIN, "-s", east.wan_ip, "-j", "DROP")
    ipt("-A", CHAIN, "-d", east.wan_ip, "-j", "DROP")
    ipt("-I", "INPUT", "-j", CHAIN)
    ipt("-I", "OUTPUT", "-j", CHAIN)

    def heal() -> None:
        ipt("-D", "INPUT", "-j", CHAIN)
        ipt("-D", "OUTPUT", "-j", CHAIN)
        ipt("-F", CHAIN)
        ipt("-X", CHAIN)

    return heal


def redis_in_both(rig: Path, command: bringup.RigCommand) -> None:
    """Redis in east and west, 70 % local / 30 % remote: an opaque TCP service whose remote
    failure has a way out."""
    # The second waits for both: a client may learn west's before the wait saw east's alone.
    for endpoints, cluster in enumerate(("east", "west"), start=1):
        bringup.add_redis(rig, command, cluster, endpoints)
    repo = config_repo.repo_dir(rig)
    config_repo.commit(repo, {"policies/redis.yaml": REDIS_POLICY}, "redis 70/30")
    bringup.wait_routes(rig, "redis", bringup.DEMO_NAMESPACE, 2)
