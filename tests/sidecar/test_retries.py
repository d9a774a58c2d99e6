"""Retries that save the call, through real sidecars on loopback (issue 15).

- Opaque TCP: a dial to a dead remote gateway (or a dead local endpoint) is retried on another
  cluster before the app's connection sees anything.
- HTTP: without any policy (Istio's default retries), a dead endpoint in one cluster and a live
  one in another give 0 failed calls; so does a dead remote gateway.
- HTTP/1.1 keep-alive race: a server that closes a kept-alive connection as the next request
  arrives, without answering it; every request is replayed on a new connection.

Clients are real sockets (the standard library's http.client, asyncio streams); every count of
failed calls is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from mesh.model import ClusterWeight, TrafficPolicy
from tests.sidecar.conftest import Pki
from tests.sidecar.http_rig import SVC, HttpRig, start_http_rig, stop_http_rig
from tests.sidecar.loopback import VIP, Rig, start_rig, stop_rig

CALLS = 120


# -- opaque TCP ---------------------------------------------------------------------------------


@pytest.fixture
async def tcp_rig(pki: Pki) -> AsyncIterator[Rig]:
    r = await start_rig(pki)
    try:
        r.apply(weights=(("local", 50), ("remote", 50)))
        yield r
    finally:
        await stop_rig(r)


async def tcp_calls(rig: Rig, n: int) -> tuple[int, dict[str, int]]:
    """`n` connections, one at a time: bytes out, half-close, the app's echo and goodbye back.
    Failed calls, and the calls each app answered."""
    failed = 0
    by_app: dict[str, int] = {}
    for i in range(n):
        payload = f"call {i}".encode()
        try:
            async with asyncio.timeout(10):
                reader, writer = await rig.dial((VIP, rig.app_port))
                try:
                    writer.write(payload)
                    writer.write_eof()
                    got = await reader.read()
                finally:
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()
        except (ConnectionError, TimeoutError):
            failed += 1
            continue
        if not got.startswith(payload) or not got.endswith(b":bye"):
            failed += 1
            continue
        app = got[len(payload) :].removesuffix(b":bye").decode()
        by_app[app] = by_app.get(app, 0) + 1
    return failed, by_app


async def test_tcp_dial_to_a_dead_remote_gateway_is_retried_before_the_app_sees_it(
    tcp_rig: Rig,
) -> None:
    rig = tcp_rig
    await rig.gateway.aclose()  # the egress refuses connections: every remote dial fails
    failed, by_app = await tcp_calls(rig, CALLS)
    stats = rig.source.outbound.http.stats
    print(
        f"\nTCP, west's gateway dead: {CALLS} connections, {failed} failed, {by_app},"
        f" {stats['tcp_retries']} dials retried"
    )
    assert failed == 0
    assert by_app == {"payments-0": CALLS}
    # About half the connections tried west first (50/50), and were moved east unseen.
    assert CALLS // 4 < stats["tcp_retries"] < CALLS
    assert rig.source.outbound.failed == 0


async def test_tcp_dial_to_a_dead_local_endpoint_is_retried_through_the_gateway(
    tcp_rig: Rig,
) -> None:
    rig = tcp_rig
    await rig.apps["east"].aclose()  # east's sidecar lives; its stream reply says 503
    failed, by_app = await tcp_calls(rig, CALLS)
    retried = rig.source.outbound.http.stats["tcp_retries"]
    print(
        f"\nTCP, east's app dead: {CALLS} connections, {failed} failed, {by_app},"
        f" {retried} dials retried"
    )
    assert failed == 0
    assert by_app == {"payments-w0": CALLS}
    assert CALLS // 4 < rig.source.outbound.http.stats["tcp_retries"] < CALLS


async def test_tcp_retries_stay_within_the_policys_weights(tcp_rig: Rig) -> None:
    rig = tcp_rig
    rig.apply(weights=(("remote", 100),))  # east gets nothing, even when west fails
    await rig.gateway.aclose()
    failed, by_app = await tcp_calls(rig, 10)
    assert (failed, by_app) == (10, {})
    assert rig.source.outbound.http.stats["tcp_retries"] == 20  # Istio's 2, all to west


# -- HTTP ---------------------------------------------------------------------------------------


@pytest.fixture
async def http_rig(pki: Pki) -> AsyncIterator[HttpRig]:
    rig = await start_http_rig(pki, [("east", "a", {}), ("west", "w", {})])
    try:
        # 50/50 and no `retries`: Istio's default retries are what save the calls.
        weights = (ClusterWeight("local", 50), ClusterWeight("remote", 50))
        rig.apply(TrafficPolicy(SVC, cluster_weights=weights))
        yield rig
    finally:
        await stop_http_rig(rig)


async def http_calls(rig: HttpRig, fault: str) -> set[str]:
    """`CALLS` requests on one keep-alive connection: 0 failed, and about half of them (the
    50 % whose first try met the fault) retried. The pods that answered."""
    replies = await rig.many(CALLS)
    failed = [r for r in replies if r.status != 200]
    retries = rig.source.outbound.http.stats["retries"]
    print(f"\nHTTP, {fault}: {CALLS} calls, {len(failed)} failed, {retries} retries")
    assert failed == []
    assert CALLS // 4 < retries < CALLS
    return {r.pod for r in replies}


async def test_http_dead_endpoint_in_one_cluster_is_saved_by_default_retries(
    http_rig: HttpRig,
) -> None:
    await asyncio.to_thread(http_rig.pod("a").stop_app)  # east's endpoint: its sidecar says 503
    assert await http_calls(http_rig, "east's endpoint dead") == {"w"}


async def test_http_dead_remote_gateway_is_saved_by_default_retries(http_rig: HttpRig) -> None:
    await http_rig.gateway.aclose()
    assert await http_calls(http_rig, "west's gateway dead") == {"a"}


# -- HTTP/1.1 keep-alive race -------------------------------------------------------------------


class ClosingApp:
    """Answers the first request of each connection, keeping it alive; then closes the
    connection as soon as the next request's first bytes arrive, without answering: the
    server's idle close racing the client's next request, every time. `reset`: close with a
    RST (unread bytes) rather than a FIN."""

    def __init__(self, reset: bool) -> None:
        self.reset = reset
        self.served = 0
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            self.served += 1
            out = b"ok:" + body
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(out), out))
            await writer.drain()
            if await reader.read(1):  # the next request: never answered
                self.dropped += 1
            if self.reset:
                writer.transport.abort()
            else:
                writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.transport.abort()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_request_on_a_connection_the_server_closed_is_replayed(
    pki: Pki, reset: bool
) -> None:
    rig = await start_http_rig(pki, [("east", "a", {})])
    pod = rig.pod("a")
    await asyncio.to_thread(pod.stop_app)
    app = ClosingApp(reset)
    await app.start(pod.app_ip, rig.app_port)
    try:
        # POST: not idempotent, replayed all the same, since the server never read it.
        replies = await rig.many(CALLS, method="POST", body=b"x" * 100)
        failed = [r for r in replies if r.status != 200]
        stale = rig.source.outbound.http.stats["stale_connections"]
        print(
            f"\nHTTP/1.1 keep-alive race ({'rst' if reset else 'fin'}): {CALLS} POSTs,"
            f" {len(failed)} failed, {stale} replayed from a stale connection"
        )
        assert failed == []
        assert {r.body for r in replies} == {b"ok:" + b"x" * 100}
        stats = rig.source.outbound.http.stats
        assert app.served == CALLS  # each request processed once
        # From the second request on, each first met the connection of the one before.
        assert app.dropped == CALLS - 1
        assert stats["stale_connections"] == CALLS - 1
        assert stats["retries"] == CALLS - 1
    finally:
        await app.aclose()
        await stop_http_rig(rig)
