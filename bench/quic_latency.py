"""Where the time of one 1 KiB request/response through the QUIC tunnel goes (a benchmark:
prints, never asserts).

    .venv/bin/python bench/quic_latency.py [--rounds 3] [--rates 100,1000,5000] [--seconds 2]
                                           [--chains relays,gw-quic,gw-quic+lone_ack_delay=0.02]
                                           [--trace 200]
                                           [--one-process]

Same chains as `bench/transports.py` (every hop its own process on loopback, uvloop):
client -> east egress ==QUIC==> west ingress -> echo server, and back. Two modes:

* latency (default): the open-loop 1 KiB p50/p99 of `transports.py` at each rate, the chains
  alternated round after round (A/B on a shared machine), medians printed per chain and rate;
  with the CPU seconds per request each gateway spent.
* `--trace N`: N exchanges, one at a time every 10 ms over one connection, with each gateway's
  driver steps stamped (`time.perf_counter_ns`, CLOCK_MONOTONIC, comparable across processes;
  the hooks wrap methods of this process only and cost ~1 µs each): prints, per step, the
  median time since the client's send, so the gap between steps shows where the time goes
  (Python work, a process wake-up, a timer).

A chain name may carry `TunnelSettings` overrides for both gateways after `+` (JSON values):
`gw-quic+lone_ack_delay=0.02` turns `gateway.quic_ack`'s ACK policy on, for A/B runs against
`gw-quic` (aioquic's own timing).

`--spin-us N` (an experiment, not a setting of the gateway): each gateway busy-polls its event
loop for N µs after every UDP send and TCP write, so answers find it awake; `--pin` puts east
on CPU 0 and west on CPU 1.

`--one-process` runs both gateways on one event loop in one child process (the comparison the
issue quotes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import transports as tp  # noqa: E402  (the bench module next to this one)

_trace: list[tuple[int, str]] = []


def _stamp(label: str) -> None:
    _trace.append((time.perf_counter_ns(), label))


def _wrap(owner: Any, name: str, label: str, after: bool = False) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _trace.append((time.perf_counter_ns(), label))
        result = original(*args, **kwargs)
        if after:
            _trace.append((time.perf_counter_ns(), label + " done"))
        return result

    setattr(owner, name, wrapper)


def install_hooks(side: str) -> None:
    """Stamp the driver's steps in this process (labels prefixed with the side)."""
    from gateway import quic_udp, server, splice, tunnel
    from gateway.quic_flow import TunnelQuicConnection

    p = side + ": "
    _wrap(quic_udp.UdpEndpoint, "_on_readable", p + "udp readable")
    _wrap(quic_udp.UdpEndpoint, "_sendmsg", p + "udp send")
    _wrap(TunnelQuicConnection, "receive_datagram", p + "quic receive", after=True)
    _wrap(TunnelQuicConnection, "datagrams_to_send", p + "quic build", after=True)
    _wrap(TunnelQuicConnection, "send_stream_data", p + "quic stream write", after=True)
    _wrap(TunnelQuicConnection, "next_event", p + "quic next event")
    _wrap(tunnel.TunnelConnection, "datagram_received", p + "conn datagram")
    _wrap(tunnel.TunnelConnection, "_process_events", p + "events", after=True)
    _wrap(server.TunnelServer, "datagram_received", p + "server datagram")
    _wrap(tunnel.TunnelConnection, "transmit", p + "transmit")
    _wrap(tunnel.TunnelConnection, "_handle_timer", p + "timer fired")
    _wrap(splice.Splice, "data_received", p + "tcp read", after=True)
    _wrap(splice.Splice, "stream_data", p + "tcp write")


def _dump(path: str) -> None:
    Path(path).write_text(json.dumps(_trace))


def _dump_on_term(path: str) -> None:
    def term() -> None:
        _dump(path)
        os._exit(0)

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, term)


def install_spin(spin_us: int) -> None:
    """The experiment of `--spin-us`: after each UDP send and each TCP write (a request or an
    answer handed on), keep this process's event loop polling without sleeping for `spin_us`,
    so the answer finds the process awake and its code warm. Costs a CPU while it spins."""
    from gateway import quic_udp, splice

    loop = asyncio.get_running_loop()
    state = {"until": 0.0, "active": False}

    def spin() -> None:
        # A ready callback makes the loop poll with a zero timeout: a busy loop that still
        # serves every socket.
        if time.perf_counter() < state["until"]:
            loop.call_soon(spin)
        else:
            state["active"] = False

    def kick() -> None:
        state["until"] = time.perf_counter() + spin_us / 1e6
        if not state["active"]:
            state["active"] = True
            loop.call_soon(spin)

    for owner, name in ((quic_udp.UdpEndpoint, "_sendmsg"), (splice.Splice, "stream_data")):
        original = getattr(owner, name)

        def wrapper(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            result = _original(*args, **kwargs)
            kick()
            return result

        setattr(owner, name, wrapper)


async def run_traced_gateway(cfg: dict[str, Any]) -> None:
    if cfg.get("cpu") is not None:
        os.sched_setaffinity(0, {cfg["cpu"]})
    if cfg.get("spin_us"):
        install_spin(cfg["spin_us"])
    if cfg.get("trace_out"):
        install_hooks(cfg["cluster"])
        _dump_on_term(cfg["trace_out"])
    await tp.run_gateway(cfg)


async def run_gateway_pair(cfg: dict[str, Any]) -> None:
    """Both gateways of a chain on this process's one event loop."""
    import builtins

    if cfg.get("trace_out"):
        install_hooks("both")
        _dump_on_term(cfg["trace_out"])
    real_print = builtins.print
    ready: list[int] = []

    def print_ready_once(*args: Any, **kwargs: Any) -> None:
        # Each run_gateway prints READY; the parent waits for one line.
        if args == ("READY",):
            ready.append(1)
            if len(ready) < 2:
                return
        real_print(*args, **kwargs)

    builtins.print = print_ready_once
    await asyncio.gather(*(tp.run_gateway(peer) for peer in cfg["pair"]))


# --- chains ----------------------------------------------------------------------------------


class Launcher:
    """Starts chains through `transports.py`, with the gateway roles redirected here."""

    def __init__(self, workdir: Path, trace: bool, one_process: bool) -> None:
        self.workdir = workdir
        self.trace = trace
        self.one_process = one_process
        self.traces: list[Path] = []
        self._pending_pair: list[dict[str, Any]] = []
        self._orig_role = tp.role
        self._orig_start = tp.start
        self.overrides: dict[str, Any] = {}
        self.pin = False
        self.spin_us = 0

    def role(self, name: str, cfg: dict[str, Any], workdir: Path) -> list[str]:
        if cfg["role"] == "gateway":
            cfg = dict(cfg, tunnel=self.overrides)
            if self.pin:
                cfg["cpu"] = 0 if cfg["cluster"] == "east" else 1
            cfg["spin_us"] = self.spin_us
            if self.trace:
                out = workdir / f"{name}.trace.json"
                self.traces.append(out)
                cfg["trace_out"] = str(out)
            if self.one_process:
                self._pending_pair.append(cfg)
                if len(self._pending_pair) < 2:
                    return []  # started with its partner
                pair = {"role": "pair", "pair": self._pending_pair}
                if self.trace:
                    out = workdir / f"{name}-pair.trace.json"
                    self.traces = [out]
                    pair["trace_out"] = str(out)
                self._pending_pair = []
                cfg = pair
            path = workdir / f"{name}.json"
            path.write_text(json.dumps(cfg))
            return [sys.executable, __file__, "--role", cfg["role"], "--config", str(path)]
        return self._orig_role(name, cfg, workdir)

    def start(self, argv: list[str], name: str, logdir: Path, ready_line: bool = True) -> Any:
        if not argv:
            return _NoProcess()
        return self._orig_start(argv, name, logdir, ready_line)

    def chain(self, name: str, pki: Any, server: tuple[str, int], logdir: Path) -> Any:
        """`name` is a chain of `transports.py`, optionally followed by TunnelSettings
        overrides for both gateways: `gw-quic+lone_ack_delay=0.02` (JSON values)."""
        name, *settings = name.split("+")
        self.overrides = {}
        for item in settings:
            key, _, value = item.partition("=")
            self.overrides[key] = json.loads(value)
        tp.role, tp.start = self.role, self.start
        try:
            if name == "relays":
                return tp.haproxy_relays(server, self.workdir, logdir)
            if name == "direct":
                return tp.Chain("direct", server)
            datagram = 8952 if name == "gw-quic9k" else 1350
            transport = name.removeprefix("gw-").removesuffix("9k")
            chain = tp.fedgate_chain(
                name, transport, datagram, pki, server, self.workdir, logdir, sidecars=False
            )
            chain.procs = {k: p for k, p in chain.procs.items() if not isinstance(p, _NoProcess)}
            return chain
        finally:
            tp.role, tp.start = self._orig_role, self._orig_start


class _NoProcess:
    pid = 0

    def poll(self) -> int:
        return 0


# --- measurements ------------------------------------------------------------------------------


async def traced_exchanges(entry: tuple[str, int], preamble: bytes, count: int) -> list[int]:
    """`count` sequential 1 KiB echoes, 10 ms apart; returns [send0, recv0, send1, ...] in ns."""
    reader, writer = await asyncio.open_connection(*entry)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(preamble + b"E")
    if preamble:
        await reader.readuntil(b"\r\n\r\n")
    payload = os.urandom(tp.REQ)
    stamps: list[int] = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        writer.write(payload)
        await reader.readexactly(tp.REQ)
        t1 = time.perf_counter_ns()
        stamps += [t0, t1]
        await asyncio.sleep(0.01)
    writer.close()
    return stamps


def timeline(stamps: list[int], traces: list[tuple[int, str]]) -> None:
    """Median offset of each step from the client's send, over all exchanges."""
    traces.sort()
    per_step: dict[str, list[float]] = {}
    order: dict[str, list[int]] = {}
    totals = []
    i = 0
    for k in range(0, len(stamps), 2):
        t0, t1 = stamps[k], stamps[k + 1]
        totals.append((t1 - t0) / 1e3)
        while i < len(traces) and traces[i][0] < t0:
            i += 1
        seen: dict[str, int] = {}
        j = i
        while j < len(traces) and traces[j][0] <= t1:
            t, label = traces[j]
            n = seen.get(label, 0)
            seen[label] = n + 1
            key = f"{label} #{n + 1}" if n else label
            per_step.setdefault(key, []).append((t - t0) / 1e3)
            order.setdefault(key, []).append(j)
            j += 1
    n = len(totals)
    print(f"  {n} exchanges; round trip p50 {statistics.median(totals):.0f} µs")
    print(f"  {'step (side: what)':<42} {'seen':>5} {'µs since send (p50)':>20}")
    rows = sorted(per_step.items(), key=lambda kv: statistics.median(kv[1]))
    for key, offsets in rows:
        if len(offsets) < n // 4:
            continue
        print(f"  {key:<42} {len(offsets):>5} {statistics.median(offsets):>20.0f}")
    print(f"  {'client: response read':<42} {n:>5} {statistics.median(totals):>20.0f}")
    # Everything each gateway did per exchange, on the critical path or not (ACK-only
    # packets, timers): the CPU cost of an exchange is in these wake-ups too.
    first, last = stamps[0], stamps[-1] + 10_000_000
    counts: dict[str, int] = {}
    for t, label in traces:
        if first <= t <= last:
            counts[label] = counts.get(label, 0) + 1
    per = ", ".join(
        f"{label} {counts.get(label, 0) / n:.2f}"
        for label in sorted(counts)
        if label.endswith(("udp readable", "udp send", "timer fired", "tcp read"))
    )
    print(f"  per exchange: {per}")


def cpu(pid: int) -> float:
    return tp.cpu_seconds(pid)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="fedgate-quiclat-"))
    logdir = workdir / "logs"
    logdir.mkdir()
    print(f"load average before: {loadavg()}")
    server_port = tp.free_port()
    server_cfg = {"role": "server", "host": "127.0.0.1", "port": server_port}
    server = tp.start(tp.role("server", server_cfg, workdir), "server", logdir)
    pki = tp.Pki(workdir)
    srv = ("127.0.0.1", server_port)
    chains = [c for c in args.chains.split(",") if c]
    rates = [int(r) for r in args.rates.split(",") if r]
    results: dict[str, dict[int, list[tuple[float, float, float]]]] = {
        c: {r: [] for r in rates} for c in chains
    }
    try:
        if args.trace:
            launcher = Launcher(workdir, True, args.one_process)
            launcher.pin = args.pin
            launcher.spin_us = args.spin_us
            for name in chains:
                chain = launcher.chain(name, pki, srv, logdir)
                try:
                    tp._preamble = chain.preamble
                    await tp.latency(chain.entry, 100, 0.5)  # warm up
                    stamps = await traced_exchanges(chain.entry, chain.preamble, args.trace)
                finally:
                    chain.stop()
                traces: list[tuple[int, str]] = []
                for path in launcher.traces:
                    with contextlib.suppress(FileNotFoundError):
                        traces += [tuple(x) for x in json.loads(path.read_text())]  # type: ignore[misc]
                launcher.traces = []
                print(f"{name}{' (one process)' if args.one_process else ''}:")
                timeline(stamps, traces)
            return
        launcher = Launcher(workdir, False, args.one_process)
        launcher.pin = args.pin
        launcher.spin_us = args.spin_us
        for rnd in range(args.rounds):
            for name in chains:
                chain = launcher.chain(name, pki, srv, logdir)
                try:
                    tp._preamble = chain.preamble
                    await tp.latency(chain.entry, 100, 0.5)  # warm up
                    for rate in rates:
                        before = {n: cpu(p.pid) for n, p in chain.procs.items()}
                        lat = await tp.latency(chain.entry, rate, args.seconds)
                        used = sum(cpu(p.pid) - before[n] for n, p in chain.procs.items())
                        reqs = rate * args.seconds
                        results[name][rate].append((lat["p50_ms"], lat["p99_ms"], used / reqs))
                        print(
                            f"  round {rnd + 1} {name:<10} {rate:>5}/s: p50 {lat['p50_ms']:.3f}"
                            f" ms, p99 {lat['p99_ms']:.3f} ms, lost {lat['lost']},"
                            f" gateways' CPU {used / reqs * 1e6:.0f} µs/req",
                            flush=True,
                        )
                finally:
                    chain.stop()
        print(f"\nmedians of {args.rounds} rounds (p50 ms / p99 ms / gateways' CPU µs per request)")
        print(f"  {'chain':<12}" + "".join(f"{f'{r}/s':>24}" for r in rates))
        for name in chains:
            cells = []
            for rate in rates:
                runs = results[name][rate]
                p50 = statistics.median(r[0] for r in runs)
                p99 = statistics.median(r[1] for r in runs)
                c = statistics.median(r[2] for r in runs) * 1e6
                cells.append(f"{p50:.2f} / {p99:.2f} / {c:.0f}")
            print(f"  {name:<12}" + "".join(f"{c:>24}" for c in cells))
    finally:
        server.terminate()
        server.wait(5)
        print(f"load average after: {loadavg()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--chains", default="relays,gw-quic")
    p.add_argument("--rates", default="100,1000,5000")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trace", type=int, default=0, help="trace N sequential exchanges")
    p.add_argument("--one-process", action="store_true", help="both gateways in one process")
    p.add_argument("--pin", action="store_true", help="east gateway on CPU 0, west on CPU 1")
    p.add_argument(
        "--spin-us", type=int, default=0, help="gateways busy-poll this long after each send"
    )
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    import uvloop

    if args.role == "main":
        uvloop.run(run(args))
        return
    cfg = json.loads(Path(args.config).read_text())
    runner = {"gateway": run_traced_gateway, "pair": run_gateway_pair}[args.role]
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        uvloop.run(runner(cfg))


if __name__ == "__main__":
    main()
