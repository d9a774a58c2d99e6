"""Run inside a test network namespace by test_injected_pod_netns.py (one mode per call).

sidecar                  as the sidecar would (UID/GID 1337): the clusterset DNS server on
                         127.0.0.1:53 and the metrics-only admin listener on 0.0.0.0:15020;
                         also an application port, 0.0.0.0:8080. Prints "ready", then serves.
bind53                   try to bind UDP 127.0.0.1:53: "ok" or "error <exception>"
get HOST PORT PATH       HTTP GET (2 s): "<status>" or "error <exception>"
dns NAME                 one A query to 127.0.0.1:53: "rcode <n> answers <n>" or "error ..."
"""

from __future__ import annotations

import asyncio
import socket
import sys
import urllib.error
import urllib.request

import structlog

from fedgate import admin
from mesh.naming import ServiceKey
from sidecar.dns import TYPE_A, DnsServer, Header, Message, Question, decode_message, encode_message

VIPS = {ServiceKey("demo", "echo"): "241.0.0.7"}


async def _sidecar() -> None:
    # Logs to stderr: stdout carries only "ready" to the test.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    await DnsServer.start("127.0.0.1", 53, VIPS.get)
    state = admin.AdminState(ready=lambda: True, metrics_only=True)
    await admin.serve(state, "0.0.0.0", 15020)

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    await asyncio.start_server(app, "0.0.0.0", 8080)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main(mode: str, *args: str) -> None:
    try:
        if mode == "sidecar":
            asyncio.run(_sidecar())
        elif mode == "bind53":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", 53))
            print("ok")
        elif mode == "get":
            host, port, path = args
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as r:
                print(r.status)
        elif mode == "dns":
            query = encode_message(Message(Header(0x4242, rd=True), Question(args[0], TYPE_A)))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.sendto(query, ("127.0.0.1", 53))
                reply = decode_message(s.recv(4096))
            print(f"rcode {reply.header.rcode} answers {len(reply.answers)}")
        else:
            raise SystemExit(f"unknown mode {mode}")
    except urllib.error.URLError as e:  # wraps the socket's error
        print(f"error {type(e.reason).__name__}")
    except OSError as e:
        print(f"error {type(e).__name__}")


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
