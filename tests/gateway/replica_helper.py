"""Runs one real gateway replica on loopback in its own process, so a test can SIGSTOP it
(`python replica_helper.py CONFIG.json`, driven by `test_replica_health.py`).

The replica listens for `tls` on `tls_port` with SO_REUSEPORT (several replicas share it) and,
if `quic_port` is set, for `quic` on that UDP port; its ingress calls the test's echo server
(`inbound_port`). It prints "ready", then answers lines on stdin: `status` prints one JSON line
(pid, calls open on its ingress, tunnel connections accepted); `stop` (or EOF) ends it. An alarm
bounds its life so nothing outlives the test. Logs are structlog JSON on stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
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
from gateway.tls_tunnel import TlsTunnelSettings
from gateway.tunnel import TunnelSettings
from mesh.codec import decode, snapshot_from_json


def make_gateway(cfg: dict[str, Any]) -> Gateway:
    settings = GatewaySettings(
        cluster=cfg["cluster"],
        trust_domain=cfg["trust_domain"],
        tunnel_host="127.0.0.1",
        tunnel_port=cfg.get("quic_port"),
        tls_port=cfg.get("tls_port"),
        egress_host="127.0.0.1",
        egress_port=0,
        inbound_port=cfg["inbound_port"],
        reuse_port=True,
        tunnel=replace(TunnelSettings(), handshake_timeout=3.0, reply_timeout=5.0),
        tls=replace(TlsTunnelSettings(), handshake_timeout=3.0, reply_timeout=5.0),
    )
    cert_pem, key_pem = cfg["cert"].encode(), cfg["key"].encode()
    cert = x509.load_pem_x509_certificate(cert_pem)
    svid = Svid(spiffe_id_of(cert), cert_pem, key_pem, cert.not_valid_after_utc)
    anchors = TrustBundle.from_pem({cfg["trust_domain"]: [cfg["anchor"].encode()]})
    gw = Gateway(settings, anchors)
    gw.set_identity(svid)
    gw.apply(decode(cfg["snapshot"], snapshot_from_json, "snapshot"))
    return gw


async def serve(cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    gw = make_gateway(cfg)
    await gw.start()
    print("ready", flush=True)
    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line == "status":
                status = gw.status()
                out = {
                    "pid": os.getpid(),
                    "ingress_active": len(gw.ingress.active),
                    "inbound": len(status["inbound"]),
                }
                print(json.dumps(out), flush=True)
            elif line == "stop" or not line:
                return
    finally:
        await gw.aclose()


def main(argv: list[str]) -> None:
    signal.alarm(60)
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    uvloop.run(serve(json.loads(Path(argv[0]).read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
