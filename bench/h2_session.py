"""CPU cost of HTTP/2 framing in the sidecar: unary gRPC-shaped exchanges between two
`sidecar.http2.session.H2Session`s in memory (no sockets, no TLS).

    .venv/bin/python -m bench.h2_session [--exchanges 3000]

One exchange: request HEADERS + DATA (end), response HEADERS + DATA + trailers, each side
encoding and decoding as the sidecar does. Prints figures only.
"""

from __future__ import annotations

import argparse
import time

from sidecar.http2.session import H2Session

REQUEST = (
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "echo.demo.svc.clusterset.local:9090"),
    (":path", "/fedgate.rig.echo.Echo/Call"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    ("user-agent", "grpc-python/1.85"),
)
RESPONSE = ((":status", "200"), ("content-type", "application/grpc"))
TRAILERS = (("grpc-status", "0"),)


def main(n: int) -> None:
    client, server = H2Session(client=True), H2Session(client=False)
    client.start()
    server.start()
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    server.receive(client.data_to_send())
    started = time.perf_counter()
    for _ in range(n):
        sid = client.new_stream()
        client.send_headers(sid, REQUEST)
        client.send_data(sid, b"\x00\x00\x00\x00\x07" + b"x" * 7, end=True)
        server.receive(client.data_to_send())
        server.send_headers(sid, RESPONSE)
        server.send_data(sid, b"\x00\x00\x00\x00\x07" + b"y" * 7, end=False)
        server.send_headers(sid, TRAILERS, end=True)
        client.receive(server.data_to_send())
    per = (time.perf_counter() - started) / n
    print(f"{n} exchanges: {per * 1e6:.0f} us each ({1 / per:.0f}/s on one core)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--exchanges", type=int, default=3000)
    main(parser.parse_args().exchanges)
