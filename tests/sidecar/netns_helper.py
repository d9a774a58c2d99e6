"""Runs inside a test network namespace (`ip netns exec fgs-... python netns_helper.py ...`).

Roles (each bounded by an alarm so nothing outlives the test):
  install OUT IN GID       install the capture rules here; print "ok" or the CaptureError
  install-bad              install rules with an invalid port; print the CaptureError
  capture PORT GID         as the sidecar: setgid, accept on PORT, answer "orig <ip>:<port>"
  serve HOST PORT TEXT     a plain server answering TEXT
  connect HOST PORT [GID]  (optionally setgid first) connect, print the answer or "error ..."
  http DIR                 an HTTP file server for DIR on 127.0.0.1:8080
  sidecar CONFIG.json      a real Sidecar with capture on, GID 1337, logs as JSON on stderr
  push HOST PORT           accept one connection, then send "pushed" when stdin gives a line
  hold HOST PORT GID       setgid, connect, print "ready", then print the first line received
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

from sidecar.capture import CaptureConfig, capture_rules, drop_to_capture_gid, install, original_dst
from sidecar.errors import CaptureError


def _serve(host: str, port: int, answer: object) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            text = answer(conn) if callable(answer) else str(answer)
            conn.sendall(text.encode() + b"\n")


def run_sidecar(config_path: Path) -> None:
    """Run a Sidecar as the lead's wiring would: setgid, SVID and snapshot handed in."""
    import json

    import structlog
    import uvloop
    from cryptography import x509

    from ca.authority import Svid
    from ca.bundle import TrustBundle
    from ca.verify import spiffe_id_of
    from mesh.codec import decode, snapshot_from_json
    from sidecar.sidecar import Sidecar, SidecarSettings

    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    cfg = json.loads(config_path.read_text())
    drop_to_capture_gid(1337)
    cert_pem, key_pem = cfg["cert"].encode(), cfg["key"].encode()
    cert = x509.load_pem_x509_certificate(cert_pem)
    svid = Svid(spiffe_id_of(cert), cert_pem, key_pem, cert.not_valid_after_utc)
    settings = SidecarSettings(cfg["cluster"], cfg["pod"], "shop", capture=True)
    anchors = TrustBundle.from_pem({svid.spiffe_id.trust_domain: [cfg["anchor"]]})

    async def serve() -> None:
        sidecar = Sidecar(settings, anchors)
        sidecar.set_identity(svid)
        sidecar.apply(decode(cfg["snapshot"], snapshot_from_json, "snapshot"))
        await sidecar.start()
        print("ready", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await sidecar.aclose()

    uvloop.run(serve())


def main(argv: list[str]) -> None:
    signal.alarm(30)
    role, args = argv[0], argv[1:]
    if role == "install":
        out, inb, gid = (int(a) for a in args)
        try:
            install(capture_rules(CaptureConfig(out, inb, gid)))
            print("ok", flush=True)
        except CaptureError as e:
            print(f"error {e}", flush=True)
    elif role == "install-bad":
        rules = capture_rules(CaptureConfig()).replace("--dport 15006", "--dport 99999")
        try:
            install(rules)
            print("ok", flush=True)
        except CaptureError as e:
            print(f"error {e}", flush=True)
    elif role == "capture":
        drop_to_capture_gid(int(args[1]))

        def orig(conn: socket.socket) -> str:
            ip, port = original_dst(conn)
            return f"orig {ip}:{port}"

        _serve("0.0.0.0", int(args[0]), orig)
    elif role == "serve":
        _serve(args[0], int(args[1]), args[2])
    elif role == "http":
        import functools
        import http.server

        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=args[0])
        httpd = http.server.HTTPServer(("127.0.0.1", 8080), handler)
        print("ready", flush=True)
        httpd.serve_forever()
    elif role == "sidecar":
        run_sidecar(Path(args[0]))
    elif role == "connect":
        if len(args) > 2:
            drop_to_capture_gid(int(args[2]))
        try:
            with socket.create_connection((args[0], int(args[1])), timeout=1.5) as s:
                print(s.makefile().readline().strip(), flush=True)
        except OSError as e:
            print(f"error {type(e).__name__}", flush=True)
    elif role == "push":
        with socket.create_server((args[0], int(args[1]))) as srv:
            print("ready", flush=True)
            conn, _ = srv.accept()
            with conn:
                sys.stdin.readline()
                conn.sendall(b"pushed\n")
                sys.stdin.readline()  # hold the connection until the test is done
    elif role == "hold":
        drop_to_capture_gid(int(args[2]))
        with socket.create_connection((args[0], int(args[1])), timeout=5) as s:
            print("ready", flush=True)
            try:
                print(s.makefile().readline().strip(), flush=True)
            except OSError as e:
                print(f"error {type(e).__name__}", flush=True)
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv[1:])
