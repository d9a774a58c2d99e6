"""A hostile (or, as control, a valid) client, run inside a rig namespace by the e2e tests.

usage: probe.py quic|tls KIND HOST PORT SERVER_ROOT_PEM EAST_CA_DIR
KIND: valid | none | foreign-root | wrong-domain. Prints {"result": "accepted"|"refused", ...}.
"accepted" means the server answered our stream header (tls: with 200; quic: with any reply,
as the probe names a port the service lacks, so the gateway answers without dialling the pod);
anything else is "refused".
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authority import CertificateAuthority, Svid
from ca.tls import _load_svid
from ca.verify import utcnow
from gateway.tunnel import ALPN
from mesh.codec import StreamHeader, encode_header, reply_from_json, split_frame
from mesh.naming import ServiceKey, SpiffeId

EAST = "east.fedgate.local"
WEST = "west.fedgate.local"
ECHO = ServiceKey("demo", "echo")


def identity(kind: str, mode: str, east_ca_dir: Path) -> Svid | None:
    ns, sa = ("fedgate-system", "gateway") if mode == "quic" else ("demo", "client")
    now = utcnow()
    if kind == "none":
        return None
    if kind == "valid":
        east = CertificateAuthority.load(east_ca_dir)
        dns = (f"gateway.{EAST}",) if mode == "quic" else ()
        return east.issue(SpiffeId(EAST, ns, sa), now, dns_names=dns)
    if kind == "foreign-root":
        # A root nobody federated, claiming the east trust domain.
        return CertificateAuthority.create(EAST, now).issue(SpiffeId(EAST, ns, sa), now)
    if kind == "wrong-domain":
        # The genuine east root minting a west identity: what a compromised east CA could do.
        east = CertificateAuthority.load(east_ca_dir)
        forger = CertificateAuthority(WEST, east._key, east.root)
        return forger.issue(SpiffeId(WEST, ns, sa), now)
    raise SystemExit(f"unknown kind {kind}")


def header(port: int) -> bytes:
    return encode_header(StreamHeader(ECHO, port, "west"))


def verdict(data: bytes, ok: set[int]) -> dict[str, str]:
    try:
        frame = split_frame(data)
        if frame is not None and reply_from_json(frame[0]).status in ok:
            return {"result": "accepted"}
    except Exception as e:
        return {"result": "refused", "detail": f"unparseable reply: {e}"}
    return {"result": "refused", "detail": repr(data[:200])}


async def probe_quic(svid: Svid | None, host: str, port: int, root: bytes) -> dict[str, str]:
    config = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], server_name=f"gateway.{WEST}", cadata=root
    )
    if svid is not None:
        certs = x509.load_pem_x509_certificates(svid.cert_pem)
        config.certificate = certs[0]
        config.private_key = serialization.load_pem_private_key(svid.key_pem, None)  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: QuicConnectionProtocol(QuicConnection(configuration=config)),
        local_addr=("0.0.0.0", 0),
    )
    client: QuicConnectionProtocol = proto
    try:
        client.connect((host, port))
        try:
            await asyncio.wait_for(client.wait_connected(), 5)
        except (ConnectionError, TimeoutError) as e:
            return {"result": "refused", "detail": f"handshake: {e!r}"}
        reader, writer = await client.create_stream()
        writer.write(header(9))
        try:
            data = await asyncio.wait_for(reader.read(4096), 5)
        except (TimeoutError, ConnectionError) as e:
            return {"result": "refused", "detail": f"stream: {e!r}"}
        return verdict(data, {200, 503})
    finally:
        client.close()
        transport.close()


def probe_tls(svid: Svid | None, host: str, port: int, root: bytes) -> dict[str, str]:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=root.decode())
    ctx.check_hostname = False
    if svid is not None:
        _load_svid(ctx, svid)
    with socket.create_connection((host, port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(header(8080))
                data = b""
                while len(data) < 6 + 4096:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                    if split_frame(data) is not None:
                        break
        except (ssl.SSLError, ConnectionError, TimeoutError) as e:
            return {"result": "refused", "detail": f"tls: {e!r}"}
    return verdict(data, {200})


def main() -> None:
    mode, kind, host, port, root_path, east_ca_dir = sys.argv[1:7]
    svid = identity(kind, mode, Path(east_ca_dir))
    root = Path(root_path).read_bytes()
    if mode == "quic":
        out = asyncio.run(probe_quic(svid, host, int(port), root))
    else:
        out = probe_tls(svid, host, int(port), root)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
