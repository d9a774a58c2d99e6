"""The rig's sample workload: an HTTP echo server that says which cluster and pod answered.

It is an ordinary, mesh-unaware program (standard library only) listening on plain HTTP; the
sidecar in its pod is what makes it reachable, over mTLS, from anywhere in the clusterset.

Every path answers 200 with a JSON description of the request, except these test behaviours:

- `/status/<code>`: answers with that status (100..599 excluded 1xx);
- `/delay/<ms>`: waits that long (at most 60 s), then answers as usual;
- with a fail ratio (`--fail-ratio`, or set at run time) that share of requests gets a 503;
- `/__echo/fail-ratio/<r>` sets the fail ratio (0..1); `/__echo/stats` returns the counters
  (requests, failed, shadow: requests whose Host ends in `-shadow`, i.e. mirrored). Tests call
  these on 127.0.0.1 inside the pod; they are not counted as requests.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_DELAY_MS = 60_000


@dataclass
class EchoControl:
    """Run-time behaviour and counters shared by the server's threads."""

    fail_ratio: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    hang_up: bool = False  # close every connection without answering (a crashed process)
    requests: int = 0
    failed: int = 0
    shadow: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, host: str) -> bool:
        """Count a request; whether it must fail."""
        with self.lock:
            self.requests += 1
            if host.rsplit(":", 1)[0].endswith("-shadow"):
                self.shadow += 1
            fail = self.fail_ratio > 0 and self.rng.random() < self.fail_ratio
            self.failed += fail
            return fail

    def stats(self) -> dict[str, float]:
        with self.lock:
            return {
                "requests": self.requests,
                "failed": self.failed,
                "shadow": self.shadow,
                "fail_ratio": self.fail_ratio,
            }


def make_handler(
    cluster: str, pod: str, control: EchoControl | None = None
) -> type[BaseHTTPRequestHandler]:
    ctl = control or EchoControl()

    class EchoHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fedgate-echo/1"
        # Head and body are two writes: with Nagle the body waits for the peer's delayed ACK.
        disable_nagle_algorithm = True

        def _send(self, status: int, payload: dict[str, object]) -> None:
            body = json.dumps(payload, sort_keys=True).encode() + b"\n"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            # 204 and 304 have no content (RFC 9110 15.3.5, 15.4.5): a body here would be read
            # as the start of the connection's next response; 204 has no Content-Length either.
            if status != 204:
                self.send_header("Content-Length", "0" if status == 304 else str(len(body)))
            self.send_header("X-Fedgate-Cluster", cluster)
            self.send_header("X-Fedgate-Pod", pod)
            self.end_headers()
            if self.command != "HEAD" and status not in (204, 304):
                self.wfile.write(body)

        def _answer(self) -> None:
            if ctl.hang_up:
                self.close_connection = True
                return
            length = int(self.headers.get("Content-Length") or 0)
            body_in = self.rfile.read(min(length, 1 << 20)) if length else b""
            path = self.path.split("?", 1)[0]
            if path == "/__echo/stats":
                self._send(200, {"cluster": cluster, "pod": pod, **ctl.stats()})
                return
            if path.startswith("/__echo/fail-ratio/"):
                ctl.fail_ratio = min(1.0, max(0.0, float(path.rsplit("/", 1)[1])))
                self._send(200, {"cluster": cluster, "pod": pod, **ctl.stats()})
                return
            fail = ctl.count(self.headers.get("Host", ""))
            status = 200
            if path.startswith("/delay/"):
                time.sleep(min(_int(path.split("/")[2]), MAX_DELAY_MS) / 1000)
            if path.startswith("/status/"):
                status = _int(path.split("/")[2])
                status = status if 200 <= status <= 599 else 400
            if fail:
                status = 503
            self._send(
                status,
                {
                    "cluster": cluster,
                    "pod": pod,
                    "method": self.command,
                    "path": self.path,
                    "host": self.headers.get("Host", ""),
                    "received_bytes": len(body_in),
                    "status": status,
                },
            )

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer  # noqa: N815 - http.server's naming

        def log_message(self, format: str, *args: object) -> None:
            return  # the sidecar writes the access log

    return EchoHandler


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


_STDERR_LOCK = threading.Lock()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # One JSON line like the rest of the rig's logs, not socketserver's traceback (a
        # probe that connects and resets is routine).
        peer = ":".join(map(str, client_address)) if isinstance(client_address, tuple) else ""
        line = {"event": "echo request failed", "peer": peer, "error": repr(sys.exc_info()[1])}
        text = json.dumps({**line, "level": "warning"}) + "\n"
        # One write under a lock: `print` writes the line and its newline apart, so two
        # handler threads failing at once interleaved into one line of two objects.
        with _STDERR_LOCK:
            sys.stderr.write(text)
            sys.stderr.flush()


def make_server(
    cluster: str, pod: str, host: str, port: int, control: EchoControl | None = None
) -> ThreadingHTTPServer:
    return _Server((host, port), make_handler(cluster, pod, control))


def serve(
    cluster: str, pod: str, host: str = "0.0.0.0", port: int = 8080, fail_ratio: float = 0.0
) -> None:
    make_server(cluster, pod, host, port, EchoControl(fail_ratio)).serve_forever()


def main(argv: list[str] | None = None) -> None:
    """`python -m clusters.rig.echo --cluster C --pod P [--port N] [--fail-ratio R]`."""
    p = argparse.ArgumentParser(prog="echo")
    p.add_argument("--cluster", required=True)
    p.add_argument("--pod", required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--fail-ratio", type=float, default=0.0)
    a = p.parse_args(argv)
    serve(a.cluster, a.pod, a.host, a.port, a.fail_ratio)


if __name__ == "__main__":
    main()
