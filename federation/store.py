"""The etcd adapters of the catalog: agents publish (leased), controllers load and watch.

- `EtcdCatalogPublisher` (mesh.interfaces.CatalogPublisher) writes one cluster's `info` and
  exports under `/fedgate/clusters/<cluster>/`, every key attached to one lease, in ONE
  transaction that also deletes the cluster's keys that are no longer published. It keeps the
  lease alive; if etcd lost the lease (expired during a partition) it grants a new one and
  republishes everything. A cluster that dies simply stops renewing: its keys expire after TTL.
- `EtcdCatalogState` (mesh.interfaces.CatalogState) decodes every key under
  `/fedgate/clusters/` and watches the prefix, resuming from the last revision it saw.

Keys are written by agents of other clusters, so the reader trusts nothing: a key off the
layout, a value that does not decode, or one that names another cluster than its key (an export
"of west" under east's prefix, an endpoint in another trust domain) is logged and skipped.
The controller-owned keys (VIPs, policies) live in `federation.owned`; the layout in
`federation.keys`. Key layout, JSON codecs and merge rules are not decided here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any, cast

import structlog
from etcd3aio import Etcd3Client, prefix_range_end
from etcd3aio._protobuf import Compare  # etcd3aio has helpers for every compare but MOD
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.watch import WatchService

from federation import keys
from federation.errors import (
    LeaseLostError,
    StoreConflictError,
    StoreError,
    StoreUnavailableError,
)
from federation.etcd import store_errors
from mesh.codec import (
    cluster_from_json,
    cluster_to_json,
    decode,
    dumps,
    export_from_json,
    export_to_json,
)
from mesh.errors import MeshError
from mesh.model import ClusterInfo, ServiceExport
from mesh.naming import check_label
from mesh.tasks import TaskSet

_log = structlog.get_logger("fedgate.federation.store")

DEFAULT_TIMEOUT = 5.0  # seconds per etcd request: a partitioned etcd must not hang us forever
TXN_ATTEMPTS = 5  # compare-and-swap retries before giving up with StoreConflictError


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

    @property
    def cluster(self) -> str:
        return self._cluster

    @property
    def lease_id(self) -> int | None:
        return self._lease

    async def publish(self, info: ClusterInfo, exports: Sequence[ServiceExport]) -> None:
        """Make the store hold exactly `info` and `exports` for this cluster (one transaction)."""
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
        kv = kv_service(self._client)
        prefix = keys.cluster_prefix(self._cluster)
        with store_errors("publish: read current keys"):
            current = await kv.get(
                prefix, prefix_range_end(prefix), keys_only=True, timeout=self._timeout
            )
        wanted = {keys.info_key(self._cluster).encode(): dumps(cluster_to_json(info))}
        for x in exports:
            wanted[keys.export_key(self._cluster, x.key).encode()] = dumps(export_to_json(x))
        ops = [kv.txn_op_put(k, v, lease=lease) for k, v in wanted.items()]
        ops += [kv.txn_op_delete(item.key) for item in current.kvs if item.key not in wanted]
        with store_errors("publish"):
            result = await kv.txn(
                [unchanged_since(prefix, int(current.header.revision))], ops, timeout=self._timeout
            )
        if result.succeeded:
            self._log.debug("published", exports=len(exports), deleted=len(ops) - len(wanted))
        return bool(result.succeeded)

    async def _keepalive_loop(self) -> None:
        interval = self._ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._tick()
            except StoreError as e:
                self._log.warning("lease keepalive failed", lease=self._lease, error=str(e))

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
        """Renew `lease` once; the TTL etcd answered (0 when etcd no longer has the lease)."""
        call = _lease_service(self._client).keep_alive(lease)
        try:
            with store_errors("lease keepalive"):
                async with asyncio.timeout(self._timeout):
                    async for response in call:
                        return int(response.TTL)
        finally:
            call.cancel()
        raise StoreUnavailableError("lease keepalive stream closed without an answer")


class EtcdCatalogState:
    """The controller's read side: every cluster's published state, and a watch on it."""

    def __init__(self, client: Etcd3Client, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._client = client
        self._timeout = timeout
        self._revision = 0
        self._reported: set[tuple[bytes, int]] = set()  # (key, mod_revision) already logged

    @property
    def revision(self) -> int:
        """The etcd revision of the last `load()` (0 before the first)."""
        return self._revision

    async def load(self) -> tuple[tuple[ClusterInfo, ...], tuple[ServiceExport, ...]]:
        """Every cluster's info and exports, at one revision; bad keys are logged and skipped."""
        kv = kv_service(self._client)
        prefix = keys.CLUSTERS_PREFIX
        with store_errors("load catalog"):
            response = await kv.get(prefix, prefix_range_end(prefix), timeout=self._timeout)
        infos: dict[str, ClusterInfo] = {}
        pending: list[tuple[bytes, int, ServiceExport]] = []
        reported: set[tuple[bytes, int]] = set()
        for item in response.kvs:
            key = item.key.decode("utf-8", "replace")
            try:
                parsed = keys.parse_cluster_key(key)
                if parsed.service is None:
                    info: ClusterInfo = decode(item.value, cluster_from_json, key)
                    if info.name != parsed.cluster:
                        raise ValueError(f"info names cluster {info.name!r}")
                    infos[parsed.cluster] = info
                    continue
                export: ServiceExport = decode(item.value, export_from_json, key)
                if export.cluster != parsed.cluster or export.key != parsed.service:
                    raise ValueError(f"value is the export of {export.key} in {export.cluster!r}")
                foreign = sorted({e.cluster for e in export.endpoints} - {parsed.cluster})
                if foreign:
                    raise ValueError(f"endpoints of other clusters {foreign}")
                pending.append((item.key, int(item.mod_revision), export))
            except (ValueError, MeshError) as e:
                self._skip(reported, item.key, int(item.mod_revision), str(e))
        exports: list[ServiceExport] = []
        for raw_key, mod_revision, export in pending:
            info_ = infos.get(export.cluster)
            domains = {e.identity.trust_domain for e in export.endpoints}
            if info_ is not None and domains - {info_.trust_domain}:
                error = f"endpoint identities outside trust domain {info_.trust_domain!r}"
                self._skip(reported, raw_key, mod_revision, error)
                continue
            exports.append(export)
        self._reported = reported
        self._revision = int(response.header.revision)
        return (
            tuple(sorted(infos.values(), key=lambda c: c.name)),
            tuple(sorted(exports, key=lambda x: (x.key, x.cluster))),
        )

    def _skip(
        self, reported: set[tuple[bytes, int]], key: bytes, revision: int, error: str
    ) -> None:
        # Log a bad key once per version of it, not on every reload.
        reported.add((key, revision))
        if (key, revision) not in self._reported:
            _log.warning(
                "skipping malformed catalog key",
                key=key.decode("utf-8", "replace"),
                revision=revision,
                error=error,
            )

    async def watch(self) -> AsyncGenerator[int, None]:
        """Yield once per batch of changes under /fedgate/clusters/ (the batch's revision).

        Starts after the last `load()` (or now); resumes after reconnects from the last revision
        seen. If etcd compacted the history we needed it yields once (reload everything) and
        resumes at the oldest revision etcd still has.
        """
        watcher = _watch_service(self._client)
        prefix = keys.CLUSTERS_PREFIX
        resume = self._revision + 1 if self._revision else 0
        backoff = 0.1
        while True:
            stream = cast(
                AsyncGenerator[Any, None],
                watcher.watch(prefix, prefix_range_end(prefix), start_revision=resume),
            )
            async with contextlib.aclosing(stream):
                while True:
                    with store_errors("watch catalog"):
                        response = await anext(stream, None)
                    if response is None:
                        break
                    if response.compact_revision > 0:
                        _log.warning(
                            "catalog watch history compacted, reloading",
                            compact_revision=int(response.compact_revision),
                        )
                        resume = max(resume, int(response.compact_revision))
                        yield resume
                        break
                    if response.canceled:
                        _log.warning(
                            "etcd cancelled the catalog watch", reason=response.cancel_reason
                        )
                        break
                    if response.events:
                        backoff = 0.1
                        resume = max(int(ev.kv.mod_revision) for ev in response.events) + 1
                        yield resume - 1
            # The server ended or cancelled the watch: start again, never from before a load.
            if self._revision:
                resume = max(resume, self._revision + 1)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
