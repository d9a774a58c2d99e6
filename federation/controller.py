"""The controller loop: catalog in etcd -> merged, versioned snapshot -> config streams.

On start it writes the configured traffic policies (once), then syncs; after that it syncs
again after every batch of catalog changes, debounced (the first change in a quiet period waits
`debounce` seconds, so a burst of agent writes costs one sync). A sync is:

    load catalog -> allocate missing VIPs (txn) -> merge (pure) -> generate (pure)
    -> publisher.update(snapshot) when the version changed

A failing sync (etcd unreachable, ...) is logged and retried with backoff while the last good
snapshot keeps being served. This first version behaves as the single leader: VIP allocation
is safe with several replicas (transactions), but leader election is a later issue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from etcd3aio import Etcd3Client

from federation.errors import StoreError
from federation.generate import generate
from federation.merge import merge
from federation.owned import ControllerStore
from federation.server import SnapshotPublisher
from federation.store import EtcdCatalogState
from mesh.model import Snapshot, TrafficPolicy

_log = structlog.get_logger("fedgate.federation.controller")

RETRY_INITIAL = 0.2
RETRY_MAX = 5.0


class Controller:
    def __init__(
        self,
        state: EtcdCatalogState,
        client: Etcd3Client,
        publisher: SnapshotPublisher,
        policies: tuple[TrafficPolicy, ...] = (),
        debounce: float = 0.1,
    ) -> None:
        self._state = state
        self._owned = ControllerStore(client)
        self._publisher = publisher
        self._policies = policies
        self._debounce = debounce
        self._dirty = asyncio.Event()
        self._current: Snapshot | None = None
        self.syncs = 0  # metrics
        self.sync_failures = 0

    def current(self) -> Snapshot | None:
        """The last snapshot generated (what /config shows); None before the first sync."""
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    async def sync(self) -> Snapshot:
        """One pass: load, allocate VIPs, merge, generate, publish. Raises StoreError."""
        clusters, exports = await self._state.load()
        live = {c.name for c in clusters}
        vips = await self._owned.ensure_vips({x.key for x in exports if x.cluster in live})
        services = merge(clusters, exports, vips)
        snapshot = generate(clusters, services, self._policies)
        self.syncs += 1
        self._current = snapshot
        if self._publisher.update(snapshot):
            _log.info(
                "config version",
                version=snapshot.version,
                revision=self._state.revision,
                clusters=len(snapshot.clusters),
                services=len(snapshot.services),
                endpoints=sum(len(s.endpoints) for s in snapshot.services),
                conflicts=sum(
                    1 for s in snapshot.services for c in s.conditions if c.type == "Conflict"
                ),
                policies=len(snapshot.policies),
            )
        return snapshot

    async def run(self) -> None:
        """Write policies, sync, then re-sync on every (debounced) change; runs until cancelled."""
        await self._retrying("write policies", self._write_policies)
        await self._retrying("sync", self.sync)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch(), name="controller:watch")
            while True:
                await self._dirty.wait()
                await asyncio.sleep(self._debounce)
                self._dirty.clear()
                await self._retrying("sync", self.sync)

    async def _write_policies(self) -> None:
        await self._owned.write_policies(self._policies)

    async def _watch(self) -> None:
        delay = RETRY_INITIAL
        while True:
            try:
                async for _revision in self._state.watch():
                    delay = RETRY_INITIAL
                    self._dirty.set()
            except StoreError as e:
                _log.warning("catalog watch failed, restarting", error=str(e))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            self._dirty.set()  # changes may have been missed: reload once the watch is back

    async def _retrying(self, what: str, step: Callable[[], Awaitable[object]]) -> None:
        delay = RETRY_INITIAL
        while True:
            try:
                await step()
                return
            except StoreError as e:
                self.sync_failures += 1
                _log.warning(f"{what} failed, retrying", error=str(e), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
