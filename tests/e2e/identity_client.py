"""Traffic for the identity e2e tests, run inside a rig pod (its calls are captured by the mesh).

usage:
  identity_client.py hold HOST PORT SECONDS
      one long-lived Redis connection sending PING every 0.2 s for SECONDS (stops early if it
      fails), plus a fresh connection with one PING every 2 s (new handshakes); says
      "connected" on stderr once the first PING was answered; reports how long it held
      from then (`held_s`: a test may end it early with SIGTERM).
  identity_client.py calls SECONDS URL_OR_REDIS...
      back-to-back short calls, round robin over the targets (`http://...` GET, or
      `redis://host:port` PING), each on a new connection.

Prints one JSON object. Every loop is bounded by SECONDS (SIGTERM ends it early, still
printing the result); every socket by a 5 s timeout.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
import urllib.request

TIMEOUT = 5.0
_stop: list[bool] = []
# Never a proxy from the environment: rig traffic stays inside the rig's namespaces.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def ping(sock: socket.socket) -> None:
    sock.sendall(b"PING\r\n")
    got = b""
    while not got.endswith(b"\r\n"):
        chunk = sock.recv(64)
        if not chunk:
            raise ConnectionError(f"connection closed after {got!r}")
        got += chunk
    if got != b"+PONG\r\n":
        raise ConnectionError(f"unexpected reply {got!r}")


def fresh_ping(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        ping(s)


def hold(host: str, port: int, seconds: float) -> dict[str, object]:
    out: dict[str, object] = {"pings": 0, "new_ok": 0, "new_failed": [], "error": None}
    start = time.monotonic()
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    next_fresh = start + 2
    connected = start
    try:
        while time.monotonic() - start < seconds and not _stop:
            try:
                ping(sock)
            except OSError as e:
                out["error"] = f"{type(e).__name__}: {e}"
                out["failed_after_s"] = round(time.monotonic() - start, 2)
                break
            out["pings"] = int(out["pings"]) + 1  # type: ignore[call-overload]
            if out["pings"] == 1:
                connected = time.monotonic()
                print("connected", file=sys.stderr, flush=True)
            if time.monotonic() >= next_fresh:
                next_fresh += 2
                try:
                    fresh_ping(host, port)
                    out["new_ok"] = int(out["new_ok"]) + 1  # type: ignore[call-overload]
                except OSError as e:
                    out["new_failed"].append(f"{type(e).__name__}: {e}")  # type: ignore[attr-defined]
            time.sleep(0.2)
    finally:
        sock.close()
    out["held_s"] = round(time.monotonic() - connected, 2) if out["pings"] else 0.0
    return out


def one_call(target: str) -> None:
    if target.startswith("redis://"):
        host, _, port = target[len("redis://") :].rpartition(":")
        fresh_ping(host, int(port))
        return
    with _OPENER.open(target, timeout=TIMEOUT) as response:
        if response.status != 200:
            raise ConnectionError(f"HTTP {response.status}")
        response.read()


def calls(seconds: float, targets: list[str]) -> dict[str, object]:
    ok: dict[str, int] = dict.fromkeys(targets, 0)
    failed: list[str] = []
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds and not _stop:
        target = targets[i % len(targets)]
        i += 1
        try:
            one_call(target)
            ok[target] += 1
        except Exception as e:  # every failure counts; the test asserts there are none
            failed.append(f"{round(time.monotonic() - start, 2)}s {target}: {e!r}")
        time.sleep(0.05)
    return {"ok": ok, "failed": failed}


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: _stop.append(True))
    mode = sys.argv[1]
    if mode == "hold":
        out = hold(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    elif mode == "calls":
        out = calls(float(sys.argv[2]), sys.argv[3:])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
