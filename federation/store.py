"""The etcd adapters of the catalog: agents publish (leased), controllers load and watch.

- `EtcdCatalogPublisher` (mesh.interfaces.CatalogPublisher) writes one cluster's `info` and
  exports under `/fedgate/clusters/<cluster>/`, every key attached to one lease. It writes only
  the keys whose value (or lease) differ from the store and deletes the ones no longer
  published, in one transaction when the change fits etcd's --max-txn-ops (128), else in a
  chain of guarded transactions. It keeps the lease alive; if etcd lost the lease (expired
  during a partition) it grants a new one and republishes everything. A cluster that dies
  simply stops renewing: its keys expire after TTL.
- `EtcdWatcher` is the controller's incremental feed (federation.controller_ports.EventFeed):
  every key under a prefix at one revision (paged), then the watch's events in order
  (federation.catalog applies them), resuming after a failure from the revision after the last
  event it delivered, on any member of the cluster.

Keys are written by agents of other clusters, so their reader trusts nothing: decoding and
skipping bad keys is `federation.catalog`'s, not done here.
The controller-owned keys (VIPs, policies) live in `federation.owned`; the layout in
`federation.keys`. Key layout, JSON codecs and merge rules are not decided here.

Over the 450-line aim: the paged snapshot, the watch and the resume after a member fails are one
state machine around one revision counter; split, that counter would be shared across modules.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import structlog
from etcd3aio import Etcd3Client, prefix_range_end

# etcd3aio has helpers for every compare but MOD. Its watch helper resumes after a reconnect
# from the response *header* revision, which can skip events a catching-up watcher had not got
# yet, and sets no `hasleader`; so `watch_stream` drives the raw Watch RPC itself.
from etcd3aio._protobuf import (
    Compare,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.watch import WatchService

from federation import keys
from federation.catalog import Changed, KeyEvent, Loaded
from federation.errors import (
    LeaseLostError,
    StoreConflictError,
    StoreError,
    StoreUnavailableError,
)
from federation.etcd import store_errors
from mesh.codec import cluster_to_json, dumps, export_to_json
from mesh.model import ClusterInfo, ServiceExport
from mesh.naming import check_label
from mesh.tasks import TaskSet

_log = structlog.get_logger("fedgate.federation.store")

DEFAULT_TIMEOUT = 5.0  # seconds per etcd request: a partitioned etcd must not hang us forever
TXN_ATTEMPTS = 5  # compare-and-swap retries before giving up with StoreConflictError
TXN_MAX_OPS = 128  # etcd's default --max-txn-ops
LOAD_PAGE = 500  # keys per range request: stays under gRPC's 4 MiB default message size
# Seconds between keepalives after one failed: etcd keeps leases across a restart (and extends
# them when its new leader takes over), so renewing within moments of its return keeps every
# key; waiting the normal TTL/3 would let short leases lapse (issue 15: agents were 9 s late).
KEEPALIVE_RETRY = 0.2


def kv_service(client: Etcd3Client) -> KVService:
    if client.kv is None:
        raise StoreError("etcd client is not connected")
    return client.kv


def _lease_service(client: Etcd3Client) -> LeaseService:
    if client.lease is None:
        raise StoreError("etcd client is not connected")
    return client.lease


def _watch_service(client: Etcd3Client) -> WatchService:
    if client.watch is None:
        raise StoreError("etcd client is not connected")
    return client.watch


def unchanged_since(prefix: str, revision: int) -> Any:
    """A txn compare: no key under `prefix` was created or modified after `revision`.

    etcd applies a range compare to every key in the range (a deleted key is simply absent),
    so this guards a read-modify-write of a whole prefix.
    """
    return Compare(
        result=Compare.LESS,
        target=Compare.MOD,
        key=prefix.encode(),
        range_end=prefix_range_end(prefix),
        mod_revision=revision + 1,
    )


class EtcdCatalogPublisher:
    """Publishes one cluster's catalog under its own prefix, attached to a kept-alive lease.

    The lease is granted on the first `publish`. `aclose()` revokes it, so the keys vanish at
    once; `abandon()` stops renewing without revoking, as a crashed agent would, so the keys
    expire after `ttl` seconds.
    """

    def __init__(
        self,
        client: Etcd3Client,
        cluster: str,
        ttl: int = 10,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if ttl < 1:
            raise ValueError(f"lease ttl must be at least 1 s, got {ttl}")
        self._client = client
        self._cluster = check_label(cluster, "cluster name")
        self._ttl = ttl
        self._timeout = timeout
        self._lease: int | None = None
        self._state: tuple[ClusterInfo, tuple[ServiceExport, ...]] | None = None
        self._stale = False  # the store lacks `_state` (a write failed or the lease was lost)
        self._closed = False
        self._lock = asyncio.Lock()
        self._tasks = TaskSet(f"catalog-publisher:{cluster}")
        self._keepalive: asyncio.Task[None] | None = None
        self._log = _log.bind(cluster=cluster)
        self.leases_lost = 0  # metric: times etcd had forgotten our lease
        self.keepalive_failures = 0  # metric: keepalives that failed (etcd unreachable)
        self.keepalive_failures_in_a_row = 0
        self.renewed_at: float | None = None  # loop time of the last good keepalive

    @property
    def cluster(self) -> str:
        return self._cluster

    @property
    def lease_id(self) -> int | None:
        return self._lease

    async def publish(self, info: ClusterInfo, exports: Sequence[ServiceExport]) -> None:
        """Make the store hold exactly `info` and `exports` for this cluster."""
        state = (info, tuple(exports))
        self._check(*state)
        async with self._lock:
            if self._closed:
                raise StoreError(f"publisher of cluster {self._cluster} is closed")
            self._state = state
            await self._write_state()
        if self._keepalive is None:
            self._keepalive = self._tasks.spawn(self._keepalive_loop(), "keepalive")

    async def abandon(self) -> None:
        """Stop renewing the lease without revoking it: the keys expire after the TTL."""
        self._closed = True
        await self._tasks.aclose()
        self._lease = None

    async def aclose(self) -> None:
        """Stop renewing and revoke the lease, deleting every key of this cluster."""
        self._closed = True
        await self._tasks.aclose()
        async with self._lock:
            lease, self._lease = self._lease, None
            if lease is None:
                return
            try:
                with store_errors("lease revoke"):
                    await _lease_service(self._client).revoke(lease, timeout=self._timeout)
            except StoreError as e:
                self._log.warning("could not revoke lease, keys expire with it", error=str(e))

    def _check(self, info: ClusterInfo, exports: tuple[ServiceExport, ...]) -> None:
        # A publisher writes under its own cluster's prefix only, so it refuses foreign data.
        if info.name != self._cluster:
            raise ValueError(f"publisher of {self._cluster!r} got info of cluster {info.name!r}")
        seen = set()
        for x in exports:
            if x.cluster != self._cluster:
                raise ValueError(f"publisher of {self._cluster!r} got an export of {x.cluster!r}")
            if x.key in seen:
                raise ValueError(f"service {x.key} is exported twice")
            seen.add(x.key)
            foreign = sorted({e.cluster for e in x.endpoints} - {self._cluster})
            if foreign:
                raise ValueError(f"export {x.key} has endpoints of clusters {foreign}")

    async def _write_state(self) -> None:
        """Write `_state` with the current lease (granting one if needed); caller holds the lock."""
        assert self._state is not None
        self._stale = True
        for _ in range(TXN_ATTEMPTS):
            if self._lease is None:
                with store_errors("lease grant"):
                    grant = await _lease_service(self._client).grant(
                        self._ttl, timeout=self._timeout
                    )
                self._lease = int(grant.ID)
                self._log.info("lease granted", lease=self._lease, ttl=int(grant.TTL))
            try:
                if await self._txn(self._lease, *self._state):
                    self._stale = False
                    return
            except LeaseLostError:
                self._log.warning(
                    "lease lost while publishing, granting another", lease=self._lease
                )
                self.leases_lost += 1
                self._lease = None
        raise StoreConflictError(
            f"publish of cluster {self._cluster}: {TXN_ATTEMPTS} transactions lost to "
            "concurrent writers (is a second agent publishing this cluster?)"
        )

    async def _txn(self, lease: int, info: ClusterInfo, exports: tuple[ServiceExport, ...]) -> bool:
        """Write only what differs from the store, in transactions of at most TXN_MAX_OPS.

        Each transaction is guarded by "nothing under the prefix changed since I read (or last
        wrote) it", so a concurrent writer is detected; a large change spans several
        transactions (etcd refuses more than --max-txn-ops operations in one) and a failure
        between them is repaired by the retry, which diffs again.
        """
        kv = kv_service(self._client)
        prefix = keys.cluster_prefix(self._cluster)
        with store_errors("publish: read current keys"):
            current = await kv.get(prefix, prefix_range_end(prefix), timeout=self._timeout)
        wanted = {keys.info_key(self._cluster).encode(): dumps(cluster_to_json(info))}
        for x in exports:
            wanted[keys.export_key(self._cluster, x.key).encode()] = dumps(export_to_json(x))
        have = {bytes(item.key): (bytes(item.value), int(item.lease)) for item in current.kvs}
        ops = [
            kv.txn_op_put(k, v, lease=lease) for k, v in wanted.items() if have.get(k) != (v, lease)
        ]
        ops += [kv.txn_op_delete(k) for k in have if k not in wanted]
        revision = int(current.header.revision)
        for start in range(0, len(ops), TXN_MAX_OPS):
            chunk = ops[start : start + TXN_MAX_OPS]
            with store_errors("publish"):
                result = await kv.txn(
                    [unchanged_since(prefix, revision)], chunk, timeout=self._timeout
                )
            if not result.succeeded:
                return False
            revision = int(result.header.revision)
        self._log.debug("published", exports=len(exports), changed=len(ops))
        return True

    async def _keepalive_loop(self) -> None:
        interval = self._ttl / 3
        delay = interval
        while True:
            await asyncio.sleep(delay)  # a period, not synchronisation
            try:
                await self._tick()
            except StoreError as e:
                if not self.keepalive_failures_in_a_row:  # once per outage, not 5 a second
                    self._log.warning("lease keepalive failed", lease=self._lease, error=str(e))
                self.keepalive_failures += 1
                self.keepalive_failures_in_a_row += 1
                delay = min(KEEPALIVE_RETRY, interval)
                continue
            if self.keepalive_failures_in_a_row:
                self._log.info(
                    "lease keepalive recovered",
                    lease=self._lease,
                    failures=self.keepalive_failures_in_a_row,
                )
                self.keepalive_failures_in_a_row = 0
            self.renewed_at = asyncio.get_running_loop().time()
            delay = interval

    async def _tick(self) -> None:
        lease = self._lease
        if lease is not None and await self._renew(lease) <= 0:
            self._log.warning("lease expired, granting another and republishing", lease=lease)
            self.leases_lost += 1
            async with self._lock:
                if self._lease == lease:
                    self._lease = None
                self._stale = True
        if self._stale:  # the lease was lost, or the last write failed: write everything again
            async with self._lock:
                if self._stale and not self._closed:
                    await self._write_state()
                    self._log.info("republished", lease=self._lease)

    async def _renew(self, lease: int) -> int:
        return await renew_lease(self._client, lease, self._timeout)


async def renew_lease(client: Etcd3Client, lease: int, seconds: float) -> int:
    """Renew `lease` once; the TTL etcd answered (0 when etcd no longer has the lease).

    Waits with `asyncio.wait`, not `asyncio.timeout`: on Python 3.11 a cancellation racing the
    timeout can surface as TimeoutError (here: StoreUnavailableError), which keepalive loops
    retry, so the loop could never be cancelled.
    """
    call = _lease_service(client).keep_alive(lease)
    reading = asyncio.ensure_future(call.read())
    try:
        with store_errors("lease keepalive"):
            done, _ = await asyncio.wait({reading}, timeout=seconds)
            if not done:
                raise TimeoutError
            response = reading.result()
    finally:
        reading.cancel()
        call.cancel()
    if not hasattr(response, "TTL"):  # grpc.aio.EOF
        raise StoreUnavailableError("lease keepalive stream closed without an answer")
    return int(response.TTL)


# --- the controller's incremental feed ----------------------------------------------------

EVENT_DELETE = 1  # mvccpb.Event.EventType
# etcd cancels a watch carrying this metadata when its member loses the raft leader, so a watch
# on a member cut off from the quorum fails over instead of going silent (clientv3's
# WithRequireLeader).
REQUIRE_LEADER = (("hasleader", "true"),)


async def load_prefix(
    client: Etcd3Client,
    prefix: str,
    *,
    page: int = LOAD_PAGE,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a per-request etcd deadline
) -> Loaded:
    """Every key under `prefix` at one revision, read `page` keys per request."""
    kv = kv_service(client)
    end = prefix_range_end(prefix)
    start: bytes = prefix.encode()
    revision = 0
    events: list[KeyEvent] = []
    while True:
        with store_errors(f"load {prefix}"):
            response = await kv.get(start, end, revision=revision, limit=page, timeout=timeout)
        revision = revision or int(response.header.revision)
        for item in response.kvs:
            events.append(
                KeyEvent(item.key.decode("utf-8", "replace"), bytes(item.value), item.mod_revision)
            )
        if not response.more or not response.kvs:
            return Loaded(tuple(events), revision)
        start = bytes(response.kvs[-1].key) + b"\0"


class CompactedError(StoreError):
    """The revision a watch wanted to resume from was compacted away: load again."""


async def watch_stream(
    client: Etcd3Client, prefix: str, start_revision: int, *, exact: bool = False
) -> AsyncGenerator[Changed, None]:
    """One Watch RPC on `prefix` (or the one key, `exact`) from `start_revision`.

    It ends with an exception, never quietly.

    Raises `CompactedError` if the history is gone and `StoreUnavailableError` when the stream
    breaks or etcd cancels it; the caller resumes from the revision after the last batch.
    """
    channel = client._channel  # etcd3aio keeps its channel private; pinned <0.4
    if channel is None:
        raise StoreError("etcd client is not connected")
    metadata = REQUIRE_LEADER + tuple(_watch_service(client)._metadata)
    create = WatchCreateRequest(
        key=prefix.encode(),
        range_end=b"" if exact else prefix_range_end(prefix),
        start_revision=start_revision,
    )

    done = asyncio.Event()

    async def requests() -> AsyncGenerator[WatchRequest, None]:
        yield WatchRequest(create_request=create)
        await done.wait()  # keep the request side open for the stream's lifetime

    call = WatchStub(channel).Watch(requests(), metadata=metadata)
    try:
        while True:
            with store_errors(f"watch {prefix}"):
                response = await call.read()
            if not hasattr(response, "events"):  # grpc.aio.EOF: the server ended the stream
                raise StoreUnavailableError(f"watch {prefix}: stream ended")
            if response.compact_revision > 0:
                raise CompactedError(
                    f"watch {prefix}: revision {start_revision} compacted "
                    f"(oldest kept {response.compact_revision})"
                )
            if response.canceled:
                raise StoreUnavailableError(f"watch {prefix} cancelled: {response.cancel_reason}")
            if response.events:
                events = tuple(
                    KeyEvent(
                        ev.kv.key.decode("utf-8", "replace"),
                        None if ev.type == EVENT_DELETE else bytes(ev.kv.value),
                        int(ev.kv.mod_revision),
                    )
                    for ev in response.events
                )
                yield Changed(events, max(e.revision for e in events))
    finally:
        done.set()  # lets gRPC's request-consuming task end by itself, not by cancellation
        call.cancel()


class EtcdWatcher:
    """`Loaded` first, then `Changed` batches for ever; `Loaded` again after a compaction.

    A broken watch (member lost, network) is retried with backoff from the revision after the
    last batch delivered; the channel round-robins over every endpoint, so another member
    answers. `resumes` and `reloads` count both (metrics).
    """

    def __init__(
        self,
        client: Etcd3Client,
        prefix: str = keys.ROOT,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._timeout = timeout
        self._backoff = (backoff_initial, backoff_max)
        self.revision = 0
        self.resumes = 0
        self.reloads = 0

    async def load(self) -> Loaded:
        """One load of every key under the prefix, without retries (tools, one-shot syncs)."""
        return await load_prefix(self._client, self._prefix, timeout=self._timeout)

    async def _load(self) -> Loaded:
        delay = self._backoff[0]
        while True:
            try:
                loaded = await load_prefix(self._client, self._prefix, timeout=self._timeout)
            except StoreError as e:
                _log.warning("load failed, retrying", prefix=self._prefix, error=str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            self.revision = loaded.revision
            return loaded

    async def batches(self) -> AsyncGenerator[Loaded | Changed, None]:
        yield await self._load()
        delay = self._backoff[0]
        while True:
            try:
                stream = watch_stream(self._client, self._prefix, self.revision + 1)
                async with contextlib.aclosing(stream):
                    async for batch in stream:
                        delay = self._backoff[0]
                        self.revision = max(self.revision, batch.revision)
                        yield batch
            except CompactedError as e:
                _log.warning("watch history compacted, reloading", error=str(e))
                self.reloads += 1
                yield await self._load()
                continue
            except StoreError as e:
                _log.warning(
                    "watch broke, resuming", prefix=self._prefix, revision=self.revision + 1,
                    error=str(e), retry_in=delay,
                )  # fmt: skip
            self.resumes += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])
