"""Throughput of one call through the QUIC tunnel on loopback (a benchmark, not a test).

client --TCP CONNECT--> east egress ==QUIC (mTLS)==> west ingress --TCP--> sink (discards)

Prints MB/s for the upload (client -> sink) of `--mb` megabytes, per datagram size, and the
CPU seconds per GB each side spent (east: client + gateway; west: gateway + sink), which a busy
machine disturbs less than the throughput.

    .venv/bin/python bench/quic_tunnel.py [--mb 64] [--sizes 1350,8192] [--uvloop]
                                          [--one-process] [--no-offload] [--ack-policy]
                                          [--cc cubic|reno]

`--no-offload` turns GSO send and GRO receive off (`TunnelSettings.udp_offload`);
`--ack-policy` replaces aioquic's ACK timing (`TunnelSettings.lone_ack_delay`, `gateway.quic_ack`).
`--cc` picks the congestion controller (`TunnelSettings.congestion_control`, default cubic).

By default west (gateway + sink) runs in a child process, as gateways of two clusters would;
`--one-process` puts everything on one event loop (roughly halves the figure).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ca.authority import CertificateAuthority
from ca.bundle import TrustBundle
from ca.service import dns_names_for
from gateway.gateway import Gateway, GatewaySettings
from gateway.quic_ack import LONE_ACK_DELAY
from gateway.tunnel import TunnelSettings
from mesh.codec import decode, dumps, snapshot_from_json, snapshot_to_json
from mesh.connect import ConnectRequest, encode_request, parse_response
from mesh.model import (
    ClusterInfo,
    Endpoint,
    GatewayAddress,
    MergedService,
    ServicePort,
    Snapshot,
)
from mesh.naming import ServiceKey, SpiffeId, gateway_identity

SINK = ServiceKey("bench", "sink")


class Sink(asyncio.Protocol):
    """Counts what arrives; at the caller's FIN answers the count and closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(str(self.count).encode())
        return False


OFFLOAD = True
ACK_POLICY = False
CC = "cubic"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make(cluster: str, ca: CertificateAuthority, inbound: int, size: int) -> Gateway:
    settings = GatewaySettings(
        tunnel=TunnelSettings(
            udp_offload=OFFLOAD,
            lone_ack_delay=LONE_ACK_DELAY if ACK_POLICY else None,
            congestion_control=CC,
        ),
        cluster=cluster,
        trust_domain=ca.trust_domain,
        tunnel_host="127.0.0.1",
        tunnel_port=0,
        egress_host="127.0.0.1",
        egress_port=0,
        inbound_port=inbound,
        max_datagram_size=size,
    )
    gw = Gateway(settings, TrustBundle.from_pem({ca.trust_domain: [ca.root_pem]}))
    ident = gateway_identity(ca.trust_domain)
    gw.set_identity(ca.issue(ident, dt.datetime.now(dt.UTC), dns_names=dns_names_for(ident)))
    return gw


def snapshot(east: Gateway, west: Gateway, cas: dict[str, CertificateAuthority]) -> Snapshot:
    clusters = []
    for gw in (east, west):
        name = gw.settings.cluster
        th, tp = gw.tunnel_address
        eh, ep = gw.egress_address
        clusters.append(
            ClusterInfo(name, cas[name].trust_domain, GatewayAddress(th, tp, eh, ep), ())
        )
    sink = Endpoint("west", "127.0.0.1", "sink-0", SpiffeId(cas["west"].trust_domain, "b", "s"))
    return Snapshot(
        version="bench",
        clusters=tuple(clusters),
        services=(
            MergedService(SINK, "240.0.0.1", (ServicePort("tcp", 9000),), ("west",), (sink,)),
        ),
        trust_bundle={ca.trust_domain: (ca.root_pem.decode(),) for ca in cas.values()},
    )


async def start_west(ca: CertificateAuthority, size: int) -> tuple[Gateway, asyncio.Server]:
    sink = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", 0)
    west = make("west", ca, sink.sockets[0].getsockname()[1], size)
    await west.start()
    return west, sink


async def west_process(ca_dir: str, size: int) -> None:
    """Child: west gateway + sink. Prints its addresses, reads the snapshot, runs until EOF."""
    west, sink = await start_west(CertificateAuthority.load(Path(ca_dir) / "west"), size)
    print(json.dumps({"tunnel": west.tunnel_address, "egress": west.egress_address}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    west.apply(decode(await reader.readline(), snapshot_from_json, "snapshot"))
    print("ready", flush=True)
    cpu = _cpu()
    await reader.readline()  # the upload is done
    print(json.dumps({"cpu": _cpu() - cpu}), flush=True)
    await reader.read()  # parent closes stdin when done
    await west.aclose()
    sink.close()


class _Addr:
    """Stands in for a Gateway in `snapshot()` when west runs in another process."""

    def __init__(self, cluster: str, tunnel: list[Any], egress: list[Any]) -> None:
        self.settings = GatewaySettings(cluster=cluster, trust_domain="")
        self.tunnel_address = tuple(tunnel)
        self.egress_address = tuple(egress)


async def upload(east: Gateway, total: int) -> tuple[float, float]:
    """(MB/s, CPU seconds this process spent)."""
    reader, writer = await asyncio.open_connection(*east.egress_address)
    writer.write(encode_request(ConnectRequest(SINK, 9000, "west")))
    status, reason = parse_response(await reader.readuntil(b"\r\n\r\n"))
    assert status == 200, reason
    chunk = os.urandom(256 * 1024)
    cpu = _cpu()
    started = time.perf_counter()
    sent = 0
    while sent < total:
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
    writer.write_eof()
    got = int(await asyncio.wait_for(reader.read(), 600))
    elapsed = time.perf_counter() - started
    assert got == sent, (got, sent)
    writer.close()
    return sent / elapsed / 1e6, _cpu() - cpu


async def run(total: int, size: int, split: bool, loop_flag: list[str]) -> tuple[float, ...]:
    """(MB/s, east CPU s, west CPU s; both the same process with --one-process)."""
    now = dt.datetime.now(dt.UTC)
    cas = {c: CertificateAuthority.create(f"{c}.fedgate.local", now) for c in ("east", "west")}
    east = make("east", cas["east"], 1, size)
    await east.start()
    if not split:
        west, sink = await start_west(cas["west"], size)
        try:
            snap = snapshot(east, west, cas)
            east.apply(snap)
            west.apply(snap)
            mbps, cpu = await upload(east, total)
            return mbps, cpu, 0.0
        finally:
            await east.aclose()
            await west.aclose()
            sink.close()
    with tempfile.TemporaryDirectory() as tmp:
        cas["west"].save(Path(tmp) / "west")
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--west",
            tmp,
            "--sizes",
            str(size),
            *loop_flag,
            *([] if OFFLOAD else ["--no-offload"]),
            *(["--ack-policy"] if ACK_POLICY else []),
            "--cc",
            CC,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            addrs = json.loads(await child.stdout.readline())
            west_addr = _Addr("west", addrs["tunnel"], addrs["egress"])
            snap = snapshot(east, west_addr, cas)  # type: ignore[arg-type]
            east.apply(snap)
            child.stdin.write(dumps(snapshot_to_json(snap)) + b"\n")
            await child.stdin.drain()
            assert (await child.stdout.readline()).strip() == b"ready"
            mbps, cpu = await upload(east, total)
            child.stdin.write(b"done\n")
            await child.stdin.drain()
            west_cpu = json.loads(await child.stdout.readline())["cpu"]
            return mbps, cpu, west_cpu
        finally:
            await east.aclose()
            child.stdin.close()
            await child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--sizes", default="1350,1452,8192,16384")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--one-process", action="store_true", help="east and west share a loop")
    parser.add_argument("--no-offload", action="store_true", help="no GSO/GRO")
    parser.add_argument("--ack-policy", action="store_true", help="gateway.quic_ack's timing")
    parser.add_argument(
        "--cc", default="cubic", choices=("cubic", "reno"), help="congestion control"
    )
    parser.add_argument("--west", help=argparse.SUPPRESS)  # child mode: CA directory
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    global OFFLOAD, ACK_POLICY, CC
    OFFLOAD = not args.no_offload
    ACK_POLICY = args.ack_policy
    CC = args.cc
    if args.uvloop:
        import uvloop

        uvloop.install()
    if args.west:
        asyncio.run(west_process(args.west, int(args.sizes)))
        return
    split = not args.one_process
    where = "east and west in separate processes" if split else "east and west in one loop"
    loop_name = "uvloop" if args.uvloop else "asyncio"
    offload = "GSO/GRO on" if OFFLOAD else "GSO/GRO off"
    offload += ", gateway.quic_ack timing" if ACK_POLICY else ", aioquic's ACK timing"
    offload += f", {CC}"
    print(f"one stream, {args.mb} MB upload through the tunnel, {loop_name}, {where}, {offload}")
    flags = ["--uvloop"] if args.uvloop else []
    for size in (int(x) for x in args.sizes.split(",")):
        total = args.mb * 1024 * 1024
        mbps, east_cpu, west_cpu = asyncio.run(run(total, size, split, flags))
        gb = total / 1e9
        print(
            f"  max_datagram_size={size:>6}: {mbps:7.1f} MB/s, CPU s/GB east {east_cpu / gb:5.1f}"
            f", west {west_cpu / gb:5.1f}"
        )


if __name__ == "__main__":
    main()
