"""The sidecar's end of the peer-health feed: its cluster's egress gateway tells it which peer
gateways are down (wire format: mesh.peerhealth; the gateway's end: gateway.peer_feed).

One connection to the egress address of the current routes (`RouteTable.egress`), one request,
then a report per line into `PeerHealth` (sidecar.traffic.peers), which routing consults. The
gateway sends a report at least every `HEARTBEAT` seconds; a feed silent for
`SILENCE` x that, closed, or answering anything but reports is dropped (what it listed stays
avoided for the refusal rule's seconds) and dialled again after `RETRY` seconds, backing off
to `RETRY_MAX` while the gateway keeps refusing (an older gateway answers 400). Without a feed
the sidecar still learns of a down peer from the refusal of a call (`Fedgate-Peer-Health`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from mesh.errors import CodecError
from mesh.peerhealth import HEARTBEAT, MAX_REPORT, REQUEST, decode_report
from sidecar.routes import Egress
from sidecar.traffic.peers import PeerHealth

_log = structlog.get_logger("fedgate.sidecar.peers")

RETRY = 1.0  # seconds before dialling the feed again
RETRY_MAX = 5.0  # a refused local dial is cheap; a late feed costs detours
SILENCE = 2.5  # heartbeats without a report after which the feed counts as dead
CONNECT_TIMEOUT = 2.0
MAX_HEAD = 4096
# A refused or lost connection, silence, an oversized or undecodable answer.
_FEED_ERRORS = (
    OSError,
    TimeoutError,
    ValueError,  # a line over the reader's limit
    CodecError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
)


async def watch_peer_health(egress: Callable[[], Egress | None], peers: PeerHealth) -> None:
    """Follow the local gateway's peer-health feed for ever (run it as a task)."""
    delay = RETRY
    failing = False
    while True:
        target = egress()
        if target is not None:
            before = peers.reports
            try:
                await _follow(target, peers)
            except (
                OSError,
                TimeoutError,
                ValueError,
                CodecError,
                asyncio.IncompleteReadError,
            ) as e:
                if not failing:  # once per outage, not once a second
                    _log.info("peer-health feed unavailable", egress=str(target), reason=str(e))
                failing = True
            finally:
                if peers.feed:
                    peers.feed_lost(time.monotonic())
            if peers.reports > before:  # it worked for a while: dial again soon
                delay, failing = RETRY, False
            else:
                delay = min(delay * 2, RETRY_MAX)
        await asyncio.sleep(delay)  # a backoff, not synchronisation


async def _follow(target: Egress, peers: PeerHealth) -> None:
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
    # arrives as its inner call completes, and this loop would then outlive its task set.
    async with asyncio.timeout(CONNECT_TIMEOUT):
        reader, writer = await asyncio.open_connection(
            target.host, target.port, limit=MAX_REPORT + 1
        )
    try:
        writer.write(REQUEST)
        async with asyncio.timeout(HEARTBEAT * SILENCE):
            head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD or not head.startswith(b"HTTP/1.1 200 "):
            status = head.split(b"\r\n", 1)[0][:80]
            raise CodecError(f"the egress answered {status!r}")
        while True:
            async with asyncio.timeout(HEARTBEAT * SILENCE):
                line = await reader.readline()
            if not line:
                return  # the gateway closed (restart, drain)
            peers.report(decode_report(line))
    finally:
        writer.close()
