"""The current snapshot and its subscribers (the config streams' side of distribution).

`SnapshotPublisher` holds the current snapshot and every open stream's subscription. Each
subscription is a bounded queue of one whose overflow policy is "keep the newest": a slow
stream is never fed a backlog, it gets the latest snapshot when it is ready again (a delta from
what it runs, or the full snapshot), and `update()` never waits for anyone. `superseded`
counts the snapshots a slow stream never saw.

Encoding is lazy and shared: the full payload of a version is built once, from the per-service
fragments of a `FragmentCache` (federation.api.delta), and only if some stream needs it; a
delta from a base version is built once per (base, version) from the last `HISTORY` snapshots.
So an endpoint change costs every up-to-date stream one small delta, not the federation.

The gRPC servicer that drives one subscription per stream is `federation.server`. Each
subscription tells its stream's push statistics (`federation.pushstats.Subscriber`) of every
offer, so a stream's lag counts from the offer, whatever the stream then does.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType

from federation.api.delta import FragmentCache, encode_delta, encode_full
from federation.pushstats import Subscriber
from mesh.model import Snapshot

HISTORY = 8  # recent snapshots kept to build deltas from
DELTAS_PER_VERSION = 8  # delta payloads cached per published version (one per base)


class Published:
    """One version as the streams see it: its payloads are encoded at most once, on demand."""

    def __init__(self, snapshot: Snapshot, publisher: SnapshotPublisher, at: float) -> None:
        self.snapshot = snapshot
        self.at = at  # when it was published (the publisher's clock), for push latency
        self._publisher = publisher
        self._payload: bytes | None = None
        self._deltas: OrderedDict[str, bytes | None] = OrderedDict()

    @property
    def version(self) -> str:
        return self.snapshot.version

    @property
    def payload(self) -> bytes:
        """The full snapshot: byte-identical to mesh.codec.dumps(snapshot_to_json(...))."""
        if self._payload is None:
            self._payload = encode_full(self.snapshot, self._publisher.fragments)
            self._publisher.full_encodings += 1
        return self._payload

    def full(self) -> bytes:
        return self.payload

    def delta(self, base: str) -> bytes | None:
        """A delta from `base` to this version, or None if `base` is not in recent history."""
        if base in self._deltas:
            return self._deltas[base]
        old = self._publisher.historic(base)
        # Even when everything changed a delta is barely larger than the full snapshot, and
        # checking would cost the full encoding this avoids.
        body = None if old is None else encode_delta(old, self.snapshot, self._publisher.fragments)
        self._deltas[base] = body
        if len(self._deltas) > DELTAS_PER_VERSION:
            self._deltas.popitem(last=False)
        return body


class Subscription:
    """One stream's view of the publisher: the newest snapshot it has not taken yet.

    A bounded queue of one whose overflow policy is "keep the newest" (a slot and a waiter,
    not an asyncio.Queue: `offer` runs once per stream per version, 1,000 streams per sync).
    """

    def __init__(self, publisher: SnapshotPublisher, tracker: Subscriber | None = None) -> None:
        self._publisher = publisher
        self._item: Published | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._tracker = tracker
        self.superseded = 0  # metric: snapshots replaced before this stream took them

    def offer(self, item: Published) -> None:
        if self._tracker is not None:  # lag counts from the offer, whatever the stream does
            self._tracker.offered(item.version, item.at)
        if self._item is not None:
            self.superseded += 1
            self._publisher.superseded += 1
        self._item = item
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Published:
        while self._item is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item, self._item = self._item, None
        return item

    def close(self) -> None:
        self._publisher._subscriptions.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SnapshotPublisher:
    def __init__(
        self,
        fragments: FragmentCache | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fragments = fragments or FragmentCache()
        self.clock = clock
        self._published_at: OrderedDict[str, float] = OrderedDict()
        self._current: Published | None = None
        self._history: OrderedDict[str, Snapshot] = OrderedDict()
        self._subscriptions: set[Subscription] = set()
        self._first = asyncio.Event()
        self.superseded = 0  # metric, summed over every subscription
        self.full_encodings = 0  # metric: full payloads encoded

    @property
    def current(self) -> Snapshot | None:
        return self._current.snapshot if self._current is not None else None

    @property
    def published(self) -> Published | None:
        return self._current

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def historic(self, version: str) -> Snapshot | None:
        return self._history.get(version)

    def published_at(self, version: str) -> float | None:
        """When `version` was published, if it is among the last `HISTORY` versions."""
        return self._published_at.get(version)

    def superseded_at(self, version: str) -> float | None:
        """When the version after `version` was published (a proxy running `version` has been
        behind since then), if both are among the last `HISTORY` versions."""
        found = False
        for v, at in self._published_at.items():
            if found:
                return at
            found = v == version
        return None

    @property
    def first(self) -> asyncio.Event:
        """Set once there is a snapshot."""
        return self._first

    def update(self, snapshot: Snapshot) -> bool:
        """Make `snapshot` current and offer it to every stream; False if the version is same."""
        if self._current is not None and self._current.snapshot.version == snapshot.version:
            return False
        self._current = Published(snapshot, self, self.clock())
        self._history[snapshot.version] = snapshot
        self._history.move_to_end(snapshot.version)
        self._published_at[snapshot.version] = self._current.at
        self._published_at.move_to_end(snapshot.version)
        while len(self._history) > HISTORY:
            self._history.popitem(last=False)
        while len(self._published_at) > HISTORY:
            self._published_at.popitem(last=False)
        if len(self.fragments) > len(snapshot.services):  # services were deleted: forget them
            self.fragments.retain(s.key for s in snapshot.services)
        self._first.set()
        for subscription in self._subscriptions:
            subscription.offer(self._current)
        return True

    def subscribe(self, tracker: Subscriber | None = None) -> Subscription:
        """A subscription offered the current snapshot and every later one; `tracker` (the
        stream's push statistics) learns of each offer, for the lag."""
        subscription = Subscription(self, tracker)
        if self._current is not None:
            subscription.offer(self._current)
        self._subscriptions.add(subscription)
        return subscription
