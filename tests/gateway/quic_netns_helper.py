"""Runs a real gateway inside a test network namespace (`ip netns exec fgq-... python
quic_netns_helper.py ROLE CONFIG.json`), as `test_quic_netns.py` drives it.

Roles (each bounded by an alarm so nothing outlives the test):
  west CONFIG   the destination: an echo server on 127.0.0.1:ECHO_PORT behind a gateway whose
                QUIC listener is on 0.0.0.0:TUNNEL_PORT
  east CONFIG   the caller: a gateway, plus a client that CONNECTs through its egress to the
                echo service in west and plays ping-pong on that one stream (64-byte messages,
                numbered, each checked when it comes back) until told to stop
Both print "ready", then answer lines on stdin: `status` prints one JSON line (the gateway's
`status()`, and for east the ping-pong's figures); `bulk N` (east) sends N bytes through a
second stream and prints whether they came back intact; `stop` (or EOF) ends the process.
Logs are structlog JSON on stderr.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
import uvloop
from cryptography import x509

from ca.authority import Svid
from ca.bundle import TrustBundle
from ca.verify import spiffe_id_of
from gateway.gateway import Gateway, GatewaySettings
from gateway.tunnel import TunnelSettings
from mesh.codec import decode, snapshot_from_json
from mesh.connect import ConnectRequest, encode_request, parse_response
from mesh.naming import ServiceKey

TUNNEL_PORT = 15443
EGRESS_PORT = 15008
ECHO_PORT = 7070
ECHO = ServiceKey("demo", "echo")
MESSAGE = 64


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


def make_gateway(cfg: dict[str, Any]) -> Gateway:
    settings = GatewaySettings(
        cluster=cfg["cluster"],
        trust_domain=cfg["trust_domain"],
        tunnel_host="0.0.0.0",
        tunnel_port=TUNNEL_PORT,
        tls_port=None,
        egress_host="127.0.0.1",
        egress_port=EGRESS_PORT,
        inbound_port=ECHO_PORT,
        max_datagram_size=cfg["max_datagram_size"],
        tunnel=replace(TunnelSettings(), handshake_timeout=3.0, reply_timeout=5.0),
    )
    cert_pem, key_pem = cfg["cert"].encode(), cfg["key"].encode()
    cert = x509.load_pem_x509_certificate(cert_pem)
    svid = Svid(spiffe_id_of(cert), cert_pem, key_pem, cert.not_valid_after_utc)
    anchors = TrustBundle.from_pem({cfg["trust_domain"]: [cfg["anchor"].encode()]})
    gw = Gateway(settings, anchors)
    gw.set_identity(svid)
    gw.apply(decode(cfg["snapshot"], snapshot_from_json, "snapshot"))
    return gw


async def open_stream() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", EGRESS_PORT)
    writer.write(encode_request(ConnectRequest(ECHO, ECHO_PORT, "west")))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status, reason = parse_response(head)
    if status != 200:
        raise RuntimeError(f"CONNECT refused: {status} {reason}")
    return reader, writer


class PingPong:
    """One stream, one message in flight at a time; every echo is checked."""

    def __init__(self) -> None:
        self.pings = 0
        self.errors: list[str] = []
        self.max_rtt_ms = 0.0
        self.stopping = False

    async def run(self, interval: float, limit: int) -> None:
        try:
            reader, writer = await open_stream()
        except Exception as e:
            self.errors.append(f"open: {e!r}")
            return
        try:
            for seq in range(limit):  # bounded; the test stops it much earlier
                if self.stopping:
                    break
                msg = f"ping {seq:08d}".encode().ljust(MESSAGE, b".")
                start = time.monotonic()
                writer.write(msg)
                got = await asyncio.wait_for(reader.readexactly(MESSAGE), 20)
                if got != msg:
                    self.errors.append(f"ping {seq}: got {got[:16]!r}")
                    return
                self.pings += 1
                self.max_rtt_ms = max(self.max_rtt_ms, (time.monotonic() - start) * 1000)
                await asyncio.sleep(interval)  # pacing of the load, not synchronisation
            writer.write_eof()
            rest = await asyncio.wait_for(reader.read(), 10)
            if rest:
                self.errors.append(f"unexpected bytes after FIN: {rest[:16]!r}")
        except Exception as e:
            self.errors.append(f"ping {self.pings}: {e!r}")
        finally:
            writer.close()


async def bulk(size: int) -> dict[str, Any]:
    reader, writer = await open_stream()
    payload = bytes(range(256)) * (size // 256)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    start = time.monotonic()
    sender = asyncio.create_task(send())
    got = await asyncio.wait_for(reader.read(-1), 30)
    await sender
    writer.close()
    return {"intact": got == payload, "received": len(got), "seconds": time.monotonic() - start}


async def serve(role: str, cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(Echo, "127.0.0.1", ECHO_PORT) if role == "west" else None
    gw = make_gateway(cfg)
    await gw.start()
    game = PingPong()
    games: list[asyncio.Task[None]] = []
    if role == "east":
        games.append(asyncio.create_task(game.run(cfg.get("interval", 0.005), 100_000)))
    print("ready", flush=True)
    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line == "status":
                out: dict[str, Any] = {"gateway": gw.status()}
                if role == "east":
                    out.update(pings=game.pings, errors=game.errors, max_rtt_ms=game.max_rtt_ms)
                print(json.dumps(out, default=str), flush=True)
            elif line.startswith("bulk "):
                print(json.dumps(await bulk(int(line.split()[1]))), flush=True)
            elif line == "stop" or not line:
                game.stopping = True
                if games:
                    await asyncio.wait_for(games[0], 15)
                    print(json.dumps({"pings": game.pings, "errors": game.errors}), flush=True)
                return
    finally:
        await gw.aclose()
        if echo is not None:
            echo.close()


def main(argv: list[str]) -> None:
    signal.alarm(90)
    role, config = argv
    if role not in ("west", "east"):
        raise SystemExit(f"unknown role {role}")
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    uvloop.run(serve(role, json.loads(Path(config).read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
