"""The tunnel transports side by side, on the rig, in one run (a benchmark: prints, never asserts).

    .venv/bin/python bench/transports.py [--seconds 3] [--repeat 3] [--out results.json]
                                         [--chains direct,haproxy,tls,quic,quic9k,passthrough]
                                         [--where rig|loopback] [--rig-prefix fgb]
                                         [--sidecar-multiplex on|off]

Where (`--where`, default `rig` as root, else `loopback`):

* rig: the rig's network namespaces (`clusters.rig.netns`, prefix `fgb`, removed afterwards):
  the client and the source sidecar in pod `fgb-east-client` (10.1.0.10), the east gateway (or
  HAProxy relay) in cluster `fgb-east` (pods side 10.1.0.1, WAN 172.30.0.10), the west one in
  `fgb-west` (WAN 172.30.0.11), the destination sidecar and the server in pod
  `fgb-west-server` (10.2.0.10). Every hop crosses its real veth and bridge; the WAN links
  carry 9,000-byte frames (quic9k). `direct` is the client reaching the server over the same
  veths and bridges with no proxy (a route for the west pod subnet is added in `fgb-east` for
  it; the gateways' own traffic never needs it). This load generator runs inside the client pod.
* loopback: every hop on 127.0.0.0/8 in this namespace (no root needed).

Chains (every hop its own process, single-threaded):

* direct       client -> server
* haproxy      client -> haproxy (mTLS origination) -> haproxy (TCP relay) -> haproxy (TCP relay)
               -> haproxy (mTLS termination) -> server: the C baseline a user could build instead
               (Debian package `haproxy`; installed with apt-get if missing, and said so)
* tls, quic, quic9k, passthrough
               client -> fedgate sidecar (outbound: end-to-end mTLS origination, CONNECT)
               -> fedgate gateway east (egress) ==transport==> fedgate gateway west (ingress)
               -> fedgate sidecar (inbound: mTLS termination) -> server
               (quic: 1,350-byte datagrams; quic9k: 8,952-byte datagrams, loopback allows them)

The load generator runs in this process (uvloop). For each chain it measures:

* throughput, one stream and 16 concurrent: uploads for `--seconds`, the server counts;
* 1 KiB request/response latency p50/p99 at fixed rates (100, 1,000, 5,000 req/s), open loop
  over 16 connections, measured from each request's scheduled time (no coordinated omission);
* new-connection latency: connect through the chain and complete one 1 KiB echo, sequentially;
  a burst of 200 such connections at once (connections per second); and 1,000 of them paced
  over one second, open loop (how many were served, at what rate, their p50/p99);
* CPU seconds per GB (per process, during the 16-stream run) and peak RSS per process;

then prints each figure and its ratio to direct and to the HAProxy chain. Every load loop is
bounded in count and time. Gateways and sidecars log at WARNING here (access logs off), as the
HAProxy processes have no log target. `--out X.json` writes the medians there and every round
to `X.rounds.json` (the run-to-run spread, which the medians hide).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK = 256 * 1024
REQ = 1024
RATES = (100, 1000, 5000)
LAT_CONNS = 16
NEWCONN_COUNT = 100
BURST = 200
READY_TIMEOUT = 30.0
PACED_CONNS = 1000  # new connections, paced over one second
CHAINS = ("direct", "haproxy", "tls", "quic", "quic9k", "passthrough")
# The gateway hops alone (no sidecars, no inner TLS): the client CONNECTs to the egress itself.
GATEWAY_CHAINS = ("relays", "gw-tls", "gw-quic", "gw-passthrough")


@dataclass(frozen=True)
class Layout:
    """Where each hop runs (a netns name, "" for this one) and the addresses hops use."""

    client_ns: str  # the load generator, the source sidecar, HAProxy's mTLS origination
    east_ns: str  # the east gateway, HAProxy's east relay
    west_ns: str
    server_ns: str  # the server, the destination sidecar, HAProxy's mTLS termination
    source_host: str  # in client_ns: the source sidecar's / HAProxy origination's listener
    egress_host: str  # in east_ns, reachable from client_ns (the gateway's pods side)
    east_wan: str  # in east_ns: the east gateway's tunnel address
    west_wan: str
    dest_host: str  # in server_ns, reachable from west_ns: destination sidecar inbound
    server_bind: str  # the server's listen address in server_ns
    server_direct: str  # the server as the client (direct) and the west hop (gw-*) reach it
    west_pods: str = "127.0.0.1"  # in west_ns: the west gateway's egress (unused here)
    rig: bool = False


LOOPBACK_LAYOUT = Layout(
    "", "", "", "", "127.0.0.2", "127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.3",
    "127.0.0.1", "127.0.0.1",
)  # fmt: skip
WAN_MTU = 9000
LAYOUT = LOOPBACK_LAYOUT  # the orchestrator sets it from FEDGATE_BENCH_LAYOUT in the rig
_handed_out: set[int] = set()
_next_rig_port = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP (a gateway listens on both), never one this run handed
    out already: the kernel may offer a just-released port again, and two listeners of one
    chain would then collide. In the rig the namespaces are fresh and hold only this run's
    processes, whose addresses this process cannot bind: ports are counted out instead."""
    global _next_rig_port
    if LAYOUT.rig:
        _next_rig_port += 1
        return _next_rig_port
    for _ in range(100):
        with socket.socket() as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
            try:
                u.bind((host, port))
            except OSError:
                continue
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise SystemExit("no free port found")


# --- the server: first byte "S" = sink (answers the byte count at EOF), "E" = echo ------------


class BenchServer(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.mode = b""
        self.count = 0
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.mode:
            self.mode, data = data[:1], data[1:]
        if self.mode == b"E":
            self.t.write(data)
        else:
            self.count += len(data)

    def eof_received(self) -> bool:
        if self.mode != b"E":
            self.t.write(str(self.count).encode())
        return False


async def run_server(cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BenchServer, cfg["host"], cfg["port"], backlog=1024)
    print("READY", flush=True)
    async with server:
        await asyncio.Event().wait()


# --- fedgate processes ----------------------------------------------------------------------------


def quiet_logs() -> None:
    import structlog

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def load_svid(cfg: dict[str, Any]) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from ca.authority import Svid
    from ca.bundle import TrustBundle
    from ca.verify import verify_chain

    cert = x509.load_pem_x509_certificate(cfg["cert"].encode())
    bundle = TrustBundle.from_pem({cfg["trust_domain"]: [cfg["root"]]})
    spiffe = verify_chain([cert.public_bytes(Encoding.DER)], bundle, dt.datetime.now(dt.UTC))
    return Svid(
        spiffe_id=spiffe,
        cert_pem=cfg["cert"].encode(),
        key_pem=cfg["key"].encode(),
        not_after=cert.not_valid_after_utc,
    )


async def run_gateway(cfg: dict[str, Any]) -> None:
    from dataclasses import replace

    from ca.bundle import TrustBundle
    from fedgate.processes import tune_malloc
    from gateway.gateway import Gateway, GatewaySettings
    from gateway.tunnel import TunnelSettings
    from mesh.codec import snapshot_from_json

    quiet_logs()
    tune_malloc()  # as `fedgate gateway` does
    settings = GatewaySettings(
        cluster=cfg["cluster"],
        trust_domain=cfg["trust_domain"],
        tunnel_host=cfg["tunnel_host"],
        tunnel_port=cfg["quic_port"],
        tls_port=cfg["tls_port"],
        passthrough_port=cfg["passthrough_port"],
        egress_host=cfg["egress_host"],
        egress_port=cfg["egress_port"],
        inbound_port=cfg["inbound_port"],
        max_datagram_size=cfg["datagram"],
        # "tunnel": TunnelSettings overrides (A/B runs, `bench/quic_latency.py --ab`).
        tunnel=replace(
            TunnelSettings(), max_datagram_size=cfg["datagram"], **cfg.get("tunnel", {})
        ),
    )
    gw = Gateway(settings, TrustBundle.from_pem({cfg["trust_domain"]: [cfg["root"]]}))
    gw.set_identity(load_svid(cfg))
    await gw.start()
    gw.apply(snapshot_from_json(cfg["snapshot"]))
    print("READY", flush=True)
    await asyncio.Event().wait()


async def run_sidecar(cfg: dict[str, Any]) -> None:
    from ca.bundle import TrustBundle
    from mesh.codec import snapshot_from_json
    from sidecar.settings import SidecarSettings
    from sidecar.sidecar import Sidecar

    quiet_logs()
    if cfg.get("tune_malloc"):
        from fedgate.processes import tune_malloc

        tune_malloc()
    host = cfg["host"]
    settings = SidecarSettings(
        cluster=cfg["cluster"],
        pod=cfg["pod"],
        namespace="bench",
        outbound_host=host,
        outbound_port=cfg["outbound_port"],
        inbound_host=host,
        inbound_port=cfg["inbound_port"],
        dns_host=host,
        dns_port=0,
        app_host="127.0.0.1",
        multiplex=cfg.get("multiplex", True),
    )
    dst = (cfg["vip"], cfg["server_port"])
    sc = Sidecar(
        settings,
        TrustBundle.from_pem({cfg["trust_domain"]: [cfg["root"]]}),
        original_dst_of=lambda sock: dst,  # every client connection goes to the bench service
    )
    sc.set_identity(load_svid(cfg))
    sc.apply(snapshot_from_json(cfg["snapshot"]))
    await sc.start()
    print("READY", flush=True)
    await asyncio.Event().wait()


# --- orchestration --------------------------------------------------------------------------------


@dataclass
class Chain:
    name: str
    entry: tuple[str, int]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    preamble: bytes = b""  # gateway-only chains: the CONNECT a sidecar would send

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def start(
    argv: list[str], name: str, logdir: Path, ready_line: bool = True, netns: str = ""
) -> Any:
    log = (logdir / f"{name}.log").open("wb")
    if netns:  # `ip netns exec` execs the command: the pid stays the hop's own (CPU, RSS)
        argv = ["ip", "netns", "exec", netns, *argv]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE if ready_line else log, stderr=log)
    if ready_line:
        assert p.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        line = b""
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if line.strip() == b"READY" or not line:
                break
        if line.strip() != b"READY":
            p.kill()
            raise SystemExit(f"{name} did not start; see {logdir / (name + '.log')}")
    return p


def role(name: str, cfg: dict[str, Any], workdir: Path) -> list[str]:
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return [sys.executable, __file__, "--role", cfg["role"], "--config", str(path)]


def wait_tcp(host: str, port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {host}:{port}")


class Pki:
    def __init__(self, workdir: Path) -> None:
        from ca.authority import CertificateAuthority

        now = dt.datetime.now(dt.UTC)
        self.workdir = workdir
        self.east = CertificateAuthority.create("east.fedgate.local", now)
        self.west = CertificateAuthority.create("west.fedgate.local", now)

    def svid(self, ca: Any, ns: str, sa: str, dns: tuple[str, ...] = ()) -> dict[str, str]:
        from mesh.naming import SpiffeId

        s = ca.issue(SpiffeId(ca.trust_domain, ns, sa), dt.datetime.now(dt.UTC), dns_names=dns)
        return {
            "cert": s.cert_pem.decode(),
            "key": s.key_pem.decode(),
            "root": ca.root_pem.decode(),
            "trust_domain": ca.trust_domain,
        }


def haproxy_binary() -> str:
    found = shutil.which("haproxy")
    if found:
        return found
    print("haproxy is not installed: installing the Debian package with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "haproxy"], check=True, env=env)
    found = shutil.which("haproxy")
    if not found:
        raise SystemExit("apt-get installed haproxy but it is not on PATH")
    return found


def haproxy_chain(pki: Pki, server: tuple[str, int], workdir: Path, logdir: Path) -> Chain:
    binary = haproxy_binary()
    a, b, c, d = (free_port() for _ in range(4))
    client = pki.svid(pki.east, "bench", "client")
    srv = pki.svid(pki.west, "bench", "sink")
    files = {
        "client.pem": client["cert"] + client["key"],
        "server.pem": srv["cert"] + srv["key"],
        "east-root.pem": client["root"],
        "west-root.pem": srv["root"],
    }
    for name, text in files.items():
        (workdir / name).write_text(text)
    head = (
        "global\n  nbthread 1\n  maxconn 4000\n  ssl-server-verify required\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
        "  timeout server 60s\n"
    )
    w, lay = workdir, LAYOUT
    at = {a: lay.source_host, b: lay.egress_host, c: lay.west_wan, d: lay.dest_host}
    hops = {
        "hp-orig": f"listen l\n  bind {at[a]}:{a}\n  server s {at[b]}:{b} ssl "
        f"crt {w}/client.pem ca-file {w}/west-root.pem verify required ssl-min-ver TLSv1.3\n",
        "hp-relay-east": f"listen l\n  bind {at[b]}:{b}\n  server s {at[c]}:{c}\n",
        "hp-relay-west": f"listen l\n  bind {at[c]}:{c}\n  server s {at[d]}:{d}\n",
        "hp-term": f"listen l\n  bind {at[d]}:{d} ssl crt {w}/server.pem ca-file "
        f"{w}/east-root.pem verify required ssl-min-ver TLSv1.3\n"
        f"  server s {server[0]}:{server[1]}\n",
    }
    where = {
        "hp-orig": lay.client_ns,
        "hp-relay-east": lay.east_ns,
        "hp-relay-west": lay.west_ns,
        "hp-term": lay.server_ns,
    }
    chain = Chain("haproxy", (at[a], a))
    for name, body in hops.items():
        cfg = workdir / f"{name}.cfg"
        cfg.write_text(head + body)
        argv = [binary, "-db", "-f", str(cfg)]
        chain.procs[name] = start(argv, name, logdir, False, where[name])
    for port in (a, b, c, d):
        try:
            wait_tcp(at[port], port)
        except SystemExit:
            chain.stop()
            raise SystemExit(f"haproxy did not start; see {logdir}/hp-*.log") from None
    return chain


def haproxy_relays(server: tuple[str, int], workdir: Path, logdir: Path) -> Chain:
    """Two HAProxy TCP relays: what the gateway pair is, in C."""
    binary = haproxy_binary()
    a, b = free_port(), free_port()
    head = (
        "global\n  nbthread 1\n  maxconn 4000\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
        "  timeout server 60s\n"
    )
    lay = LAYOUT
    at = {a: lay.egress_host, b: lay.west_wan}
    target = f"{lay.server_direct}:{server[1]}"
    hops = {
        "hp-relay-east": f"listen l\n  bind {at[a]}:{a}\n  server s {at[b]}:{b}\n",
        "hp-relay-west": f"listen l\n  bind {at[b]}:{b}\n  server s {target}\n",
    }
    where = {"hp-relay-east": lay.east_ns, "hp-relay-west": lay.west_ns}
    chain = Chain("relays", (at[a], a))
    for name, body in hops.items():
        cfg = workdir / f"{name}.cfg"
        cfg.write_text(head + body)
        argv = [binary, "-db", "-f", str(cfg)]
        chain.procs[name] = start(argv, name, logdir, False, where[name])
    try:
        for port in (a, b):
            wait_tcp(at[port], port)
    except SystemExit:
        chain.stop()
        raise
    return chain


def fedgate_chain(
    name: str,
    transport: str,
    datagram: int,
    pki: Pki,
    server: tuple[str, int],
    workdir: Path,
    logdir: Path,
    tune_sidecars: bool = False,
    sidecars: bool = True,
    multiplex: bool = True,
) -> Chain:
    from mesh.codec import snapshot_to_json
    from mesh.connect import ConnectRequest, encode_request
    from mesh.model import (
        ClusterInfo,
        ClusterWeight,
        Endpoint,
        GatewayAddress,
        MergedService,
        ServicePort,
        Snapshot,
        TrafficPolicy,
    )
    from mesh.naming import ServiceKey, SpiffeId, gateway_identity

    vip = "240.0.0.10"
    lay = LAYOUT
    # Without sidecars the west ingress dials the server itself (its "inbound port").
    inbound = free_port(lay.dest_host) if sidecars else server[1]
    endpoint_host = lay.dest_host if sidecars else lay.server_direct
    ports = {c: {k: free_port() for k in ("quic", "tls", "passthrough", "egress")} for c in "ew"}
    tunnel_port = {c: ports[c][transport] for c in "ew"}
    wan = {"e": lay.east_wan, "w": lay.west_wan}
    pods_side = {"e": lay.egress_host, "w": lay.west_pods}
    key = ServiceKey("bench", "sink")

    def info(c: str, ca: Any) -> ClusterInfo:
        gw = GatewayAddress(wan[c], tunnel_port[c], pods_side[c], ports[c]["egress"], transport)
        return ClusterInfo(
            "east" if c == "e" else "west", ca.trust_domain, gw, (ca.root_pem.decode(),)
        )

    snapshot = Snapshot(
        version="bench",
        clusters=(info("e", pki.east), info("w", pki.west)),
        services=(
            MergedService(
                key=key,
                vip=vip,
                ports=(ServicePort("tcp", server[1], "TCP"),),
                clusters=("west",),
                endpoints=(
                    Endpoint(
                        "west",
                        endpoint_host,
                        "sink-0",
                        SpiffeId(pki.west.trust_domain, "bench", "sink"),
                    ),
                ),
            ),
        ),
        policies=(TrafficPolicy(key, cluster_weights=(ClusterWeight("west", 100),)),),
        trust_bundle={
            pki.east.trust_domain: (pki.east.root_pem.decode(),),
            pki.west.trust_domain: (pki.west.root_pem.decode(),),
        },
    )
    snap = snapshot_to_json(snapshot)
    out_port = free_port(lay.source_host)
    if sidecars:
        chain = Chain(name, (lay.source_host, out_port))
    else:
        chain = Chain(
            name,
            (lay.egress_host, ports["e"]["egress"]),
            preamble=encode_request(ConnectRequest(key, server[1], "west")),
        )
    try:
        common = {"snapshot": snap, "inbound_port": inbound, "datagram": datagram}
        for c, ca, cluster, netns in (
            ("w", pki.west, "west", lay.west_ns),
            ("e", pki.east, "east", lay.east_ns),
        ):
            gid = gateway_identity(ca.trust_domain)
            svid = pki.svid(ca, gid.namespace, gid.service_account, (f"gateway.{ca.trust_domain}",))
            cfg = {
                "role": "gateway",
                "cluster": cluster,
                **svid,
                **common,
                "quic_port": ports[c]["quic"],
                "tls_port": ports[c]["tls"],
                "passthrough_port": ports[c]["passthrough"],
                "egress_port": ports[c]["egress"],
                "tunnel_host": wan[c],
                "egress_host": pods_side[c],
            }
            pname = f"gw-{cluster}"
            chain.procs[pname] = start(
                role(f"{name}-{pname}", cfg, workdir), f"{name}-{pname}", logdir, netns=netns
            )
        pods = (
            ()
            if not sidecars
            else (
                (
                    "sc-dst",
                    "west",
                    "sink-0",
                    lay.dest_host,
                    0,
                    pki.svid(pki.west, "bench", "sink"),
                    lay.server_ns,
                ),
                (
                    "sc-src",
                    "east",
                    "client-0",
                    lay.source_host,
                    out_port,
                    pki.svid(pki.east, "bench", "client"),
                    lay.client_ns,
                ),
            )
        )
        for pname, cluster, pod, host, outbound, svid, netns in pods:
            cfg = {
                "role": "sidecar",
                "cluster": cluster,
                "pod": pod,
                "host": host,
                "outbound_port": outbound,
                "vip": vip,
                "server_port": server[1],
                "tune_malloc": tune_sidecars,
                "multiplex": multiplex,
                **svid,
                **common,
            }
            chain.procs[pname] = start(
                role(f"{name}-{pname}", cfg, workdir), f"{name}-{pname}", logdir, netns=netns
            )
    except BaseException:
        chain.stop()
        raise
    return chain


# --- load -----------------------------------------------------------------------------------------


_preamble = b""  # set per chain by `measure`


async def open_call(entry: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*entry), 10)
    if _preamble:  # a gateway-only chain: CONNECT first, as the sidecar would
        writer.write(_preamble)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 200"):
            writer.close()
            raise ConnectionError(f"CONNECT refused: {head[:120]!r}")
    return reader, writer


async def upload(entry: tuple[str, int], seconds: float) -> tuple[int, float]:
    """Send for `seconds`, then FIN; returns (bytes the server counted, elapsed)."""
    reader, writer = await open_call(entry)
    chunk = os.urandom(CHUNK)
    started = time.perf_counter()
    writer.write(b"S")
    while time.perf_counter() - started < seconds:
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    # Slow chains (quic) hold several MB in flight per stream: allow them to drain, bounded.
    answer = await asyncio.wait_for(reader.read(), seconds + 120)
    elapsed = time.perf_counter() - started
    writer.close()
    return (int(answer) if answer.isdigit() else 0), elapsed


async def throughput(entry: tuple[str, int], streams: int, seconds: float) -> float:
    """MB/s delivered; a stream that fails counts what the server did not confirm as zero."""
    results = await asyncio.gather(
        *(upload(entry, seconds) for _ in range(streams)), return_exceptions=True
    )
    ok = [r for r in results if isinstance(r, tuple)]
    failed = len(results) - len(ok)
    if failed:
        error = next(r for r in results if not isinstance(r, tuple))
        print(f"    {failed} of {streams} uploads failed: {error!r}")
    if not ok:
        return float("nan")
    total = sum(r[0] for r in ok)
    elapsed = max(r[1] for r in ok)
    return total / elapsed / 1e6  # MB/s


class EchoClient(asyncio.Protocol):
    def __init__(self, done: list[float]) -> None:
        self.pending: collections.deque[float] = collections.deque()
        self.buf = 0
        self.done = done
        self.transport: Any = None
        self.head = b"" if _preamble else None  # the CONNECT answer, skipped

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(_preamble + b"E")

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            data, self.head = self.head[end + 4 :], None
        self.buf += len(data)
        now = time.perf_counter()
        while self.buf >= REQ and self.pending:
            self.buf -= REQ
            self.done.append(now - self.pending.popleft())


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def latency(entry: tuple[str, int], rate: int, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    done: list[float] = []
    conns: list[EchoClient] = []
    for _ in range(LAT_CONNS):
        _, proto = await asyncio.wait_for(
            loop.create_connection(lambda: EchoClient(done), *entry), 10
        )
        conns.append(proto)
    payload = os.urandom(REQ)
    # warm up each connection (the inner handshake happens on first bytes for some chains)
    for c in conns:
        c.pending.append(time.perf_counter())
        c.transport.write(payload)
    deadline = time.perf_counter() + 10
    while len(done) < LAT_CONNS and time.perf_counter() < deadline:  # noqa: ASYNC110 - bounded
        await asyncio.sleep(0.01)
    done.clear()
    total = int(rate * seconds)
    interval = 1.0 / rate
    base = loop.time() + 0.05
    start_at = time.perf_counter() + (base - loop.time())  # the same instant, finer clock

    def send(i: int) -> None:
        c = conns[i % LAT_CONNS]
        # From the scheduled time (no coordinated omission: a late send counts its delay),
        # or from now if the loop's millisecond timer fired a little early.
        c.pending.append(min(start_at + i * interval, time.perf_counter()))
        c.transport.write(payload)

    for i in range(total):
        loop.call_at(base + i * interval, send, i)
    deadline = time.perf_counter() + seconds + 10
    while len(done) < total and time.perf_counter() < deadline:  # noqa: ASYNC110 - bounded
        await asyncio.sleep(0.05)
    for c in conns:
        c.transport.abort()
    lost = total - len(done)
    return {"p50_ms": pct(done, 0.5) * 1e3, "p99_ms": pct(done, 0.99) * 1e3, "lost": lost}


async def new_connections(entry: tuple[str, int], count: int, budget: float) -> dict[str, float]:
    times: list[float] = []
    payload = os.urandom(REQ)
    stop = time.perf_counter() + budget
    for _ in range(count):
        if time.perf_counter() > stop:
            break
        t0 = time.perf_counter()
        reader, writer = await open_call(entry)
        writer.write(b"E" + payload)
        await asyncio.wait_for(reader.readexactly(REQ), 10)
        times.append(time.perf_counter() - t0)
        writer.close()
    return {"p50_ms": pct(times, 0.5) * 1e3, "p99_ms": pct(times, 0.99) * 1e3, "n": len(times)}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def measure(chain: Chain, server_pid: int, seconds: float) -> dict[str, Any]:
    global _preamble
    _preamble = chain.preamble
    entry = chain.entry
    out: dict[str, Any] = {}
    await upload(entry, 0.2)  # warm-up: pools, handshakes
    out["mbps_1"] = await throughput(entry, 1, seconds)
    pids = {n: p.pid for n, p in chain.procs.items()} | {"server": server_pid}
    before = {n: cpu_seconds(pid) for n, pid in pids.items()}
    t0 = time.perf_counter()
    mbps = await throughput(entry, 16, seconds)
    gb = mbps * (time.perf_counter() - t0) / 1e3
    out["mbps_16"] = mbps
    out["cpu_s_per_gb"] = {n: (cpu_seconds(pid) - before[n]) / gb for n, pid in pids.items()}
    out["cpu_s_per_gb_hops"] = sum(v for n, v in out["cpu_s_per_gb"].items() if n != "server")
    nan = float("nan")
    for rate in RATES:
        try:
            out[f"lat_{rate}"] = await latency(entry, rate, min(seconds, 2.0))
        except (OSError, TimeoutError) as e:
            print(f"    latency at {rate}/s failed: {e!r}")
            out[f"lat_{rate}"] = {"p50_ms": nan, "p99_ms": nan, "lost": -1}
    try:
        out["newconn"] = await new_connections(entry, NEWCONN_COUNT, 20)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
        print(f"    new connections failed: {e!r}")
        out["newconn"] = {"p50_ms": nan, "p99_ms": nan, "n": 0}
    out["burst"] = await burst(entry, BURST)
    out["paced"] = await paced_connections(entry, PACED_CONNS, 1.0)
    out["peak_rss_mb"] = {n: peak_rss_mb(pid) for n, pid in pids.items()}
    return out


async def burst(entry: tuple[str, int], count: int) -> dict[str, float]:
    """`count` new application connections at once (connect + one 1 KiB echo each)."""
    payload = os.urandom(REQ)

    async def one() -> None:
        reader, writer = await open_call(entry)
        try:
            writer.write(b"E" + payload)
            await reader.readexactly(REQ)
        finally:
            writer.close()

    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(asyncio.wait_for(one(), 30) for _ in range(count)), return_exceptions=True
    )
    elapsed = time.perf_counter() - t0
    failed = sum(1 for r in results if r is not None)
    return {"per_s": (count - failed) / elapsed, "failed": failed}


async def paced_connections(entry: tuple[str, int], count: int, over: float) -> dict[str, float]:
    """`count` new application connections started at an even pace over `over` seconds, open
    loop (a slow chain does not slow the schedule): each connects and completes one 1 KiB
    echo. Reports how many were served, the rate they were served at (the last one's end
    counts), and their times from the scheduled start."""
    loop = asyncio.get_running_loop()
    payload = os.urandom(REQ)
    times: list[float] = []

    async def one(at: float) -> None:
        await asyncio.sleep(max(0.0, at - loop.time()))
        t0 = time.perf_counter() - max(0.0, loop.time() - at)  # late start counts
        reader, writer = await open_call(entry)
        try:
            writer.write(b"E" + payload)
            await reader.readexactly(REQ)
            times.append(time.perf_counter() - t0)
        finally:
            writer.close()

    base = loop.time() + 0.05
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(asyncio.wait_for(one(base + i * over / count), 30) for i in range(count)),
        return_exceptions=True,
    )
    elapsed = time.perf_counter() - t0 - 0.05
    failed = sum(1 for r in results if r is not None)
    return {
        "served": count - failed,
        "per_s": (count - failed) / elapsed,
        "p50_ms": pct(times, 0.5) * 1e3,
        "p99_ms": pct(times, 0.99) * 1e3,
    }


def report(results: dict[str, dict[str, Any]]) -> None:
    names = list(results)
    rows: list[tuple[str, Any]] = [
        ("throughput 1 stream (MB/s)", lambda r: r["mbps_1"]),
        ("throughput 16 streams (MB/s)", lambda r: r["mbps_16"]),
    ]
    for rate in RATES:
        rows.append((f"1 KiB p50 @ {rate}/s (ms)", lambda r, k=rate: r[f"lat_{k}"]["p50_ms"]))
        rows.append((f"1 KiB p99 @ {rate}/s (ms)", lambda r, k=rate: r[f"lat_{k}"]["p99_ms"]))
    rows += [
        ("new connection p50 (ms)", lambda r: r["newconn"]["p50_ms"]),
        ("new connection p99 (ms)", lambda r: r["newconn"]["p99_ms"]),
        (f"burst of {BURST} new conns (conn/s)", lambda r: r["burst"]["per_s"]),
        (f"{PACED_CONNS} new conns in 1 s: served", lambda r: r["paced"]["served"]),
        (f"{PACED_CONNS} new conns in 1 s: conn/s", lambda r: r["paced"]["per_s"]),
        (f"{PACED_CONNS} new conns in 1 s: p50 (ms)", lambda r: r["paced"]["p50_ms"]),
        (f"{PACED_CONNS} new conns in 1 s: p99 (ms)", lambda r: r["paced"]["p99_ms"]),
        ("CPU s/GB, all hops", lambda r: r["cpu_s_per_gb_hops"]),
        (
            "peak RSS, largest hop (MiB)",
            lambda r: max((v for n, v in r["peak_rss_mb"].items() if n != "server"), default=0.0),
        ),
    ]
    width = 34
    print()
    print("".ljust(width) + "".join(n.rjust(15) for n in names))
    for label, get in rows:
        vals = [get(results[n]) for n in names]
        print(label.ljust(width) + "".join(f"{v:15.3f}" for v in vals))
        for base in ("direct", "haproxy", "relays"):
            if base in results:
                b = get(results[base])
                ratios = [(v / b) if b else float("nan") for v in vals]
                print(f"  ÷ {base}".ljust(width) + "".join(f"{x:15.2f}" for x in ratios))
    print()
    for n in names:
        r = results[n]
        lost: dict[str, Any] = {f"{rate}/s": r[f"lat_{rate}"]["lost"] for rate in RATES}
        lost["burst"] = r["burst"]["failed"]
        lost["paced"] = PACED_CONNS - r["paced"]["served"]
        print(f"{n}: per-process CPU s/GB {fmt(r['cpu_s_per_gb'])}")
        print(f"{n}: per-process peak RSS MiB {fmt(r['peak_rss_mb'])}; unanswered {lost}")


def fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items())


async def orchestrate(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    chains = [c for c in args.chains.split(",") if c]
    known = (*CHAINS, *GATEWAY_CHAINS, "gw-quic9k")
    for c in chains:
        if c not in known:
            raise SystemExit(f"unknown chain {c}; known: {', '.join(known)}")
    workdir = Path(tempfile.mkdtemp(prefix="fedgate-bench-"))
    logdir = workdir / "logs"
    logdir.mkdir()
    print(
        f"bench: {', '.join(chains)}; {args.seconds:g} s per throughput run; "
        f"{args.repeat} round(s), medians; logs in {logdir}"
    )
    lay = LAYOUT
    server_port = free_port()
    server_cfg = {"role": "server", "host": lay.server_bind, "port": server_port}
    server = start(role("server", server_cfg, workdir), "server", logdir, netns=lay.server_ns)
    pki = Pki(workdir)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in chains}
    try:
        for name in [n for _ in range(args.repeat) for n in chains]:  # interleaved rounds
            srv = ("127.0.0.1", server_port)
            try:
                if name == "direct":
                    chain = Chain("direct", (lay.server_direct, server_port))
                elif name == "haproxy":
                    chain = haproxy_chain(pki, srv, workdir, logdir)
                elif name == "relays":
                    chain = haproxy_relays(srv, workdir, logdir)
                else:
                    bare = name.removeprefix("gw-")
                    transport = "quic" if bare.startswith("quic") else bare
                    datagram = 8952 if bare == "quic9k" else 1350
                    chain = fedgate_chain(
                        name,
                        transport,
                        datagram,
                        pki,
                        srv,
                        workdir,
                        logdir,
                        args.tune_sidecars,
                        sidecars=not name.startswith("gw-"),
                        multiplex=args.sidecar_multiplex == "on",
                    )
            except SystemExit as e:  # one chain that cannot start does not end the bench
                print(f"  {name}: skipped this round: {e}", flush=True)
                continue
            try:
                print(f"  {name} ...", flush=True)
                runs[name].append(await measure(chain, server.pid, args.seconds))
            finally:
                chain.stop()
    finally:
        server.terminate()
        server.wait(5)
    if args.out:  # every round, for the run-to-run spread the medians hide
        rounds = Path(args.out).with_suffix(".rounds.json")
        rounds.write_text(json.dumps(runs, indent=2))
        print(f"rounds written to {rounds}")
    return {name: median_of(r) for name, r in runs.items() if r}


def median_of(runs: list[Any]) -> Any:
    """The median of each figure over repeated runs (the machine may be shared and noisy)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in runs]) for k in first}
    return sorted(runs)[len(runs) // 2]


def in_rig(prefix: str) -> int:
    """Build the bench's rig, run this command again inside its client pod, tear it down."""
    from dataclasses import asdict

    from clusters.rig import netns, topology
    from clusters.rig.cmd import run, run_in

    east, west = topology.cluster(prefix, 0), topology.cluster(prefix, 1)
    client, server = topology.pod(prefix, 0, 0, "client"), topology.pod(prefix, 1, 0, "server")
    netns.delete_all(prefix)  # a previous run that was killed; only this prefix's namespaces
    try:
        wan = netns.create_wan(prefix)
        for c in (east, west):
            netns.create_cluster(prefix, c.index)
            # Jumbo frames on the WAN (quic9k's 8,952-byte datagrams): both ends and the bridge.
            run(["ip", "-n", c.netns, "link", "set", topology.WAN_INTERFACE, "mtu", str(WAN_MTU)])
            run(["ip", "-n", wan, "link", "set", c.wan_peer, "mtu", str(WAN_MTU)])
        run(["ip", "-n", wan, "link", "set", topology.WAN_BRIDGE, "mtu", str(WAN_MTU)])
        netns.create_pod(prefix, 0, 0, "client")
        netns.create_pod(prefix, 1, 0, "server")
        # `direct` only: the client pod reaches the server pod over the same veths, no proxy.
        run(["ip", "-n", east.netns, "route", "add", west.pod_subnet, "via", west.wan_ip])
        run_in(west.netns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        layout = Layout(
            client_ns=client.netns,
            east_ns=east.netns,
            west_ns=west.netns,
            server_ns=server.netns,
            source_host=client.ip,
            egress_host=east.pod_gateway,
            east_wan=east.wan_ip,
            west_wan=west.wan_ip,
            dest_host=server.ip,
            server_bind="0.0.0.0",  # inside the server pod's own namespace
            server_direct=server.ip,
            west_pods=west.pod_gateway,
            rig=True,
        )
        print(
            f"rig: {client.netns} ({client.ip}) -> {east.netns} ({east.wan_ip}) == WAN, MTU "
            f"{WAN_MTU} ==> {west.netns} ({west.wan_ip}) -> {server.netns} ({server.ip})",
            flush=True,
        )
        env = {**os.environ, "FEDGATE_BENCH_LAYOUT": json.dumps(asdict(layout))}
        argv = ["ip", "netns", "exec", client.netns, sys.executable, __file__, *sys.argv[1:]]
        return subprocess.run(argv, env=env, check=False).returncode
    finally:
        removed = netns.delete_all(prefix)
        print(f"rig removed: {', '.join(removed)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--chains", default=",".join(CHAINS))
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=1, help="rounds; each figure is the median")
    p.add_argument(
        "--tune-sidecars",
        action="store_true",
        help="apply the gateways' malloc tuning to the sidecars too (fedgate.processes)",
    )
    p.add_argument(
        "--sidecar-multiplex",
        choices=("on", "off"),
        default="on",
        help="sidecars carry calls as streams of pooled connections (docs/sidecar.md)",
    )
    p.add_argument("--out", default="")
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--where",
        choices=("rig", "loopback"),
        default="rig" if os.geteuid() == 0 else "loopback",
        help="the rig's network namespaces (needs root; the default as root) or loopback",
    )
    p.add_argument("--rig-prefix", default="fgb", help="netns prefix of the bench's rig")
    args = p.parse_args()
    import resource

    import uvloop

    # A thousand connections at once, in the load generator and in every hop it starts.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    if args.role == "main" and args.where == "rig" and "FEDGATE_BENCH_LAYOUT" not in os.environ:
        if "haproxy" in args.chains or "relays" in args.chains:
            haproxy_binary()  # apt-get works from here, not from inside the rig
        sys.exit(in_rig(args.rig_prefix))
    if "FEDGATE_BENCH_LAYOUT" in os.environ:
        global LAYOUT
        LAYOUT = Layout(**json.loads(os.environ["FEDGATE_BENCH_LAYOUT"]))
    if args.role == "main":
        print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
        results = uvloop.run(orchestrate(args))
        report(results)
        print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
            print(f"results written to {args.out}")
        return
    cfg = json.loads(Path(args.config).read_text())
    runner = {"server": run_server, "gateway": run_gateway, "sidecar": run_sidecar}[args.role]
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(runner(cfg))


if __name__ == "__main__":
    main()
