"""How the `tls` transport and smux encrypt the mux's output (`mesh.muxconn.encrypt`): two real
TLS 1.3 endpoints on memory BIOs, the TLS records on the wire parsed and decrypted."""

from __future__ import annotations

import contextlib
import os
import ssl
import struct

from ca.authority import CertificateAuthority
from ca.bundle import TrustBundle
from ca.tls import client_context, server_context
from mesh import mux
from mesh.muxconn import ENCRYPT_BATCH, TLS_RECORD, encrypt
from tests.gateway.conftest import EAST_TD, gateway_svid

# A full TLS 1.3 application-data record: header, 16 KiB, inner content type, AES-GCM tag.
FULL_RECORD = 5 + TLS_RECORD + 1 + 16


def tls_pair(
    ca: CertificateAuthority,
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.SSLObject, ssl.MemoryBIO]:
    """A connected client and server; returns (client, its outgoing BIO, server, its incoming
    BIO)."""
    svid = gateway_svid(ca)
    bundle = TrustBundle.from_pem({EAST_TD: [ca.root_pem.decode()]})
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context(svid, bundle).wrap_bio(c_in, c_out, server_hostname="gw")
    server = server_context(svid, bundle).wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert client.version() == "TLSv1.3"
    return client, c_out, server, s_in


def record_sizes(wire: bytes) -> list[int]:
    sizes, pos = [], 0
    while pos < len(wire):
        content_type, _, length = struct.unpack_from("!BHH", wire, pos)
        assert content_type == 23  # application data (TLS 1.3 hides the real type)
        sizes.append(5 + length)
        pos += 5 + length
    assert pos == len(wire)
    return sizes


def decrypt(server: ssl.SSLObject, incoming: ssl.MemoryBIO, wire: bytes) -> bytes:
    incoming.write(wire)
    got = bytearray()
    while True:
        try:
            got += server.read(1 << 20)
        except ssl.SSLWantReadError:
            return bytes(got)


def test_mux_output_goes_out_intact_in_full_records(east_ca: CertificateAuthority) -> None:
    client, c_out, server, s_in = tls_pair(east_ca)
    conn = mux.MuxConnection(is_client=True, window=8 * 1024 * 1024)
    streams = [conn.open_stream() for _ in range(3)]
    sent = []
    for size in (10, 300 * 1024, 5, 40 * 1024, 1, 1000 * 1024, 3 * 1024):  # mixed sizes
        payload = os.urandom(size)
        conn.send_data(streams[size % 3], payload)
        sent.append(payload)
    conn.ping(1)
    chunks = conn.pieces_to_send()
    expected = b"".join(chunks)
    out: list[bytes] = []
    encrypt(client.write, c_out.read, chunks, out)
    # The plaintext arrives exactly as the mux produced it.
    assert decrypt(server, s_in, b"".join(out)) == expected
    # Each piece is one batch: at most ENCRYPT_BATCH of plaintext, and only its last record
    # may be short, so the 1.3 MB here costs about one record per 16 KiB, not one per frame.
    short = 0
    for piece in out:
        sizes = record_sizes(piece)
        assert len(sizes) <= ENCRYPT_BATCH // TLS_RECORD
        assert all(size == FULL_RECORD for size in sizes[:-1]), sizes
        short += sizes[-1] != FULL_RECORD
    # The frames queued before a large payload are topped up to a whole record from it, so a
    # record is short only where a payload ends inside a batch, or at the tail (the PING):
    # 3 of ~80 here; sending those frames as records of their own made 4.
    assert short <= 3, [record_sizes(piece) for piece in out]


def test_small_frames_share_records(east_ca: CertificateAuthority) -> None:
    client, c_out, server, s_in = tls_pair(east_ca)
    conn = mux.MuxConnection(is_client=True)
    sid = conn.open_stream()
    for i in range(400):  # 400 tiny writes, as in the conformance suite
        conn.send_data(sid, bytes([i % 256]) * 20)
    chunks = conn.pieces_to_send()
    out: list[bytes] = []
    encrypt(client.write, c_out.read, chunks, out)
    assert decrypt(server, s_in, b"".join(out)) == b"".join(chunks)
    assert len(record_sizes(b"".join(out))) == 1  # 800 pieces, 12 KB: one record
