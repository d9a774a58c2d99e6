"""Chaos on the rig: each fault of issue 15 under a bounded load, and what the callers saw.

A benchmark, not a test: it prints a table and never fails on timing. It brings up its own
two-cluster rig (3 etcd members, 2 controller replicas, restart policy Never, so a killed
process stays killed for as long as the scenario measures; the bench restarts it itself) and
runs every scenario in turn. Each scenario starts bounded client loops inside rig pods (one new
connection per call, 5 s timeout), injects its fault `FAULT_AT` seconds in, heals it (where the
fault is temporary) and, once the loops end, puts the rig back together (restarts what it
killed, waits until routes, a leader and live clusters are back) before the next one.

    scenario            fault
    gateway-sigkill     west's gateway SIGKILLed (agent and pods fine)
    gateway-sigstop     west's gateway SIGSTOPped for HOLD seconds (hung, not dead), then SIGCONT
    wan-drop            packets between east's and west's WAN addresses dropped silently for
                        HOLD seconds (iptables-nft, i.e. nftables, rules in west's namespace)
    agent-sigkill       west's agent SIGKILLed; west's own client is counted too
    etcd-restart        every etcd member stopped for HOLD seconds, then started again
    controller-leader   the elected controller replica SIGKILLed
    etcd-member-kill    one etcd member of 3 SIGKILLed
    h2-goaway-every-100 an upstream HTTP/2 server that sends GOAWAY after every 100 requests on
                        a connection (curl, 10 concurrent h2 streams per iteration)
    redis-gateway-kill  a redis-cli loop (opaque TCP) while west's gateway is SIGKILLed

Columns: calls, failed calls, time to recover (from the fault to the last failed call; "-" with
no failure; "never" when the last call failed), and the reasons seen (most frequent first).

    sudo .venv/bin/python bench/chaos.py [--prefix fgc] [--seconds 25] [--only gateway-sigkill]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clusters.rig import bringup, control, lifecycle, procs, ready, topology
from clusters.rig.faults import calls, kill, pid, redis_in_both, sigstop, start_load, wan_drop
from mesh.model import ServicePort

FAULT_AT = 5.0  # seconds of clean load before the fault
HOLD = 12.0  # seconds a temporary fault lasts
ECHO = "http://echo.demo.svc.clusterset.local:8080/"
REDIS_HOST = "redis.demo.svc.clusterset.local"

# An upstream HTTP/2 server (h2c) that sends GOAWAY after `limit` requests on a connection,
# as servers with a per-connection request limit do (nginx `keepalive_requests`); streams above
# the GOAWAY's last-stream-id are never processed: the caller's proxy must retry them.
GOAWAY_SERVER = r"""
import asyncio, sys
import h2.config, h2.connection, h2.events
limit = int(sys.argv[1])

class Server(asyncio.Protocol):
    def connection_made(self, transport):
        self.t, self.n, self.last = transport, 0, None
        self.c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.c.initiate_connection()
        transport.write(self.c.data_to_send())

    def data_received(self, data):
        try:
            events = self.c.receive_data(data)
        except Exception:
            self.t.close()
            return
        for e in events:
            if not isinstance(e, h2.events.RequestReceived) or self.last is not None:
                continue
            self.n += 1
            body = b'{"cluster": "east", "pod": "goaway"}\n'
            self.c.send_headers(e.stream_id, [(":status", "200"),
                                              ("content-length", str(len(body)))])
            self.c.send_data(e.stream_id, body, end_stream=True)
            if self.n == limit:
                self.last = e.stream_id
                self.c.close_connection(last_stream_id=e.stream_id)
                print('{"event": "goaway sent"}', flush=True)
        self.t.write(self.c.data_to_send())
        if self.last is not None:
            self.t.close()

async def main():
    server = await asyncio.get_running_loop().create_server(Server, "0.0.0.0", 8443)
    await server.serve_forever()

asyncio.run(main())
"""
GOAWAY_URL = "http://goaway.demo.svc.clusterset.local:8443/"


@dataclass
class Outcome:
    name: str
    calls: int = 0
    failed: int = 0
    recover: str = "-"
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    note: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Callable[[Path], Callable[[], None] | None]  # returns its heal (None: permanent)
    clients: tuple[tuple[str, str, str], ...] = (("east", "http", ECHO),)  # cluster, mode, target
    restart: tuple[str, ...] = ()  # processes to start again afterwards
    hold: float = HOLD
    report: Callable[[Path], str] | None = None  # what the scenario adds to the reasons column


def etcd_stop(rig: Path) -> Callable[[], None]:
    members = [m.process for m in control.load(rig, lifecycle.load(rig).prefix).etcd]
    pids = [pid(rig, m) for m in members]
    for member_pid in pids:
        os.kill(member_pid, signal.SIGTERM)
    procs.terminate(pids)  # the record stays: control.restart starts each with its argv

    def heal() -> None:
        for m in members:
            control.restart(rig, m)

    return heal


def leader_kill(rig: Path) -> None:
    lead = ready.leadership(rig)
    assert lead is not None, "no leader"
    os.kill(pid(rig, lead.leader), signal.SIGKILL)


def goaways_sent(rig: Path) -> str:
    log = lifecycle.log_path(rig, "east-goaway").read_text(errors="replace")
    return f"{log.count('goaway sent')} GOAWAYs sent so far"


SCENARIOS = (
    Scenario("gateway-sigkill", kill("west-gateway"), restart=("west-gateway",)),
    Scenario("gateway-sigstop", sigstop("west-gateway")),
    Scenario("wan-drop", wan_drop),
    Scenario(
        "agent-sigkill",
        kill("west-agent"),
        clients=(("east", "http", ECHO), ("west", "http", ECHO)),
        restart=("west-agent",),
    ),
    Scenario("etcd-restart", etcd_stop),
    Scenario("controller-leader", leader_kill, restart=("controller", "controller-1")),
    Scenario("etcd-member-kill", kill("etcd-1"), restart=("etcd-1",)),
    Scenario(
        "h2-goaway-every-100",
        lambda rig: None,  # the upstream itself is the fault
        clients=(("east", "h2", GOAWAY_URL),),
        report=goaways_sent,
    ),
    Scenario(
        "redis-gateway-kill",
        kill("west-gateway"),
        clients=(("east", "redis", REDIS_HOST),),
        restart=("west-gateway",),
    ),
)


def bring_up(rig: Path, prefix: str) -> None:
    etcd = shutil.which("etcd", path=str(Path(sys.executable).parent)) or shutil.which("etcd")
    assert etcd is not None, "no etcd binary"
    command = bringup.RigCommand(fedgate=(sys.executable, "-m", "fedgate"), etcd=etcd)
    lifecycle.down(rig, prefix)
    bringup.up(rig, 2, command, prefix=prefix, etcd_members=3, controllers=2, progress=print)
    redis_in_both(rig, command)
    goaway = [sys.executable, "-c", GOAWAY_SERVER, "100"]
    port = ServicePort("http2", 8443, "HTTP2")
    bringup.add_pod(rig, command, "east", "goaway", "demo", "goaway", goaway, ("goaway.demo", port))
    bringup.wait_routes(rig, "goaway", bringup.DEMO_NAMESPACE, 1)


def settle(rig: Path, scenario: Scenario) -> str:
    """Start what the scenario killed and wait for a whole rig; a note if that failed."""
    for name in scenario.restart:
        record = lifecycle.load(rig).process(name)
        if record is not None and not procs.owned(record):
            control.restart(rig, name)
    try:
        bringup.wait_routes(rig, "echo", bringup.DEMO_NAMESPACE, 2, timeout=90)
        ready.wait_leader(rig, timeout=90)
    except Exception as e:  # reported in the table, the next scenario still runs
        return f"rig not whole afterwards: {e}"[:160]
    return ""


def run_scenario(rig: Path, scenario: Scenario, seconds: float) -> Outcome:
    loads = [start_load(rig, c, mode, target, seconds) for c, mode, target in scenario.clients]
    out = Outcome(scenario.name)
    time.sleep(FAULT_AT)
    fault_time = time.time()
    try:
        heal = scenario.fault(rig)
    except Exception as e:  # a fault that cannot be injected is reported
        heal, out.note = None, f"fault not injected: {e}"[:160]
    if heal is not None:
        time.sleep(scenario.hold)
        heal()
    last_failure, last_ok = 0.0, True
    per_client: list[str] = []
    for (cluster, _, _), p in zip(scenario.clients, loads, strict=True):
        stdout, _ = p.communicate(timeout=seconds + 60)
        got = calls(stdout)
        per_client.append(f"{cluster}/client {sum(not c.ok for c in got)} of {len(got)} failed")
        for call in got:
            out.calls += 1
            if not call.ok:
                out.failed += 1
                out.reasons[" ".join(call.why.split())[:110]] += 1
                last_failure = max(last_failure, call.t)
        last_ok = last_ok and (not got or got[-1].ok)
    if out.failed:
        out.recover = f"{max(0.0, last_failure - fault_time):.1f} s" if last_ok else "never"
    report = scenario.report(rig) if scenario.report is not None else ""
    if len(per_client) > 1:
        report = ", ".join([*per_client, *([report] if report else [])])
    note = settle(rig, scenario)
    out.note = "; ".join(n for n in (report, out.note, note) if n)
    return out


def table(outcomes: list[Outcome]) -> str:
    head = f"| {'scenario':<19} | calls | failed | recovered | reasons seen |"
    rows = [head, "|---|---|---|---|---|"]
    for o in outcomes:
        why = "; ".join(f"{n}x {r}" for r, n in o.reasons.most_common(3)) or "-"
        if o.note:
            why += f" ({o.note})"
        rows.append(f"| {o.name:<19} | {o.calls:>5} | {o.failed:>6} | {o.recover:>9} | {why} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", default="fgc", help="the rig's namespace prefix")
    parser.add_argument("--seconds", type=float, default=25.0, help="load per scenario")
    parser.add_argument("--only", action="append", help="run just this scenario (repeatable)")
    parser.add_argument("--rig-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="leave the rig up afterwards")
    args = parser.parse_args()
    topology.check_prefix(args.prefix)
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    rig = args.rig_dir or Path(tempfile.mkdtemp(prefix="fedgate-chaos-"))
    outcomes: list[Outcome] = []
    try:
        bring_up(rig, args.prefix)
        for scenario in chosen:
            print(f"--- {scenario.name}", flush=True)
            outcomes.append(run_scenario(rig, scenario, args.seconds))
            print(table(outcomes[-1:]).splitlines()[-1], flush=True)
    finally:
        if not args.keep:
            lifecycle.down(rig, args.prefix)
    print()
    print(table(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
