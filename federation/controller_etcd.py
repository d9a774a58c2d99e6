"""The controller core's etcd adapters, and the one call that wires a controller over etcd.

- The `EventFeed` is `federation.store.EtcdWatcher` on /fedgate/ (a paged consistent load,
  then the watch, resumed on any member).
- `EtcdLeaderWriter` is the `LeaderWriter`: leadership from `federation.leader.LeaderElection`
  (or none: a single replica that always leads, unfenced) and the writes of
  `federation.owned.ControllerStore`, fenced by the election's term.
- `etcd_ports` builds both from one client and the controller's settings; `etcd_controller`
  builds the whole controller (tools and tests; fedgate/ wires the ports itself, since the
  GitOps sync shares the election).

The loop itself (federation.controller) knows none of this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from etcd3aio import Etcd3Client

from federation import keys
from federation.controller import Controller, ControllerSettings
from federation.controller_ports import SnapshotSink
from federation.leader import LeaderElection
from federation.owned import ControllerStore
from federation.status import LeaderRecord
from federation.store import DEFAULT_TIMEOUT, EtcdWatcher
from mesh.interfaces import Clock
from mesh.model import TrafficPolicy
from mesh.naming import ServiceKey


class EtcdLeaderWriter:
    """Leadership and the leader's writes over etcd (federation.controller_ports.LeaderWriter).

    With `election=None` this replica always leads and its writes carry no fence.
    """

    def __init__(
        self,
        client: Etcd3Client,
        *,
        replica: str,
        record: LeaderRecord | None = None,
        ttl: int = 5,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._replica = replica
        self._on_change: Callable[[bool], None] | None = None
        self.election: LeaderElection | None = None
        if record is not None:
            self.election = LeaderElection(client, record, ttl=ttl, on_change=self._changed)
        self._store = ControllerStore(client, fence=self.election, timeout=timeout)

    @property
    def is_leader(self) -> bool:
        return self.election is None or self.election.is_leader

    @property
    def term(self) -> int:
        return self.election.term if self.election is not None else 0

    @property
    def leader_id(self) -> str:
        if self.election is None:
            return self._replica
        return self.election.leader.id if self.election.leader is not None else ""

    async def run(self, on_change: Callable[[bool], None]) -> None:
        self._on_change = on_change
        if self.election is not None:
            await self.election.run()

    def _changed(self, leading: bool) -> None:
        if self._on_change is not None:
            self._on_change(leading)

    async def ensure_vips(self, services: Iterable[ServiceKey]) -> Mapping[ServiceKey, str]:
        return await self._store.ensure_vips(services)

    async def seed_policies(self, policies: Sequence[TrafficPolicy]) -> Mapping[str, bytes] | None:
        if not await self._store.write_policies(policies, seed=True):
            return None
        return await self._store.read(keys.CONFIG_PREFIX)

    async def read_status(self) -> dict[str, bytes]:
        return await self._store.read(keys.STATUS_PREFIX)

    async def write_status(self, puts: Mapping[str, bytes], deletes: Sequence[str]) -> int:
        return await self._store.write_status(puts, deletes)


def etcd_ports(
    client: Etcd3Client, settings: ControllerSettings
) -> tuple[EtcdWatcher, EtcdLeaderWriter]:
    """The feed and the writer of one replica (elected unless `settings.elect` is False)."""
    record = None
    if settings.elect:
        record = LeaderRecord(settings.replica, settings.grpc_address, settings.admin_address)
    writer = EtcdLeaderWriter(
        client, replica=settings.replica, record=record, ttl=settings.leader_ttl
    )
    return EtcdWatcher(client, keys.ROOT), writer


def etcd_controller(
    client: Etcd3Client,
    publisher: SnapshotSink,
    *,
    settings: ControllerSettings | None = None,
    seed_policies: Sequence[TrafficPolicy] | None = None,
    clock: Clock | None = None,
) -> Controller:
    """A controller following and writing etcd through `client`."""
    settings = settings or ControllerSettings()
    feed, writer = etcd_ports(client, settings)
    return Controller(
        feed, writer, publisher, settings=settings, seed_policies=seed_policies, clock=clock
    )
