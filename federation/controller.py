"""The controller loop: /fedgate/ in etcd -> merged, versioned snapshot -> config streams.

One replica of several. Each replica keeps an in-memory view of /fedgate/ (federation.catalog)
fed by one watch (federation.store.EtcdWatcher: a consistent load, then events, resumed from
the last revision on any etcd member), and serves config streams from its own snapshot. After
a batch of changes (debounced: the first change in a quiet period waits `debounce` seconds, so
a burst costs one sync) it syncs:

    liveness (flap damping) -> [leader: allocate missing VIPs] -> re-merge the services the
    batch touched (pure) -> generate (pure, unchanged services cost nothing) -> publish
    -> [leader: write status back]

Only the elected leader (federation.leader) writes, and every write is fenced by its term:
VIPs, the policy seed (while no GitOps commit exists), cluster liveness records, the MCS
conditions of every service and the config status. Followers compute the same snapshot from
the same etcd state; they take the damping records from the leader (`/fedgate/status/
clusters/`) so every replica routes to the same clusters, and a service whose VIP the leader
has not allocated yet carries an empty VIP until it has. Versions are content hashes, so
replicas agree on them and a proxy can move between replicas without a resend.

The config (`FederationConfig`: policies, deny list, commit, other GitOps documents) is read
from /fedgate/config/ through the same watch; `seed_policies` (the config directory) are
written there by the leader only while no GitOps commit exists.

A failing etcd never stops the replica from serving its last good snapshot: loads and watches
are retried with backoff, and a failed leader write is logged and retried at the next sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from etcd3aio import Etcd3Client

from federation import keys
from federation.aio import wait_event
from federation.api.delta import FragmentCache
from federation.catalog import CatalogView, Changes, KeyEvent, Problem
from federation.errors import StoreError
from federation.generate import generate
from federation.leader import LeaderElection
from federation.liveness import DampingSettings, Liveness
from federation.merge import merge_service
from federation.owned import ControllerStore, NotLeaderError
from federation.server import SnapshotPublisher
from federation.status import (
    LeaderRecord,
    changed_keys,
    config_status_json,
    liveness_entries,
    service_entry,
)
from federation.store import Changed, EtcdWatcher, Loaded, load_prefix
from mesh.clock import SystemClock
from mesh.codec import dumps, loads
from mesh.errors import CodecError
from mesh.interfaces import Clock
from mesh.model import MergedService, Snapshot, TrafficPolicy
from mesh.naming import ServiceKey

_log = structlog.get_logger("fedgate.federation.controller")

RETRY_INITIAL = 0.2
RETRY_MAX = 5.0


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """One replica's settings (parsed once by fedgate/)."""

    replica: str = "controller"  # unique per replica: the leader record names it
    grpc_address: str = ""  # advertised in the leader record, for operators
    admin_address: str = ""
    debounce: float = 0.1  # seconds from the first change of a burst to the sync
    leader_ttl: int = 5  # seconds: a killed leader is replaced within about this
    elect: bool = True  # False: a single replica that always leads (tests, tools)
    damping: DampingSettings = field(default_factory=DampingSettings)
    write_status: bool = True
    # After a full sync, move every object to the GC's permanent generation: 100,000 endpoints
    # are ~1M long-lived objects whose full collections pause the loop for ~0.1-0.4 s. A
    # process-wide switch, so the controller process (not a library user) turns it on.
    freeze_gc: bool = False


@dataclass(slots=True)
class SyncStats:
    syncs: int = 0
    failures: int = 0
    last_seconds: float = 0.0  # the last sync: liveness + merge + generate + publish
    max_seconds: float = 0.0
    merged: int = 0  # services re-merged by the last sync
    status_writes: int = 0


class Controller:
    def __init__(
        self,
        client: Etcd3Client,
        publisher: SnapshotPublisher,
        *,
        settings: ControllerSettings | None = None,
        seed_policies: Sequence[TrafficPolicy] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = s = settings or ControllerSettings()
        self._client = client
        self._publisher = publisher
        self._seed = tuple(seed_policies) if seed_policies is not None else None
        self._clock = clock or SystemClock()
        self.election: LeaderElection | None = None
        if s.elect:
            record = LeaderRecord(s.replica, s.grpc_address, s.admin_address)
            self.election = LeaderElection(
                client, record, ttl=s.leader_ttl, on_change=self._leadership_changed
            )
        self._owned = ControllerStore(client, fence=self.election)
        self.view = CatalogView()
        self.liveness = Liveness(s.damping)
        self._watcher = EtcdWatcher(client, keys.ROOT)
        self._loaded = False
        self._loaded_event = asyncio.Event()  # the first consistent load is in the view
        self._pending = Changes()
        self._full = True  # re-merge everything at the next sync (after a load)
        self._merged: dict[ServiceKey, MergedService] = {}
        self._admitted: frozenset[str] = frozenset()
        self._fragments = FragmentCache()
        self._current: Snapshot | None = None
        self._dirty = asyncio.Event()
        self._lead_pending = not s.elect  # leader duties to (re)start at the next sync
        self._status_cache: dict[str, bytes] | None = None  # what the status keys hold
        self._status_dirty: set[ServiceKey] = set()
        self._vipless: set[ServiceKey] = set()  # live services whose VIP allocation failed
        self._write_retry_at = 0.0
        self._reported: set[tuple[str, int]] = set()
        self.stats = SyncStats()

    # --- what the admin port and tests read -------------------------------------------------

    def current(self) -> Snapshot | None:
        """The last snapshot generated (what /config shows); None before the first sync."""
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def is_leader(self) -> bool:
        return self.election is None or self.election.is_leader

    def status(self) -> dict[str, Any]:
        leader = self.election.leader if self.election else None
        return {
            "replica": self.settings.replica,
            "leader": self.is_leader,
            "leaderReplica": leader.id
            if leader
            else ""
            if self.election
            else self.settings.replica,
            "term": self.election.term if self.election else 0,
            "revision": self.view.revision,
            "admitted": sorted(self._admitted),
            "liveness": {
                n: {"state": r.state, "losses": r.losses, "since": r.since}
                for n, r in sorted(self.liveness.records().items())
            },
            "commit": self.view.config().commit,
            "syncs": self.stats.syncs,
            "syncFailures": self.stats.failures,
            "lastSyncSeconds": round(self.stats.last_seconds, 6),
            "watchResumes": self._watcher.resumes,
            "watchReloads": self._watcher.reloads,
        }

    # --- the loops ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow etcd, sync on changes, (if elected) lead; runs until cancelled."""
        async with asyncio.TaskGroup() as group:
            if self.election is not None:
                group.create_task(self.election.run(), name="controller:election")
            group.create_task(self._follow(), name="controller:watch")
            while True:
                await self._wait_for_work()
                try:
                    await self._sync_once()
                except StoreError as e:  # the view is in memory: only leader writes can fail
                    self.stats.failures += 1
                    _log.warning("sync failed", error=str(e))

    async def sync(self) -> Snapshot:
        """One load and one sync, without the watch (tools, tests)."""
        if not self._loaded:
            self._apply(await load_prefix(self._client, keys.ROOT))
        return await self._sync_once()

    async def _follow(self) -> None:
        async with contextlib.aclosing(self._watcher.batches()) as batches:
            async for batch in batches:
                self._apply(batch)

    def _apply(self, batch: Loaded | Changed) -> None:
        match batch:
            case Loaded(events=events):
                self.view.reset()
                changes = self.view.apply(events)
                self._full = True
                self._loaded = True
                self._loaded_event.set()
            case Changed(events=events):
                changes = self.view.apply(events)
            case _:
                raise AssertionError(f"unknown batch {batch!r}")
        self._report(changes.problems)
        self._pending.update(changes)
        if changes or self._full:
            self._dirty.set()

    def _leadership_changed(self, leading: bool) -> None:
        self._lead_pending = leading
        self._status_cache = None
        self._dirty.set()

    async def _wait_for_work(self) -> None:
        """Until a change (then debounce) or a timer (damping, write retry) is due."""
        await self._loaded_event.wait()
        while not self._dirty.is_set():
            deadline = self.liveness.next_deadline()
            if self._write_retry_at:
                deadline = min(deadline or self._write_retry_at, self._write_retry_at)
            timeout = None if deadline is None else max(0.05, deadline - self._clock.now() + 0.01)
            if not await wait_event(self._dirty, timeout):
                return  # a timer is due: sync now
        await asyncio.sleep(self.settings.debounce)
        self._dirty.clear()

    # --- one sync -------------------------------------------------------------------------

    async def _sync_once(self) -> Snapshot:
        started = time.perf_counter()
        changes, self._pending = self._pending, Changes()
        self._write_retry_at = 0.0
        now = self._clock.now()
        leading = self.is_leader
        if self._lead_pending or not leading:
            # A follower damps with the leader's records; a new leader starts from them.
            self.liveness.restore(self.view.liveness.values())
        if leading and self._lead_pending and self._seed is not None:
            await self._write_seed(changes)
        admitted = self.liveness.observe(self.view.infos.keys(), now)
        dirty = set(changes.services)
        full = self._full
        if full:
            dirty |= set(self.view.exports) | set(self._merged)
            self._full = False
        flipped = (admitted ^ self._admitted) | changes.clusters
        if flipped:
            dirty |= self.view.services_of(flipped) | {
                k for k, s in self._merged.items() if set(s.clusters) & flipped
            }
        self._admitted = admitted
        if leading:
            dirty |= await self._allocate_vips(dirty)
        for key in dirty:
            self._remerge(key)
        self.stats.merged = len(dirty)
        clusters = [self.view.infos[c] for c in sorted(admitted) if c in self.view.infos]
        snapshot = generate(
            clusters, self._merged.values(), self.view.config(), cache=self._fragments
        )
        if len(self._fragments) > len(self._merged):
            self._fragments.retain(self._merged)
        self._current = snapshot
        if self._publisher.update(snapshot):
            _log.info(
                "config version",
                version=snapshot.version,
                revision=self.view.revision,
                clusters=len(snapshot.clusters),
                services=len(snapshot.services),
                remerged=len(dirty),
                leader=leading,
            )
        self.stats.syncs += 1
        self.stats.last_seconds = time.perf_counter() - started
        self.stats.max_seconds = max(self.stats.max_seconds, self.stats.last_seconds)
        if full and self.settings.freeze_gc:
            gc.collect()
            gc.freeze()
        if leading:
            self._status_dirty |= dirty
            await self._lead(snapshot)
        return snapshot

    def _remerge(self, key: ServiceKey) -> None:
        exports = self.view.exports_of(key, self._admitted)
        if not exports:
            self._merged.pop(key, None)
            return
        merged = merge_service(key, exports, self.view.vips.get(key, ""))
        if self._merged.get(key) != merged:  # keep the old object: its encoding is cached
            self._merged[key] = merged

    async def _allocate_vips(self, dirty: set[ServiceKey]) -> set[ServiceKey]:
        """Allocate VIPs to live services without one; the services whose VIP changed.

        Only services this sync touches can newly lack one (a full sync touches all); those a
        failed allocation left without one are retried (`_vipless`).
        """
        vips, live = self.view.vips, self._admitted
        candidates = dirty | self._vipless
        missing = {
            k
            for k in candidates
            if k not in vips and any(c in live for c in self.view.exports.get(k, ()))
        }
        self._vipless = set()
        if not missing:
            return set()
        try:
            vips = await self._owned.ensure_vips(missing)
        except (StoreError, NotLeaderError) as e:
            _log.warning("VIP allocation failed, retrying", error=str(e))
            self._write_retry_at = self._clock.now() + RETRY_INITIAL
            self._vipless = missing
            return set()
        for key in missing:
            if key in vips:
                self.view.vips[key] = vips[key]  # the watch confirms it shortly
        return missing

    # --- leader duties ------------------------------------------------------------------------

    async def _lead(self, snapshot: Snapshot) -> None:
        try:
            if self._lead_pending:
                self._status_cache = None
                self._lead_pending = False
            if self.settings.write_status:
                await self._write_status(snapshot)
        except NotLeaderError as e:
            _log.warning("lost leadership while writing", error=str(e))
        except StoreError as e:
            self.stats.failures += 1
            self._write_retry_at = self._clock.now() + RETRY_MAX / 2
            _log.warning("leader write failed, retrying", error=str(e))

    async def _write_seed(self, changes: Changes) -> None:
        """Seed /fedgate/config/policies/ (no GitOps commit yet) and take it in at once."""
        try:
            if not await self._owned.write_policies(self._seed or (), seed=True):
                return
            entries = await self._owned.read(keys.CONFIG_PREFIX)
        except (StoreError, NotLeaderError) as e:
            _log.warning("policy seed failed, retrying", error=str(e))
            self._write_retry_at = self._clock.now() + RETRY_INITIAL
            return
        events = [KeyEvent(k, v, self.view.revision) for k, v in entries.items()]
        events += [
            KeyEvent(k, None, self.view.revision)
            for k in self.view.config_entries
            if k not in entries
        ]
        changes.update(self.view.apply(events))

    async def _write_status(self, snapshot: Snapshot) -> None:
        full = self._status_cache is None
        if self._status_cache is None:
            self._status_cache = await self._owned.read(keys.STATUS_PREFIX)
            self._status_dirty = set(self._merged) | {
                keys.parse_service_key(keys.SERVICE_STATUS_PREFIX, k)
                for k in self._status_cache
                if k.startswith(keys.SERVICE_STATUS_PREFIX) and _is_service_key(k)
            }
        cache = self._status_cache
        wanted = liveness_entries(self.liveness.persistable().values())
        puts, deletes = changed_keys(
            {k: v for k, v in cache.items() if k.startswith(keys.CLUSTER_STATUS_PREFIX)},
            wanted,
            keys.CLUSTER_STATUS_PREFIX,
        )
        for key in self._status_dirty:
            status_key = keys.service_status_key(key)
            service = self._merged.get(key)
            if service is None:
                if status_key in cache:
                    deletes.append(status_key)
                continue
            exports = self.view.exports_of(key, service.clusters)
            _, value = service_entry(service, exports)
            if cache.get(status_key) != value:
                puts[status_key] = value
        config = self.view.config()
        leader = self.settings.replica
        config_value = dumps(
            config_status_json(
                snapshot.version,
                config.commit,
                leader,
                self.view.revision,
                self._admitted,
                len(snapshot.services),
                sum(len(s.endpoints) for s in snapshot.services),
                self._clock.now(),
            )
        )
        if full or _version_of(cache.get(keys.CONFIG_STATUS_KEY)) != snapshot.version:
            puts[keys.CONFIG_STATUS_KEY] = config_value
        if puts or deletes:
            self.stats.status_writes += await self._owned.write_status(puts, deletes)
        cache.update(puts)
        for k in deletes:
            cache.pop(k, None)
        self._status_dirty = set()

    def _report(self, problems: list[Problem]) -> None:
        for p in problems:
            if (p.key, p.revision) not in self._reported:
                self._reported.add((p.key, p.revision))
                _log.warning(
                    "skipping malformed key", key=p.key, revision=p.revision, error=p.error
                )
        if len(self._reported) > 10_000:
            self._reported.clear()


def _is_service_key(key: str) -> bool:
    try:
        keys.parse_service_key(keys.SERVICE_STATUS_PREFIX, key)
    except ValueError:
        return False
    return True


def _version_of(raw: bytes | None) -> str:
    if raw is None:
        return ""
    try:
        return str(loads(raw, "config status").get("version", ""))
    except CodecError:
        return ""
