"""An upstream HTTP/2 server that sends GOAWAY every 100 requests, through real sidecars (issue 15).

The server (`tests.h2_goaway_peer`, python-hyper's h2) runs on its own event loop in a thread
(like a separate process): on each connection it answers 100 requests, then sends GOAWAY
naming the 100th stream as the last it processed, answers the streams up to it, ignores the
ones above it and closes the connection. The client is h2 as well, on real sockets: 10
connections with 10 streams each in flight, 2,000 requests in all. The source sidecar must
replay every stream above a GOAWAY's last-stream-id (and every request it had not sent yet)
on a new connection: 0 failed, and each request processed exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import threading

import pytest

from mesh.model import AuthorizationPolicy, AuthorizationRule, AuthzSource
from tests.h2_goaway_peer import LIMIT, LimitedProtocol, ServerStats, h2_client
from tests.sidecar.conftest import Pki
from tests.sidecar.http_rig import HOST, SVC, VIP, start_http_rig, stop_http_rig

CLIENT = "spiffe://east.fedgate.local/ns/shop/sa/client"

CONNECTIONS = 10
STREAMS = 10
REQUESTS = 2_000


class GoawayServer:
    """The limited h2 server on `host:port`, in a thread with its own event loop."""

    def __init__(self, host: str, port: int) -> None:
        self.stats = ServerStats()
        self._host, self._port = host, port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(5), "the h2 server did not start"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await self._loop.create_server(
            lambda: LimitedProtocol(self.stats), self._host, self._port
        )
        self._ready.set()
        await self._stop.wait()
        server.close()
        for transport in self.stats.transports:
            transport.abort()

    def stop(self) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


@pytest.mark.parametrize("gate", [False, True], ids=["spliced", "authorized"])
async def test_streams_a_goaway_left_unprocessed_are_replayed_unseen(pki: Pki, gate: bool) -> None:
    """`gate`: with an AuthorizationPolicy, the destination sidecar terminates HTTP/2 on both
    sides (`sidecar.inbound_gate`) and must pass the app's GOAWAY on as refused streams and a
    GOAWAY of its own; without, the source sidecar sees the app's GOAWAY itself."""
    rig = await start_http_rig(pki, [("east", "a", {})], protocol="HTTP2")
    rig.source.outbound._original_dst_of = lambda sock: (VIP, rig.app_port)
    if gate:
        allow = AuthorizationRule((AuthzSource((CLIENT,)),))
        rig.apply(authorization=[AuthorizationPolicy("client", SVC, "ALLOW", (allow,))])
    pod = rig.pod("a")
    await asyncio.to_thread(pod.stop_app)
    server = GoawayServer(pod.app_ip, rig.app_port)
    try:
        host, port = rig.source.outbound.address
        per_conn = REQUESTS // CONNECTIONS
        async with asyncio.timeout(120):
            results = await asyncio.gather(
                *(h2_client(host, port, per_conn, STREAMS, HOST) for _ in range(CONNECTIONS))
            )
        total = sum(results, collections.Counter[str]())
        stats = rig.source.outbound.h2.stats
        srv = server.stats
        print(
            f"\nh2 GOAWAY every {LIMIT} ({'authorized' if gate else 'spliced'}):"
            f" {dict(total)}; server: {srv.connections} connections, {srv.goaways} GOAWAYs,"
            f" {srv.answered} answered, {srv.ignored} streams above a GOAWAY;"
            f" sidecar retries {stats['retries']}"
        )
        assert total == {"200": REQUESTS}  # 0 failed
        assert server.stats.answered == REQUESTS  # each request processed exactly once
        assert server.stats.goaways >= REQUESTS // LIMIT - 1
        # The race happened: streams were in flight above a GOAWAY's last-stream-id (some
        # reached the server, which ignored them), and were replayed on a new connection.
        assert stats["retries"] >= max(server.stats.ignored, 1)
    finally:
        await stop_http_rig(rig)
        await asyncio.to_thread(server.stop)
