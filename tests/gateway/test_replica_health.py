"""A hung gateway replica (SIGSTOP: a wedged loop, a black-holed path) is detected by the peer
gateway's health probes within seconds; only its streams are reset, and new calls go to the
live replica (`tls`), or are refused at once with `Fedgate-Peer-Health: unreachable` while the
peer has no healthy connection (`quic`: one connection per peer, closed and re-dialled).

West's replicas are real processes (`replica_helper.py`) on loopback; east (the caller's
gateway), the echo server standing in for the destination sidecar, and the CONNECT clients run
in the test. Default health settings: a probe a second, 3 misses mark a connection unhealthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from structlog.testing import LogCapture

from ca.authority import CertificateAuthority
from fedgate import metrics, rates
from gateway.gateway import Gateway
from mesh.codec import dumps, snapshot_to_json
from mesh.connect import ConnectRequest, encode_request, parse_response, response_peer_unreachable
from mesh.model import ClusterInfo, Endpoint, GatewayAddress, MergedService, ServicePort, Snapshot
from mesh.naming import SpiffeId
from tests.gateway.conftest import (
    EAST_TD,
    ECHO,
    ECHO_PORT,
    LOOPBACK,
    WEST_TD,
    close_writer,
    connect_via,
    gateway_svid,
    make_gateway,
)
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("replica_helper.py")
WEST_QUIC = {"source_cluster": "east", "destination_cluster": "west", "transport": "quic"}
DETECT_BOUND = 5.0  # seconds from SIGSTOP until every new call succeeds (or is refused at once)


class Replica:
    """One west gateway replica process; `status` over its stdin."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log
        self.stopped = False

    @classmethod
    async def start(cls, config: Path, log: Path) -> Replica:
        with log.open("w") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(HELPER),
                str(config),
                cwd=REPO,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        replica = cls(proc, log)
        line = await replica._line(20)
        assert line == "ready", f"replica did not start: {tail(log)}"
        return replica

    async def _line(self, limit: float) -> str:
        assert self.proc.stdout is not None
        return (await asyncio.wait_for(self.proc.stdout.readline(), limit)).decode().strip()

    async def status(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"status\n")
        return dict(json.loads(await self._line(10)))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.stopped = sig == signal.SIGSTOP

    async def close(self) -> None:
        if self.stopped:
            self.signal(signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 10)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def scrape(gw: Gateway) -> rates.Scrape:
    """The gateway's tunnel metrics as Prometheus would read them."""
    registry = CollectorRegistry()
    metrics.register(lambda: metrics.tunnel_families("east", gw.link_stats()), registry)
    return rates.parse(metrics.exposition(registry), 0.0)


def tail(log: Path) -> str:
    return log.read_text()[-2000:]


def snapshot(east: Gateway, transport: str, west_port: int, ca_roots: dict[str, str]) -> Snapshot:
    e_host, e_port = east.egress_address
    t_host, t_port = east.listen_address(transport)
    return Snapshot(
        version="v1",
        clusters=(
            ClusterInfo(
                name="east",
                trust_domain=EAST_TD,
                gateway=GatewayAddress(t_host, t_port, e_host, e_port, transport),
                roots=(ca_roots[EAST_TD],),
            ),
            ClusterInfo(
                name="west",
                trust_domain=WEST_TD,
                gateway=GatewayAddress(LOOPBACK, west_port, LOOPBACK, 1, transport),
                roots=(ca_roots[WEST_TD],),
            ),
        ),
        services=(
            MergedService(
                key=ECHO,
                vip="240.0.0.10",
                ports=(ServicePort("tcp", ECHO_PORT),),
                clusters=("west",),
                endpoints=(
                    Endpoint("west", LOOPBACK, "echo-west", SpiffeId(WEST_TD, "demo", "echo")),
                ),
            ),
        ),
        trust_bundle={td: (pem,) for td, pem in ca_roots.items()},
    )


@dataclass
class Rig:
    east: Gateway
    replicas: list[Replica] = field(default_factory=list)


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    echo_port: int,
    transport: str,
    replicas: int,
    connections_per_peer: int = 2,
) -> AsyncIterator[Rig]:
    east = make_gateway(
        "east", east_ca, echo_port, tls={"connections_per_peer": connections_per_peer}
    )
    await east.start()
    roots = {EAST_TD: east_ca.root_pem.decode(), WEST_TD: west_ca.root_pem.decode()}
    port = free_port(socket.SOCK_STREAM if transport == "tls" else socket.SOCK_DGRAM)
    snap = snapshot(east, transport, port, roots)
    east.apply(snap)
    svid = gateway_svid(west_ca)
    config = tmp_path / "west.json"
    config.write_text(
        json.dumps(
            {
                "cluster": "west",
                "trust_domain": WEST_TD,
                "cert": svid.cert_pem.decode(),
                "key": svid.key_pem.decode(),
                "anchor": roots[WEST_TD],
                "snapshot": dumps(snapshot_to_json(snap)).decode(),
                "tls_port": port if transport == "tls" else None,
                "quic_port": port if transport == "quic" else None,
                "inbound_port": echo_port,
            }
        )
    )
    r = Rig(east)
    try:
        for i in range(replicas):
            r.replicas.append(await Replica.start(config, tmp_path / f"west-{i}.log"))
        yield r
    finally:
        await east.aclose()
        for replica in r.replicas:
            await replica.close()


@dataclass
class Call:
    started: float  # seconds after the SIGSTOP
    ok: bool
    took: float
    status: int
    unreachable: bool = False


async def one_call(east: Gateway, t0: float) -> Call:
    """CONNECT, one echo; every step bounded."""
    started = time.monotonic()
    host, port = east.egress_address
    status, unreachable, ok = 0, False, False
    writer = None
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(encode_request(ConnectRequest(ECHO, ECHO_PORT, "west")))
            head = await reader.readuntil(b"\r\n\r\n")
            status, _ = parse_response(head)
            unreachable = response_peer_unreachable(head)
            if status == 200:
                writer.write(b"ping")
                ok = await reader.readexactly(4) == b"ping"
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        ok = False
    finally:
        if writer is not None:
            await close_writer(writer)
    return Call(started - t0, ok, time.monotonic() - started, status, unreachable)


async def calls_every(east: Gateway, t0: float, period: float, until: float) -> list[Call]:
    """A new call every `period` seconds until `until` seconds after t0 (bounded count)."""
    tasks: list[asyncio.Task[Call]] = []
    for _ in range(int(until / period) + 1):
        if time.monotonic() - t0 >= until:
            break
        tasks.append(asyncio.create_task(one_call(east, t0)))
        await asyncio.sleep(period)  # pacing of the load, not synchronisation
    return list(await asyncio.gather(*tasks))


async def open_calls(east: Gateway, n: int) -> list[tuple[asyncio.StreamReader, Any]]:
    calls = []
    for _ in range(n):
        status, reason, reader, writer = await connect_via(east)
        assert status == 200, reason
        writer.write(b"up")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"up"
        calls.append((reader, writer))
    return calls


async def still_echoes(reader: asyncio.StreamReader, writer: Any) -> bool:
    try:
        writer.write(b"again")
        return await asyncio.wait_for(reader.readexactly(5), 5) == b"again"
    except (ConnectionError, asyncio.IncompleteReadError):
        return False


async def test_a_hung_tls_replica_is_avoided_within_seconds(
    logs: LogCapture,
    tmp_path: Path,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    echo_port: int,
) -> None:
    async with rig(tmp_path, east_ca, west_ca, echo_port, "tls", 2, 12) as r:
        calls = await open_calls(r.east, 24)
        statuses = [await replica.status() for replica in r.replicas]
        carried = [s["ingress_active"] for s in statuses]
        assert sum(carried) == 24
        # The kernel spreads the pool's 12 connections over both replicas (by 4-tuple hash):
        # all on one would be a 1-in-2048 draw.
        assert min(carried) > 0, (carried, statuses)
        hung, _ = r.replicas
        pool = r.east.pools["tls"]
        losses = pool.counters["losses"]
        t0 = time.monotonic()
        hung.signal(signal.SIGSTOP)

        async def detected() -> float:
            """When east has closed every connection the hung replica had accepted."""
            while pool.counters["losses"] < losses + statuses[0]["inbound"]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # polled, bounded by the wait_for below
            return time.monotonic() - t0

        watch = asyncio.create_task(asyncio.wait_for(detected(), 10))
        load = await calls_every(r.east, t0, 0.1, 8.0)
        closed_after = await watch
        failed = [c for c in load if not c.ok]
        reset_by = max((c.started + c.took for c in failed), default=0.0)
        print(
            f"\ntls: SIGSTOP of 1 of 2 replicas: its {statuses[0]['inbound']} connections closed"
            f" as unhealthy {closed_after:.2f} s after; {len(failed)} of {len(load)} new calls"
            f" (one every 100 ms) failed, all reset by {reset_by:.2f} s"
        )
        assert closed_after <= DETECT_BOUND
        # A call placed on a hung connection before it was found out is reset with it; every
        # call after succeeded through the live replica.
        assert all(c.started + c.took <= DETECT_BOUND + 0.5 for c in failed)
        assert all(c.ok for c in load if c.started > closed_after)
        assert sum(c.ok for c in load if c.started > DETECT_BOUND) >= 20
        # The calls the hung replica carried were reset; the others are unaffected.
        outcomes = [await still_echoes(reader, writer) for reader, writer in calls]
        assert outcomes.count(False) == carried[0]
        assert outcomes.count(True) == carried[1]
        (link,) = [s for s in r.east.link_stats() if s.peer == "west"]
        assert link.health == "healthy"
        unhealthy = [e for e in logs.entries if e["event"] == "tunnel connection unhealthy"]
        assert len(unhealthy) >= statuses[0]["inbound"]
        hung.signal(signal.SIGCONT)
        for _, writer in calls:
            await close_writer(writer)


async def test_a_hung_quic_peer_is_refused_at_once_then_recovers(
    logs: LogCapture,
    tmp_path: Path,
    east_ca: CertificateAuthority,
    west_ca: CertificateAuthority,
    echo_port: int,
) -> None:
    async with rig(tmp_path, east_ca, west_ca, echo_port, "quic", 1) as r:
        calls = await open_calls(r.east, 2)
        (west,) = r.replicas
        t0 = time.monotonic()
        west.signal(signal.SIGSTOP)
        load = await calls_every(r.east, t0, 0.1, 7.0)
        refused = [c for c in load if c.unreachable]
        assert refused, "the peer was never found unreachable"
        detected = min(c.started + c.took for c in refused)
        # Once found unreachable, calls are refused at once, not after a dial's timeout.
        later = [c for c in load if c.started > detected]
        assert later
        print(
            f"\nquic: SIGSTOP of the peer: refused as unreachable {detected:.2f} s after;"
            f" {len(later)} calls after that refused in at most"
            f" {max(c.took for c in later) * 1000:.1f} ms each"
        )
        assert detected <= DETECT_BOUND
        assert all(c.unreachable and c.status == 503 for c in later)
        assert max(c.took for c in later) < 0.5
        # What the operator sees: /config and the metrics say so.
        peer = r.east.status()["outbound"]["quic"]["peers"]["west"]
        assert peer["health"] == "unreachable"
        # why: its connection failed its probes, then (while hung) the re-dials timed out
        assert peer["down"].startswith(("unhealthy: 3 probes unanswered", "dial failed"))
        exported = scrape(r.east)
        assert exported.value("fedgate_tunnel_peer_healthy", **WEST_QUIC) == 0
        assert exported.value("fedgate_tunnel_healthy_connections", **WEST_QUIC) == 0
        # The streams of the hung connection were reset.
        assert [await still_echoes(reader, writer) for reader, writer in calls] == [False] * 2
        t1 = time.monotonic()
        west.signal(signal.SIGCONT)
        deadline = t1 + 15
        while True:  # polled with a deadline: re-dial (bounded backoff), then probation
            call = await one_call(r.east, t1)
            if call.ok or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert call.ok, "the peer never came back"
        print(f"quic: back {call.started:.2f} s after SIGCONT")
        (link,) = [s for s in r.east.link_stats() if s.peer == "west"]
        assert link.health == "healthy"
        assert link.healthy_connections == 1
        peer = r.east.status()["outbound"]["quic"]["peers"]["west"]
        assert peer["health"] == "healthy"
        assert peer["healthy_connections"] == 1
        assert peer["rtt_ms"] is not None
        assert peer["loss_ratio"] == 0.0  # the new connection lost none
        exported = scrape(r.east)
        assert exported.value("fedgate_tunnel_peer_healthy", **WEST_QUIC) == 1
        assert exported.value("fedgate_tunnel_probe_loss_ratio", **WEST_QUIC) == 0.0
        for _, writer in calls:
            await close_writer(writer)


async def test_a_refusing_peer_is_refused_at_once_and_redialled_with_backoff(
    logs: LogCapture, east_ca: CertificateAuthority, west_ca: CertificateAuthority, echo_port: int
) -> None:
    """West's address answers every dial with a reset (nothing listens): the first call waits
    for its dial; the next are refused at once, and calls do not drive the dial rate."""
    east = make_gateway("east", east_ca, echo_port)
    await east.start()
    roots = {EAST_TD: east_ca.root_pem.decode(), WEST_TD: west_ca.root_pem.decode()}
    east.apply(snapshot(east, "tls", free_port(socket.SOCK_STREAM), roots))
    pool = east.pools["tls"]
    try:
        first = await one_call(east, time.monotonic())
        assert first.status == 502
        assert first.unreachable
        t0 = time.monotonic()
        calls = []
        for _ in range(40):  # 20 calls/s for 2 s
            calls.append(await one_call(east, t0))
            await asyncio.sleep(0.05)  # pacing of the load, not synchronisation
        assert all(c.status == 503 and c.unreachable for c in calls)
        elapsed = time.monotonic() - t0
        dials = pool.counters["connect_failures"]
        print(
            f"\nrefusing peer: 40 calls in {elapsed:.2f} s, each refused in at most"
            f" {max(c.took for c in calls) * 1000:.1f} ms; {dials} dials"
        )
        assert max(c.took for c in calls) < 0.5
        # 2 slots, each re-dialled after 0.5, 1, 2 ... s in the background, whatever the call
        # rate: 2 + 2 x 2 dials within ~2.5 s (the calls alone would have made 40).
        assert 3 <= dials <= 8
        (link,) = east.link_stats()
        assert link.health == "unreachable"
        assert east.status()["outbound"]["tls"]["peers"]["west"]["health"] == "unreachable"
    finally:
        await east.aclose()
