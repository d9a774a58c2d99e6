"""What one QUIC packet costs in Python, warm and after a pause (a benchmark: prints, never
asserts).

    .venv/bin/python bench/quic_cold.py [--exchanges 300] [--pauses 0,0.0001,0.001,0.01]

Two tunnel QUIC connections (`TunnelQuicConnection`: mTLS, aioquic's ACK timing, as the
gateways run by default) back to back in this one process, no sockets: east writes 1 KiB on a
stream and builds the packet, west receives it, answers 1 KiB and builds its packet, east
receives that. Before each exchange
the process sleeps for the pause (as a gateway does between calls at a low rate) or, with
`--spin`, busy-waits for it. Prints the median CPU time of each step per pause: the difference
between the pause-0 column and the others is what running cold costs (caches and branch
predictors refilled after other processes ran), which is per process and so paid again by
each gateway of a chain; in one process the second side finds the code warm.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ca.authority import CertificateAuthority
from ca.bundle import TrustBundle
from ca.service import dns_names_for
from gateway.quic_flow import TunnelQuicConnection
from gateway.quic_mtls import PeerPolicy
from gateway.tunnel import ALPN
from mesh.naming import gateway_identity

EAST = ("10.0.0.1", 40000)
WEST = ("10.0.0.2", 15443)
STEPS = ("east: write + build", "west: receive", "west: write + build", "east: receive")


def pair() -> tuple[TunnelQuicConnection, TunnelQuicConnection]:
    now = dt.datetime.now(dt.UTC)
    cas = {c: CertificateAuthority.create(f"{c}.fedgate.local", now) for c in ("east", "west")}
    bundle = TrustBundle.from_pem({ca.trust_domain: [ca.root_pem] for ca in cas.values()})
    policy = PeerPolicy(bundle=lambda: bundle, authorize=lambda _: None)

    def config(cluster: str) -> QuicConfiguration:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca = cas[cluster]
        ident = gateway_identity(ca.trust_domain)
        svid = ca.issue(ident, now, dns_names=dns_names_for(ident))
        cfg = QuicConfiguration(is_client=cluster == "east", alpn_protocols=[ALPN])
        certs = x509.load_pem_x509_certificates(svid.cert_pem)
        cfg.certificate, cfg.certificate_chain = certs[0], certs[1:]
        cfg.private_key = serialization.load_pem_private_key(svid.key_pem, None)  # type: ignore[assignment]
        if cluster == "east":
            cfg.server_name = dns_names_for(gateway_identity(cas["west"].trust_domain))[0]
            cfg.cadata = cas["west"].root_pem
        return cfg

    east = TunnelQuicConnection(configuration=config("east"), peer_policy=policy)
    west = TunnelQuicConnection(
        configuration=config("west"),
        peer_policy=policy,
        original_destination_connection_id=east.original_destination_connection_id,
    )
    east.connect(WEST, now=time.monotonic())
    for _ in range(10):
        for src, dst, addr in ((east, west, EAST), (west, east, WEST)):
            for data, _ in src.datagrams_to_send(now=time.monotonic()):
                dst.receive_datagram(data, addr, now=time.monotonic())
        for conn in (east, west):
            while conn.next_event() is not None:
                pass
    return east, west


def measure(pause: float, spin: bool, exchanges: int) -> dict[str, float]:
    east, west = pair()
    stream = east.get_next_available_stream_id()
    payload = b"x" * 1024
    cpu: dict[str, list[int]] = {s: [] for s in STEPS}

    def step(name: str, t0: int) -> None:
        cpu[name].append(time.thread_time_ns() - t0)

    for _ in range(exchanges):
        if spin:
            until = time.perf_counter() + pause
            while time.perf_counter() < until:
                pass
        elif pause:
            time.sleep(pause)
        t = time.thread_time_ns()
        east.send_stream_data(stream, payload)
        out = east.datagrams_to_send(now=time.monotonic())
        step(STEPS[0], t)
        t = time.thread_time_ns()
        for data, _ in out:
            west.receive_datagram(data, EAST, now=time.monotonic())
        while west.next_event() is not None:
            pass
        step(STEPS[1], t)
        t = time.thread_time_ns()
        west.send_stream_data(stream, payload)
        back = west.datagrams_to_send(now=time.monotonic())
        step(STEPS[2], t)
        t = time.thread_time_ns()
        for data, _ in back:
            east.receive_datagram(data, WEST, now=time.monotonic())
        while east.next_event() is not None:
            pass
        step(STEPS[3], t)
    return {s: statistics.median(v) / 1e3 for s, v in cpu.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--exchanges", type=int, default=300)
    p.add_argument("--pauses", default="0,0.0001,0.001,0.01")
    p.add_argument("--spin", action="store_true", help="busy-wait the pause instead of sleeping")
    args = p.parse_args()
    pauses = [float(x) for x in args.pauses.split(",")]
    how = "busy-waiting" if args.spin else "sleeping"
    print(f"CPU µs per step (median of {args.exchanges}), {how} before each exchange")
    print(f"  {'step':<22}" + "".join(f"{f'pause {x * 1e3:g} ms':>16}" for x in pauses))
    results = [measure(x, args.spin, args.exchanges) for x in pauses]
    for s in (*STEPS, "exchange"):
        cells = [sum(r.values()) if s == "exchange" else r[s] for r in results]
        print(f"  {s:<22}" + "".join(f"{c:>16.1f}" for c in cells))
    with open("/proc/loadavg") as f:
        print(f"load average: {f.read().strip()}")


if __name__ == "__main__":
    main()
