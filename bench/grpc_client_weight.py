"""What a long-lived gRPC stream costs a client process, by client library (a benchmark: prints).

    .venv/bin/python bench/grpc_client_weight.py

A sidecar's config stream is one bidirectional gRPC stream held for the process's life. Each
client below runs in its own interpreter (with uvloop, as fedgate processes do), opens one
`Echo.Chat` stream to the rig's gRPC echo server (grpcio, h2c on loopback), exchanges a message
and keeps the stream open; then its RSS and thread count are read:

* `grpc.aio`: what fedgate uses (federation.api.client);
* `grpc sync, thread`: the blocking API, its stream iterated in one thread;
* `h2 + protobuf`: no grpcio: the gRPC framing (a 5-byte length prefix per message, RFC 7540
  streams, `te: trailers`) written by hand over the `h2` library the sidecar already imports,
  the messages encoded with protobuf: the floor a sidecar could reach without grpcio.
* `ca.h2grpc`: fedgate's own h2 gRPC client (`--grpc-client h2`: sans-I/O core `mesh.grpc_h2`,
  asyncio driver `ca.h2grpc`), keepalive and flow control included;
* `baseline`: the interpreter with uvloop, h2 and protobuf imported, no connection.

TLS is left out of every case (each fedgate process loads `ssl` and `cryptography` anyway).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("baseline", "grpc.aio", "grpc sync, thread", "h2 + protobuf", "ca.h2grpc")
CHAT = "/fedgate.rig.echo.Echo/Chat"


def status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "Threads:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return {"rss_mib": out["VmRSS"] / 1024, "threads": out["Threads"]}


async def _aio(target: str) -> None:
    import grpc

    from clusters.rig.api import echo_pb2, echo_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        call = echo_pb2_grpc.EchoStub(channel).Chat()
        await call.write(echo_pb2.CallRequest(text="hello"))
        await call.read()
        print(json.dumps(status()), flush=True)
        await call.done_writing()


def _sync(target: str) -> None:
    import queue
    import threading

    import grpc

    from clusters.rig.api import echo_pb2, echo_pb2_grpc

    outbox: queue.Queue[object] = queue.Queue()
    got = threading.Event()

    def requests() -> object:
        while (item := outbox.get()) is not None:
            yield item

    def follow() -> None:
        for _reply in stub.Chat(requests()):
            got.set()

    with grpc.insecure_channel(target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        outbox.put(echo_pb2.CallRequest(text="hello"))
        got.wait(30)
        print(json.dumps(status()), flush=True)
        outbox.put(None)
        thread.join(30)


async def _h2(host: str, port: int) -> None:
    import h2.config
    import h2.connection
    import h2.events

    from clusters.rig.api import echo_pb2

    reader, writer = await asyncio.open_connection(host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    headers = [(":method", "POST"), (":scheme", "http"), (":path", CHAT)]
    headers += [(":authority", f"{host}:{port}"), ("content-type", "application/grpc")]
    conn.send_headers(sid, [*headers, ("te", "trailers")])
    message = echo_pb2.CallRequest(text="hello").SerializeToString()
    conn.send_data(sid, b"\0" + len(message).to_bytes(4, "big") + message)
    writer.write(conn.data_to_send())
    buffered = b""
    while len(buffered) < 5 or len(buffered) < 5 + int.from_bytes(buffered[1:5], "big"):
        data = await reader.read(65536)
        if not data:
            raise SystemExit("server closed the stream")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                buffered += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        writer.write(conn.data_to_send())
    echo_pb2.CallReply.FromString(buffered[5:])
    print(json.dumps(status()), flush=True)
    conn.end_stream(sid)
    writer.write(conn.data_to_send())
    writer.close()


async def _fedgate_h2(target: str) -> None:
    from ca.h2grpc import H2Channel
    from clusters.rig.api import echo_pb2

    async with await H2Channel.connect(target, None) as channel:
        call = channel.call(CHAT)
        await call.write(echo_pb2.CallRequest(text="hello").SerializeToString())
        reply = await call.read()
        assert reply is not None
        echo_pb2.CallReply.FromString(reply)
        print(json.dumps(status()), flush=True)
        call.cancel()


def client(mode: str, target: str) -> None:
    import uvloop

    host, _, port = target.rpartition(":")
    if mode == "baseline":
        import google.protobuf  # noqa: F401
        import h2.connection  # noqa: F401

        print(json.dumps(status()))
    elif mode == "grpc.aio":
        uvloop.run(_aio(target))
    elif mode == "grpc sync, thread":
        _sync(target)
    elif mode == "ca.h2grpc":
        uvloop.run(_fedgate_h2(target))
    else:
        uvloop.run(_h2(host, int(port)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--client", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.client:
        client(a.client, a.target)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "clusters.rig.grpc_echo", "--cluster", "c", "--pod", "p"]
    server = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        print(f"{'client':20s} {'RSS MiB':>8s} {'threads':>8s}")
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--client", mode, "--target", f"127.0.0.1:{port}"],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
                env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
            )
            lines = out.stdout.strip().splitlines()
            if out.returncode != 0 and not lines:
                print(f"{mode:20s} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(lines[0])
            print(f"{mode:20s} {r['rss_mib']:8.1f} {r['threads']:8.0f}")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
