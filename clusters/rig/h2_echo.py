"""The rig's HTTP/2 echo: `clusters.rig.echo`'s behaviour over h2c (HTTP/2 with prior knowledge).

Same paths and counters as the HTTP/1.1 echo (`/status/<code>`, `/delay/<ms>`, the fail ratio,
`/__echo/fail-ratio/<r>`, `/__echo/stats` with `shadow` counting requests whose `:authority`
ends in `-shadow`), answered per stream on an asyncio server built on python-hyper's h2.
It runs next to the gRPC echo in the same process (`grpc_echo --h2-port`), so one rig pod
serves both protocols.
"""

from __future__ import annotations

import asyncio
import json
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from clusters.rig.echo import MAX_DELAY_MS, EchoControl


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


class _EchoProtocol(asyncio.Protocol):
    def __init__(self, cluster: str, pod: str, control: EchoControl) -> None:
        self._cluster = cluster
        self._pod = pod
        self._ctl = control
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self._transport: asyncio.Transport | None = None
        self._heads: dict[int, dict[str, str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._conn.initiate_connection()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for task in self._tasks:
            task.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            if self._transport is not None:
                self._transport.close()
            return
        for e in events:
            if isinstance(e, h2.events.RequestReceived) and e.stream_id and e.headers:
                self._heads[e.stream_id] = {str(k): str(v) for k, v in e.headers}
            elif isinstance(e, h2.events.DataReceived) and e.stream_id:
                self._conn.acknowledge_received_data(e.flow_controlled_length or 0, e.stream_id)
            elif isinstance(e, h2.events.StreamEnded) and e.stream_id in self._heads:
                task = asyncio.get_running_loop().create_task(self._answer(e.stream_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(e, h2.events.StreamReset) and e.stream_id:
                self._heads.pop(e.stream_id, None)
        self._flush()

    async def _answer(self, sid: int) -> None:
        head = self._heads.get(sid, {})
        path = head.get(":path", "/").split("?", 1)[0]
        authority = head.get(":authority", "")
        status = 200
        if path == "/__echo/stats" or path.startswith("/__echo/fail-ratio/"):
            if path.startswith("/__echo/fail-ratio/"):
                self._ctl.fail_ratio = min(1.0, max(0.0, float(path.rsplit("/", 1)[1])))
            payload: dict[str, object] = {"cluster": self._cluster, "pod": self._pod}
            payload.update(self._ctl.stats())
        else:
            fail = self._ctl.count(authority)
            if path.startswith("/delay/"):
                await asyncio.sleep(min(_int(path.split("/")[2]), MAX_DELAY_MS) / 1000)
            if path.startswith("/status/"):
                status = _int(path.split("/")[2])
                status = status if 200 <= status <= 599 else 400
            if fail:
                status = 503
            payload = {
                "cluster": self._cluster,
                "pod": self._pod,
                "method": head.get(":method", ""),
                "path": head.get(":path", ""),
                "host": authority,
                "status": status,
                "protocol": "h2",
            }
        if self._heads.pop(sid, None) is None:
            return  # reset meanwhile
        body = json.dumps(payload, sort_keys=True).encode() + b"\n"
        headers = [
            (":status", str(status)),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("x-fedgate-cluster", self._cluster),
            ("x-fedgate-pod", self._pod),
        ]
        try:
            self._conn.send_headers(sid, headers)
            self._conn.send_data(sid, body, end_stream=True)  # small: within any window
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def _flush(self) -> None:
        out = self._conn.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out)


async def serve_h2(cluster: str, pod: str, host: str, port: int, control: EchoControl) -> None:
    """Serve until cancelled; then close the listener and every open connection."""
    loop = asyncio.get_running_loop()
    conns: list[_EchoProtocol] = []

    def accept() -> _EchoProtocol:
        conns[:] = [c for c in conns if not c.closed]
        conn = _EchoProtocol(cluster, pod, control)
        conns.append(conn)
        return conn

    server = await loop.create_server(accept, host, port)
    try:
        async with server:
            await server.serve_forever()
    finally:
        for conn in conns:
            conn.close()
