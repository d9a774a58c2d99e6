"""The rig's sample workload: an HTTP echo server that says which cluster and pod answered.

It is an ordinary, mesh-unaware program (standard library only) listening on plain HTTP; the
sidecar in its pod is what makes it reachable, over mTLS, from anywhere in the clusterset.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(cluster: str, pod: str) -> type[BaseHTTPRequestHandler]:
    class EchoHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fedgate-echo/1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body_in = self.rfile.read(min(length, 1 << 20)) if length else b""
            body = (
                json.dumps(
                    {
                        "cluster": cluster,
                        "pod": pod,
                        "method": self.command,
                        "path": self.path,
                        "host": self.headers.get("Host", ""),
                        "received_bytes": len(body_in),
                    },
                    sort_keys=True,
                ).encode()
                + b"\n"
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Fedgate-Cluster", cluster)
            self.send_header("X-Fedgate-Pod", pod)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _answer  # noqa: N815 - http.server's naming

        def log_message(self, format: str, *args: object) -> None:
            return  # the sidecar writes the access log

    return EchoHandler


def serve(cluster: str, pod: str, host: str = "0.0.0.0", port: int = 8080) -> None:
    server = ThreadingHTTPServer((host, port), make_handler(cluster, pod))
    server.daemon_threads = True
    server.serve_forever()
