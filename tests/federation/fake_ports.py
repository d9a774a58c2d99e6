"""In-memory fakes of the controller core's ports (federation.controller_ports), no etcd.

`MemoryStore` is a /fedgate/ key space with revisions; agents' writes go in through `publish`
and `expire`. `MemoryFeed` follows it as the etcd watcher does (a `Loaded`, then one `Changed`
per write). `MemoryWriter` leads when the test says so (`gain`, `lose`), fences every write
with the term it started in, as etcd does, and can hold any call at a gate so that a test
acts in the middle of a sync. `MemorySink` keeps what was published.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence

from federation import keys
from federation.catalog import Changed, KeyEvent, Loaded
from federation.errors import NotLeaderError
from federation.vip import allocate
from mesh.codec import cluster_to_json, dumps, export_to_json, policy_to_json
from mesh.model import ClusterInfo, ServiceExport, Snapshot, TrafficPolicy
from mesh.naming import ServiceKey


class MemoryStore:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.revision = 1
        self.queues: list[asyncio.Queue[Loaded | Changed]] = []

    def write(self, puts: Mapping[str, bytes] = {}, deletes: Iterable[str] = ()) -> None:
        """One transaction: every watcher gets one `Changed` batch."""
        gone = [k for k in deletes if k in self.data]
        if not puts and not gone:
            return
        self.revision += 1
        events = [KeyEvent(k, v, self.revision) for k, v in puts.items()]
        events += [KeyEvent(k, None, self.revision) for k in gone]
        self.data.update(puts)
        for k in gone:
            del self.data[k]
        for queue in self.queues:
            queue.put_nowait(Changed(tuple(events), self.revision))

    def loaded(self) -> Loaded:
        events = tuple(KeyEvent(k, v, self.revision) for k, v in sorted(self.data.items()))
        return Loaded(events, self.revision)

    def under(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.data.items() if k.startswith(prefix)}

    # --- what agents do -------------------------------------------------------------------

    def publish(self, info: ClusterInfo, exports: Sequence[ServiceExport]) -> None:
        wanted = {keys.info_key(info.name): dumps(cluster_to_json(info))}
        for x in exports:
            wanted[keys.export_key(info.name, x.key)] = dumps(export_to_json(x))
        stale = [k for k in self.under(keys.cluster_prefix(info.name)) if k not in wanted]
        self.write({k: v for k, v in wanted.items() if self.data.get(k) != v}, stale)

    def expire(self, cluster: str) -> None:
        """The agent's lease ran out: every key of the cluster goes in one revision."""
        self.write(deletes=list(self.under(keys.cluster_prefix(cluster))))

    def vips(self) -> dict[ServiceKey, str]:
        return {
            keys.parse_service_key(keys.VIPS_PREFIX, k): v.decode()
            for k, v in self.under(keys.VIPS_PREFIX).items()
        }


class MemoryFeed:
    """The controller's `EventFeed` over a `MemoryStore`."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self.resumes = 0
        self.reloads = 0

    async def load(self) -> Loaded:
        return self._store.loaded()

    async def batches(self) -> AsyncGenerator[Loaded | Changed, None]:
        queue: asyncio.Queue[Loaded | Changed] = asyncio.Queue()
        self._store.queues.append(queue)  # before the load: no write falls in between
        try:
            yield self._store.loaded()
            while True:
                yield await queue.get()
        finally:
            self._store.queues.remove(queue)

    def lose_history(self) -> None:
        """As after a compaction: the follower loads everything again."""
        self.reloads += 1
        for queue in self._store.queues:
            queue.put_nowait(self._store.loaded())


class MemoryWriter:
    """The controller's `LeaderWriter` over a `MemoryStore`.

    `always=True` is a single replica that always leads (term 0); otherwise the replica leads
    between `gain()` and `lose()`, each gain a new term. A write fails with NotLeaderError
    unless the term it started in still holds when it lands (etcd's fence compare). A call
    named in `gates` waits for its gate (after setting `entered[name]`); one named in `fail`
    raises that error once.
    """

    def __init__(
        self, store: MemoryStore, replica: str = "r1", *, always: bool = False, other: str = ""
    ) -> None:
        self._store = store
        self._replica = replica
        self._other = other  # the leader seen while following ("" none)
        self._always = always
        self._leading = always
        self._term = 0
        self._on_change: Callable[[bool], None] | None = None
        self.terms = 0
        self.calls: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.entered: dict[str, asyncio.Event] = {}
        self.fail: dict[str, Exception] = {}

    # --- leadership ---------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._leading

    @property
    def term(self) -> int:
        return self._term if self._leading else 0

    @property
    def leader_id(self) -> str:
        return self._replica if self._leading else self._other

    async def run(self, on_change: Callable[[bool], None]) -> None:
        self._on_change = on_change
        if not self._always:
            await asyncio.Event().wait()  # until cancelled, like an election

    def gain(self) -> None:
        assert not self._leading
        self.terms += 1
        self._term = 100 + self.terms  # a new leader key, a new create revision
        self._leading = True
        if self._on_change is not None:
            self._on_change(True)

    def lose(self) -> None:
        assert self._leading
        assert not self._always
        self._leading = False
        if self._on_change is not None:
            self._on_change(False)

    def hold(self, name: str) -> asyncio.Event:
        """Make the next calls of `name` wait; set the returned gate to let them go on."""
        self.gates[name] = asyncio.Event()
        self.entered[name] = asyncio.Event()
        return self.gates[name]

    async def _enter(self, name: str) -> int:
        term = self.term  # the fence is built before the transaction is sent
        self.calls.append(name)
        if name in self.gates:
            self.entered[name].set()
            await self.gates[name].wait()
        if name in self.fail:
            raise self.fail.pop(name)
        return term

    def _fence(self, term: int, what: str) -> None:
        if not self._leading or (term != self._term and not self._always):
            raise NotLeaderError(f"{what}: this replica no longer leads (term {term})")

    # --- the leader's writes ------------------------------------------------------------------

    async def ensure_vips(self, services: Iterable[ServiceKey]) -> Mapping[ServiceKey, str]:
        wanted = set(services)
        term = await self._enter("ensure_vips")
        self._fence(term, "allocate VIPs")
        current = self._store.vips()
        missing = sorted(wanted - current.keys())
        new = dict(zip(missing, allocate(len(missing), current.values()), strict=True))
        self._store.write({keys.vip_key(s): v.encode() for s, v in new.items()})
        return {**current, **new}

    async def seed_policies(self, policies: Sequence[TrafficPolicy]) -> Mapping[str, bytes] | None:
        term = await self._enter("seed_policies")
        self._fence(term, "write policies")
        if keys.COMMIT_KEY in self._store.data:
            return None
        wanted = {keys.policy_key(p.key): dumps(policy_to_json(p)) for p in policies}
        stale = [k for k in self._store.under(keys.POLICIES_PREFIX) if k not in wanted]
        puts = {k: v for k, v in wanted.items() if self._store.data.get(k) != v}
        self._store.write(puts, stale)
        return self._store.under(keys.CONFIG_PREFIX)

    async def read_status(self) -> dict[str, bytes]:
        await self._enter("read_status")
        return self._store.under(keys.STATUS_PREFIX)

    async def write_status(self, puts: Mapping[str, bytes], deletes: Sequence[str]) -> int:
        term = await self._enter("write_status")
        self._fence(term, "write status")
        self._store.write(puts, deletes)
        return len(puts) + len(deletes)


class MemorySink:
    """The controller's `SnapshotSink`; `during_update` runs inside the sync that publishes."""

    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []
        self.during_update: Callable[[], None] | None = None

    def update(self, snapshot: Snapshot) -> bool:
        if self.snapshots and self.snapshots[-1].version == snapshot.version:
            return False
        self.snapshots.append(snapshot)
        if self.during_update is not None:
            hook, self.during_update = self.during_update, None
            hook()
        return True
