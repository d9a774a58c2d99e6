"""The controller loop, the core: events of /fedgate/ -> merged, versioned snapshot -> sink.

One replica of several. The core takes ports (federation.controller_ports) and imports no etcd
or gRPC (an import-linter contract checks it); the etcd adapters are federation.controller_etcd.
Each replica keeps an in-memory view of /fedgate/ (federation.catalog) fed by an `EventFeed`
(over etcd: one watch, a consistent load, then events, resumed from the last revision on any
member), and serves config streams from its own snapshot. After a batch of changes (debounced:
the first change in a quiet period waits `debounce` seconds, so a burst costs one sync) it
syncs:

    liveness (flap damping) -> [leader: allocate missing VIPs] -> re-merge the services the
    batch touched (pure) -> generate (pure, unchanged services cost nothing) -> publish
    -> [leader: write status back]

Only the leader writes, through the `LeaderWriter`, and every write is fenced by its term:
VIPs, the policy seed (while no GitOps commit exists), cluster liveness records, the MCS
conditions of every service and the config status. Followers compute the same snapshot from
the same state; they take the damping records from the leader (`/fedgate/status/clusters/`)
so every replica routes to the same clusters, and a service whose VIP the leader has not
allocated yet carries an empty VIP until it has. Versions are content hashes, so replicas
agree on them and a proxy can move between replicas without a resend.

The first sync of each term starts the leader duties over: the damping records are taken
from the last leader, the seed is written, every live service without a VIP gets one (not
only the services that sync touches: a service merged while no replica led has none), and the
status is rewritten in full. A term is known by its number, not by a flag, so leadership lost
and regained while a sync is in flight still starts the new term over.

The config (`FederationConfig`: policies, deny list, commit, other GitOps documents) is read
from /fedgate/config/ through the same watch; `seed_policies` (the config directory) are
written there by the leader only while no GitOps commit exists.

A failing etcd never stops the replica from serving its last good snapshot: loads and watches
are retried with backoff, and a failed leader write is logged and retried at the next sync.

The data plane outlives the control plane: a cluster whose lease goes away is Detached, still
routed on its last catalog (federation.liveness, federation.catalog `departed`), for
`damping.detach_grace`. A cluster that leaves routing keeps its trust roots in the bundle for
`trust_grace` more seconds, so connections from it and to it are not cut by a blip. And no
config that collapses (drops too many clusters or endpoints at once, or drops any while this
replica's etcd session is younger than the lease TTL) is published: the last good config is
held, and `status()["held"]` says why (federation.collapse).

Over the 450-line aim: the loop's steps (sync, liveness, merge, VIPs, publish with its collapse
guard and grace periods) act on one state and read best in one place; its ports and status view are
already their own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from federation.aio import wait_event
from federation.api.delta import FragmentCache
from federation.catalog import CatalogView, Changed, Changes, KeyEvent, Loaded, Problem
from federation.collapse import CollapseGuard, CollapseSettings
from federation.controller_ports import EventFeed, LeaderWriter, SnapshotSink
from federation.controller_status import StatusWriteBack
from federation.errors import NotLeaderError, StoreError
from federation.generate import generate
from federation.liveness import DampingSettings, Liveness
from federation.merge import merge_service
from mesh.clock import SystemClock
from mesh.interfaces import Clock
from mesh.model import ClusterInfo, MergedService, Snapshot, TrafficPolicy
from mesh.naming import ServiceKey

_log = structlog.get_logger("fedgate.federation.controller")

RETRY_INITIAL = 0.2
RETRY_MAX = 5.0


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """One replica's settings (parsed once by fedgate/).

    `grpc_address`, `admin_address`, `leader_ttl` and `elect` are read by the adapters that
    build the `LeaderWriter` (federation.controller_etcd.etcd_ports), not by the loop.
    """

    replica: str = "controller"  # unique per replica: the leader record names it
    grpc_address: str = ""  # advertised in the leader record, for operators
    admin_address: str = ""
    debounce: float = 0.1  # seconds from the first change of a burst to the sync
    leader_ttl: int = 5  # seconds: a killed leader is replaced within about this
    elect: bool = True  # False: a single replica that always leads (tests, tools)
    damping: DampingSettings = field(default_factory=DampingSettings)
    collapse: CollapseSettings = field(default_factory=CollapseSettings)
    # Seconds a cluster that left routing keeps its roots in the trust bundle.
    trust_grace: float = 60.0
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
        feed: EventFeed,
        writer: LeaderWriter,
        publisher: SnapshotSink,
        *,
        settings: ControllerSettings | None = None,
        seed_policies: Sequence[TrafficPolicy] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = s = settings or ControllerSettings()
        self._feed = feed
        self._writer = writer
        self._publisher = publisher
        self._seed = tuple(seed_policies) if seed_policies is not None else None
        self._clock = clock or SystemClock()
        self.view = CatalogView()
        self.liveness = Liveness(s.damping)
        self._loaded = False
        self._loaded_event = asyncio.Event()  # the first consistent load is in the view
        self._pending = Changes()
        self._full = True  # re-merge everything at the next sync (after a load)
        self._merged: dict[ServiceKey, MergedService] = {}
        self._admitted: frozenset[str] = frozenset()
        self._fragments = FragmentCache()
        self._current: Snapshot | None = None  # the last snapshot published
        self._guard = CollapseGuard(s.collapse)
        self._session_started = self._clock.now()  # when the view of etcd became continuous
        self._feed_epoch = -1  # resumes + reloads of the feed when the session started
        self._dirty = asyncio.Event()
        self._led_term: int | None = None  # the term the leader duties last started in
        self._seed_due = False  # the seed failed in this term: retry it
        self._status = StatusWriteBack(writer, s.replica)
        self._vipless: set[ServiceKey] = set()  # live services whose VIP allocation failed
        self._write_retry_at = 0.0
        self._reported: set[tuple[str, int]] = set()
        self.stats = SyncStats()

    # --- what the admin port and tests read -------------------------------------------------

    def current(self) -> Snapshot | None:
        """The last snapshot published (what /config shows); None before the first sync."""
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def is_leader(self) -> bool:
        return self._writer.is_leader

    def status(self) -> dict[str, Any]:
        return {
            "replica": self.settings.replica,
            "leader": self.is_leader,
            "leaderReplica": self._writer.leader_id,
            "term": self._writer.term,
            "revision": self.view.revision,
            "admitted": sorted(self._admitted),
            "detached": sorted(self.liveness.detached()),
            "held": self.held(),
            "liveness": {
                n: {"state": r.state, "losses": r.losses, "since": r.since}
                for n, r in sorted(self.liveness.records().items())
            },
            "commit": self.view.config().commit,
            "syncs": self.stats.syncs,
            "syncFailures": self.stats.failures,
            "lastSyncSeconds": round(self.stats.last_seconds, 6),
            "watchResumes": self._feed.resumes,
            "watchReloads": self._feed.reloads,
        }

    def held(self) -> dict[str, Any] | None:
        """The collapse guard's hold of the last good config (None: not holding)."""
        verdict, since = self._guard.held, self._guard.held_since
        if verdict is None or since is None:
            return None
        current = self._current
        return {
            "reason": verdict.reason,
            "since": since,
            "version": current.version if current else "",
            "holds": self._guard.holds,
        }

    # --- the loops ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the feed, sync on changes, (if elected) lead; runs until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(
                self._writer.run(self._leadership_changed), name="controller:election"
            )
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
            self._apply(await self._feed.load())
        return await self._sync_once()

    async def _follow(self) -> None:
        async with contextlib.aclosing(self._feed.batches()) as batches:
            async for batch in batches:
                self._apply(batch)

    def _apply(self, batch: Loaded | Changed) -> None:
        epoch = self._feed.resumes + self._feed.reloads
        if epoch != self._feed_epoch:  # the first batch after a (re)load or a resumed watch
            self._feed_epoch = epoch
            self._session_started = self._clock.now()
        match batch:
            case Loaded(events=events):
                changes = self.view.reload(events)
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
        self._status.forget()
        self._dirty.set()

    async def _wait_for_work(self) -> None:
        """Until a change (then debounce) or a timer (damping, write retry) is due."""
        await self._loaded_event.wait()
        while not self._dirty.is_set():
            deadline = self._next_deadline()
            if self._write_retry_at:
                deadline = min(deadline or self._write_retry_at, self._write_retry_at)
            timeout = None if deadline is None else max(0.05, deadline - self._clock.now() + 0.01)
            if not await wait_event(self._dirty, timeout):
                return  # a timer is due: sync now
        await asyncio.sleep(self.settings.debounce)
        self._dirty.clear()

    def _next_deadline(self) -> float | None:
        times = [t for t in (self.liveness.next_deadline(), self._trust_deadline()) if t]
        if self._guard.held_since is not None:  # a held drop is looked at again
            s = self.settings.collapse
            times.append(
                max(self._session_started + s.min_session, self._guard.held_since + s.confirm_after)
            )
        return min(times) if times else None

    def _trusted(self, now: float) -> list[ClusterInfo]:
        """Clusters out of routing whose roots stay trusted (within `trust_grace`)."""
        out = []
        for name, r in sorted(self.liveness.records().items()):
            if name not in self._admitted and now < r.since + self.settings.trust_grace:
                info = self.view.info_of(name)
                if info is not None:
                    out.append(info)
        return out

    def _trust_deadline(self) -> float | None:
        ends = [
            r.since + self.settings.trust_grace
            for n, r in self.liveness.records().items()
            if n not in self._admitted and r.since + self.settings.trust_grace > self._clock.now()
        ]
        return min(ends) if ends else None

    # --- one sync -------------------------------------------------------------------------

    async def _sync_once(self) -> Snapshot:
        started = time.perf_counter()
        changes, self._pending = self._pending, Changes()
        self._write_retry_at = 0.0
        now = self._clock.now()
        leading = self.is_leader
        # Leader duties of a term start over at its first sync, whatever happened in between.
        new_term = leading and self._writer.term != self._led_term
        if leading:
            self._led_term = self._writer.term
        if new_term or not leading:
            # A follower damps with the leader's records; a new leader starts from them.
            self.liveness.restore(self.view.liveness.values())
        if leading and (new_term or self._seed_due) and self._seed is not None:
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
            dirty |= await self._allocate_vips(dirty, everything=new_term)
        for key in dirty:
            self._remerge(key)
        self.stats.merged = len(dirty)
        trusted = self._trusted(now)
        # A departed cluster's last catalog is kept while it is routed or its roots trusted.
        keep = admitted | {c.name for c in trusted}
        self.view.drop_departed(set(self.view.departed) - keep)
        clusters = [i for i in map(self.view.info_of, sorted(admitted)) if i is not None]
        snapshot = generate(
            clusters,
            self._merged.values(),
            self.view.config(),
            cache=self._fragments,
            trusted=trusted,
        )
        if len(self._fragments) > len(self._merged):
            self._fragments.retain(self._merged)
        verdict = self._guard.check(self._current, snapshot, now - self._session_started, now)
        if not verdict.publish:
            if self._guard.held_since == now:
                _log.warning("holding the last good config", reason=verdict.reason)
            assert self._current is not None  # the first snapshot is never held
            snapshot = self._current
        elif verdict.reason:
            _log.warning("publishing a held drop", reason=verdict.reason)
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
            self._status.touch(dirty)
            await self._lead(snapshot, new_term)
        return snapshot

    def _remerge(self, key: ServiceKey) -> None:
        exports = self.view.exports_of(key, self._admitted)
        if not exports:
            self._merged.pop(key, None)
            return
        merged = merge_service(key, exports, self.view.vips.get(key, ""))
        if self._merged.get(key) != merged:  # keep the old object: its encoding is cached
            self._merged[key] = merged

    async def _allocate_vips(self, dirty: set[ServiceKey], *, everything: bool) -> set[ServiceKey]:
        """Allocate VIPs to live services without one; the services whose VIP changed.

        In a term, only services a sync touches can newly lack one (a full sync touches all);
        those a failed allocation left without one are retried (`_vipless`). The first sync of
        a term looks at `everything`: services merged while no replica led have none.
        """
        vips: Mapping[ServiceKey, str] = self.view.vips
        live = self._admitted
        candidates = set(self.view.exports) if everything else dirty | self._vipless
        missing = {
            k
            for k in candidates
            if k not in vips and any(c in live for c in self.view.exports.get(k, ()))
        }
        self._vipless = set()
        if not missing:
            return set()
        try:
            vips = await self._writer.ensure_vips(missing)
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

    async def _lead(self, snapshot: Snapshot, new_term: bool) -> None:
        try:
            if new_term:
                self._status.forget()
            if self.settings.write_status:
                self.stats.status_writes += await self._status.write(
                    snapshot,
                    self._merged,
                    self.view,
                    self.liveness.persistable().values(),
                    [c.name for c in snapshot.clusters],
                    self._clock.now(),
                    held=self.held(),
                )
        except NotLeaderError as e:
            _log.warning("lost leadership while writing", error=str(e))
        except StoreError as e:
            self.stats.failures += 1
            self._write_retry_at = self._clock.now() + RETRY_MAX / 2
            _log.warning("leader write failed, retrying", error=str(e))

    async def _write_seed(self, changes: Changes) -> None:
        """Seed /fedgate/config/policies/ (no GitOps commit yet) and take it in at once."""
        self._seed_due = False
        try:
            entries = await self._writer.seed_policies(self._seed or ())
        except (StoreError, NotLeaderError) as e:
            _log.warning("policy seed failed, retrying", error=str(e))
            self._write_retry_at = self._clock.now() + RETRY_INITIAL
            self._seed_due = True
            return
        if entries is None:
            return
        events = [KeyEvent(k, v, self.view.revision) for k, v in entries.items()]
        events += [
            KeyEvent(k, None, self.view.revision)
            for k in self.view.config_entries
            if k not in entries
        ]
        changes.update(self.view.apply(events))

    def _report(self, problems: list[Problem]) -> None:
        for p in problems:
            if (p.key, p.revision) not in self._reported:
                self._reported.add((p.key, p.revision))
                _log.warning(
                    "skipping malformed key", key=p.key, revision=p.revision, error=p.error
                )
        if len(self._reported) > 10_000:
            self._reported.clear()
