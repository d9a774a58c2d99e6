"""The two write-batching policies the mux-over-TLS drivers had, side by side (a benchmark:
prints, never asserts). Issue 14 kept one, `mesh.muxconn.encrypt` (the gateway's), for both
the gateway `tls` transport and the sidecars' smux; this measures it against the sidecars'
former one (`smux_before`, below, as it was in `sidecar/smux.py`).

    .venv/bin/python -m bench.mux_batching [--mib 256] [--streams 16] [--write 65536] [--rounds 5]

Both encrypt the same `mesh.mux` output (each of `--streams` streams sending `--write`-byte
payloads, flushed every `--streams` writes, as 16 busy relays do) with a real TLS 1.3
`ssl.SSLObject` on memory BIOs, and the peer decrypts it as the gateway's receive side does
(into one buffer; OpenSSL returns one record per SSL_read, so the number of records counts).
Per policy: CPU seconds per GB (process time) to encrypt, to decrypt and both, and the TLS
records of the last flush (per MiB, and how many are short of a full 16 KiB). Rounds alternate
between the policies; medians.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import statistics
import struct
import time
from collections.abc import Callable
from typing import cast

from ca.authority import CertificateAuthority
from ca.verify import utcnow
from mesh import mux
from mesh.muxconn import TLS_RECORD, Seal, Take, encrypt
from tests.gateway.conftest import EAST_TD
from tests.gateway.test_tls_records import tls_pair

SMALL_PIECE = 16 * 1024  # the sidecars' former threshold


def smux_before(seal: Seal, take: Take, chunks: list[bytes], out: list[bytes]) -> None:
    """The sidecars' former flush: pieces under 16 KiB joined, each larger one encrypted
    whole in one SSL_write and its records taken after it."""
    small: list[bytes] = []
    for piece in chunks:
        if len(piece) < SMALL_PIECE:
            small.append(piece)
            continue
        if small:
            seal(b"".join(small))
            small.clear()
        seal(piece)
        out.append(take())
    if small:
        seal(b"".join(small))
    data = take()
    if data:
        out.append(data)


def shared(seal: Seal, take: Take, chunks: list[bytes], out: list[bytes]) -> None:
    encrypt(seal, take, chunks, out)
    data = take()
    if data:
        out.append(data)


def flushes(total: int, streams: int, write: int) -> list[list[bytes]]:
    """The client's flushes; a peer mux reads them and returns credit (WINDOW) as it goes."""
    conn = mux.MuxConnection(is_client=True)
    peer = mux.MuxConnection(is_client=False)
    ids = [conn.open_stream() for _ in range(streams)]
    payload = bytes(write)
    out: list[list[bytes]] = []
    sent = 0
    while sent < total:
        for sid in ids:
            conn.send_data(sid, payload)
        sent += streams * write
        chunks = conn.pieces_to_send()
        out.append(chunks)
        peer.receive_data(b"".join(chunks))
        while (event := peer.next_event()) is not None:
            if isinstance(event, mux.StreamData):
                peer.consumed(event.stream_id, len(event.data))
        conn.receive_data(peer.data_to_send())
        while conn.next_event() is not None:
            pass
    return out


def records(wire: bytes) -> list[int]:
    sizes, pos = [], 0
    while pos < len(wire):
        _, _, length = struct.unpack_from("!BHH", wire, pos)
        sizes.append(length)
        pos += 5 + length
    return sizes


Policy = Callable[[Seal, Take, list[bytes], list[bytes]], None]


def run(policy: Policy, work: list[list[bytes]]) -> tuple[float, float, list[bytes]]:
    """CPU seconds to encrypt every flush, and to decrypt it as the gateway's receive side
    does (into one buffer, one SSL_read per record); and the last flush's ciphertext."""
    client, c_out, server, s_in = tls_pair(CertificateAuthority.create(EAST_TD, utcnow()))
    seal, take = client.write, c_out.read
    buf = memoryview(bytearray(256 * 1024))
    sender = receiver = 0.0
    out: list[bytes] = []
    for chunks in work:
        out = []
        t0 = time.process_time()
        policy(seal, take, chunks, out)
        t1 = time.process_time()
        for piece in out:
            s_in.write(piece)
        used = 0
        with contextlib.suppress(ssl.SSLWantReadError):
            while True:
                n = cast(int, server.read(len(buf) - used, buf[used:]))
                used += n
                if used == len(buf):
                    used = 0
        t2 = time.process_time()
        sender += t1 - t0
        receiver += t2 - t1
    return sender, receiver, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--write", type=int, default=64 * 1024)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    work = flushes(args.mib << 20, args.streams, args.write)
    size = sum(len(c) for chunks in work for c in chunks)
    policies: dict[str, Policy] = {"mesh.muxconn.encrypt": shared, "smux before": smux_before}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in policies}
    shape: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, policy in policies.items():
            sender, receiver, last = run(policy, work)
            cpu[name].append((sender / size * 1e9, receiver / size * 1e9))
            shape[name] = records(b"".join(last))
    mib = sum(len(c) for c in work[-1]) / (1 << 20)
    print(
        f"{size / (1 << 20):.0f} MiB of mux output in {len(work)} flushes ({args.streams} streams, "
        f"{args.write}-byte writes), {args.rounds} rounds; CPU s/GB, medians (min-max)"
    )
    for name in policies:
        runs = cpu[name]
        sizes = shape[name]
        short = sum(1 for s in sizes if s < TLS_RECORD + 17)
        cols = []
        for label, values in (
            ("encrypt", [r[0] for r in runs]),
            ("decrypt", [r[1] for r in runs]),
            ("both", [r[0] + r[1] for r in runs]),
        ):
            cols.append(
                f"{label} {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
            )
        print(
            f"  {name:22s} {'; '.join(cols)}; {len(sizes) / mib:.0f} records/MiB, "
            f"{short} of {len(sizes)} short"
        )


if __name__ == "__main__":
    main()
