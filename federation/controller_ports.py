"""The controller core's ports: where its view of /fedgate/ comes from, and what the leader writes.

federation.controller depends on these three Protocols, never on etcd or gRPC (an
import-linter contract keeps `etcd3aio` and `grpc` out of both modules), so its loop runs
against in-memory fakes in unit tests. The etcd adapters are in federation.controller_etcd
(`EtcdWatcher` is the feed, `EtcdLeaderWriter` the writer); `federation.server.
SnapshotPublisher` is the sink; fedgate/ wires them.

- `EventFeed`: the catalog, config, VIP and liveness keys as events: a `Loaded` (replace the
  whole view) first, then `Changed` batches in revision order, and `Loaded` again whenever the
  feed lost history. The feed retries its own failures; it never ends.
- `LeaderWriter`: leadership (who leads, the term, a callback at every change) and the leader-
  only writes: VIP allocation, the policy seed, status write-back. Every write is fenced by
  the term, so a replica that lost leadership without noticing gets `NotLeaderError`; any
  other failure is a `StoreError`. Both come from federation.errors.
- `SnapshotSink`: where each generated snapshot goes (the config streams).

Not here: how keys are laid out (federation.keys), decoded (federation.catalog) or fenced
(federation.leader).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from typing import Protocol

from federation.catalog import Changed, Loaded
from mesh.model import Snapshot, TrafficPolicy
from mesh.naming import ServiceKey


class EventFeed(Protocol):
    """Every key under /fedgate/ the controller follows, as `Loaded` and `Changed` batches."""

    @property
    def resumes(self) -> int:
        """Times the feed resumed after a failure (a metric)."""
        ...

    @property
    def reloads(self) -> int:
        """Times the feed lost history and loaded everything again (a metric)."""
        ...

    async def load(self) -> Loaded:
        """One consistent load, without following (a one-shot sync); raises StoreError."""
        ...

    def batches(self) -> AsyncGenerator[Loaded | Changed, None]:
        """`Loaded`, then `Changed` batches for ever, `Loaded` again after lost history."""
        ...


class LeaderWriter(Protocol):
    """Leadership among the replicas, and every write only the leader makes."""

    @property
    def is_leader(self) -> bool: ...

    @property
    def term(self) -> int:
        """The current term while leading, else 0."""
        ...

    @property
    def leader_id(self) -> str:
        """The replica that leads as last seen (this one included); "" if unknown."""
        ...

    async def run(self, on_change: Callable[[bool], None]) -> None:
        """Campaign, lead and follow until cancelled, calling `on_change(leading)` at every
        change; a writer that always leads (a single replica) returns at once."""
        ...

    async def ensure_vips(self, services: Iterable[ServiceKey]) -> Mapping[ServiceKey, str]:
        """Allocate a VIP to every service in `services` that has none; return all VIPs."""
        ...

    async def seed_policies(self, policies: Sequence[TrafficPolicy]) -> Mapping[str, bytes] | None:
        """Write `policies` as the config while no GitOps commit exists; every key under
        /fedgate/config/ afterwards, or None when a commit made the seed moot."""
        ...

    async def read_status(self) -> dict[str, bytes]:
        """Every key under /fedgate/status/ (what the status write-back diffs against)."""
        ...

    async def write_status(self, puts: Mapping[str, bytes], deletes: Sequence[str]) -> int:
        """Put and delete status keys; the number of operations written."""
        ...


class SnapshotSink(Protocol):
    def update(self, snapshot: Snapshot) -> bool:
        """Publish `snapshot`; False when its version is the one already published."""
        ...
