"""The admission webhook's HTTPS server (the thin driver around `admission.review`).

HTTP/1.1 with keep-alive (the API server reuses its connections), `POST /inject` with an
AdmissionReview v1 JSON body; anything else is answered 404, 405 or 400 and the connection is
closed. Heads are bounded (`MAX_HEAD`), bodies too (`MAX_BODY`, the API server's own request
limit is 3 MiB), and a peer that stalls is dropped after `IDLE_TIMEOUT`. The TLS context comes
from the caller (fedgate/, a certificate of the cluster's CA); no client certificate is asked
for, as the API server presents none unless configured to.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from typing import Any

import structlog

from clusters.inject.admission import WEBHOOK_PATH, AdmissionError, review
from clusters.inject.spec import InjectSettings

_log = structlog.get_logger("fedgate.inject.webhook")

MAX_HEAD = 16 * 1024
MAX_BODY = 4 * 1024 * 1024
IDLE_TIMEOUT = 30.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class _BadRequestError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _response(status: int, body: bytes, keep_alive: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + body


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise _BadRequestError(400, "request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequestError(400, f"malformed request line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequestError(400, "malformed header line")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _BadRequestError(400, "chunked bodies are not supported")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError as e:
        raise _BadRequestError(400, "bad Content-Length") from e
    if not 0 <= length <= MAX_BODY:
        raise _BadRequestError(400, f"body of {length} bytes exceeds {MAX_BODY}")
    body = await reader.readexactly(length)
    return parts[0], parts[1], headers, body


def _answer(method: str, target: str, body: bytes, s: InjectSettings) -> tuple[int, Any]:
    if target.split("?", 1)[0] != WEBHOOK_PATH:
        return 404, {"error": f"no such path; the injector is POST {WEBHOOK_PATH}"}
    if method != "POST":
        return 405, {"error": "POST only"}
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise AdmissionError("the body is not a JSON object")
        return 200, review(data, s)
    except (ValueError, AdmissionError) as e:  # JSONDecodeError is a ValueError
        return 400, {"error": str(e)}


class WebhookServer:
    """Serves the injector on one listener; `settings` is read per request (it may change)."""

    def __init__(self, settings: Callable[[], InjectSettings]) -> None:
        self._settings = settings
        self._server: asyncio.Server | None = None
        self.reviews = 0
        self.errors = 0

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self._server = await asyncio.start_server(
            self._connection, host, port, ssl=context, limit=MAX_HEAD
        )
        _log.info("admission webhook listening", address=f"{host}:{self.address[1]}")

    def status(self) -> dict[str, object]:
        return {"reviews": self.reviews, "errors": self.errors}

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        method, target, headers, body = await _read_request(reader)
                except (asyncio.IncompleteReadError, TimeoutError):
                    return  # the peer closed or went quiet between requests
                except (asyncio.LimitOverrunError, ValueError) as e:
                    raise _BadRequestError(400, f"bad request: {e}") from e
                status, answer = _answer(method, target, body, self._settings())
                keep = status == 200 and headers.get("connection", "").lower() != "close"
                self.reviews += status == 200
                if status != 200:
                    self.errors += 1
                    _log.warning("admission request refused", peer=peer, status=status, **answer)
                writer.write(_response(status, json.dumps(answer).encode(), keep))
                await writer.drain()
                if not keep:
                    return
        except _BadRequestError as e:
            self.errors += 1
            _log.warning("admission request refused", peer=peer, reason=str(e))
            writer.write(_response(e.status, json.dumps({"error": str(e)}).encode(), False))
        except (ConnectionError, ssl.SSLError) as e:
            _log.info("admission connection lost", peer=peer, error=str(e))
        finally:
            writer.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
