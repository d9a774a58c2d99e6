"""Leader election and write fencing against a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from etcd3aio import Etcd3Client

from federation import keys
from federation.errors import NotLeaderError
from federation.etcd import open_client
from federation.leader import LeaderElection
from federation.owned import ControllerStore
from federation.status import LeaderRecord
from mesh.naming import ServiceKey
from tests.etcd_fixture import EtcdServer
from tests.helpers import until

pytestmark = [pytest.mark.etcd, pytest.mark.usefixtures("no_leaked_tasks")]

TTL = 2


class Replica:
    """One election on its own etcd client, as one controller process would have."""

    def __init__(self, client: Etcd3Client, name: str) -> None:
        self.client = client
        self.changes: list[bool] = []
        self.election = LeaderElection(
            client, LeaderRecord(name), ttl=TTL, on_change=self.changes.append, retry=0.1
        )
        self.task = asyncio.create_task(self.election.run(), name=f"test:election:{name}")

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def crash(self) -> None:
        """Die without resigning: the lease (and the key) expire after the TTL."""
        await self.client.close()
        await self.stop()


@pytest.fixture
async def replicas(
    etcd: Etcd3Client, etcd_server: EtcdServer
) -> AsyncIterator[tuple[Replica, Replica]]:
    clients = [await open_client([etcd_server.endpoint]) for _ in range(2)]
    pair = (Replica(clients[0], "c0"), Replica(clients[1], "c1"))
    try:
        yield pair
    finally:
        for r in pair:
            await r.stop()
        for c in clients:
            await c.close()


def leaders(pair: tuple[Replica, Replica]) -> list[str]:
    return [r.election.identity for r in pair if r.election.is_leader]


async def leader_key(etcd: Etcd3Client) -> LeaderRecord | None:
    assert etcd.kv is not None
    found = await etcd.kv.get(keys.LEADER_KEY)
    return LeaderRecord.decode(bytes(found.kvs[0].value)) if found.kvs else None


async def test_exactly_one_replica_leads_and_the_other_knows_who(
    etcd: Etcd3Client, replicas: tuple[Replica, Replica]
) -> None:
    await until(lambda: len(leaders(replicas)) == 1)
    await asyncio.sleep(0.3)
    assert len(leaders(replicas)) == 1
    leader = next(r for r in replicas if r.election.is_leader)
    follower = next(r for r in replicas if not r.election.is_leader)
    record = await leader_key(etcd)
    assert record is not None
    assert record.id == leader.election.identity
    assert follower.election.leader is not None
    assert follower.election.leader.id == leader.election.identity
    assert leader.changes == [True]
    assert follower.changes == []


async def test_a_crashed_leader_is_replaced_within_its_lease(
    etcd: Etcd3Client, replicas: tuple[Replica, Replica]
) -> None:
    await until(lambda: len(leaders(replicas)) == 1)
    old = next(r for r in replicas if r.election.is_leader)
    other = next(r for r in replicas if r is not old)
    await old.crash()
    crashed = time.monotonic()
    await until(lambda: other.election.is_leader, within=TTL + 3)
    # TTL, plus etcd's expiry sweep (500 ms) and scheduling slack.
    assert time.monotonic() - crashed < TTL + 1.5
    record = await leader_key(etcd)
    assert record is not None
    assert record.id == other.election.identity


async def test_a_resigning_leader_hands_over_at_once(
    replicas: tuple[Replica, Replica],
) -> None:
    await until(lambda: len(leaders(replicas)) == 1)
    old = next(r for r in replicas if r.election.is_leader)
    other = next(r for r in replicas if r is not old)
    await old.stop()  # a clean stop resigns
    stopped = time.monotonic()
    await until(lambda: other.election.is_leader, within=TTL)
    assert time.monotonic() - stopped < 1.0


async def test_a_deposed_leader_cannot_write(
    etcd: Etcd3Client, replicas: tuple[Replica, Replica]
) -> None:
    await until(lambda: len(leaders(replicas)) == 1)
    old = next(r for r in replicas if r.election.is_leader)
    other = next(r for r in replicas if r is not old)
    store = ControllerStore(old.client, fence=old.election)
    assert await store.ensure_vips([ServiceKey("demo", "a")])
    # etcd forgets the leader's lease (as if it had been paused past the TTL), and the other
    # replica takes over, while the old one has not noticed yet.
    assert etcd.lease is not None
    term = old.election.term
    assert old.election._lease is not None
    await etcd.lease.revoke(old.election._lease)
    await until(lambda: other.election.is_leader, within=TTL + 2)
    if old.election.is_leader:  # still believes it leads: the fence must stop its write
        with pytest.raises(NotLeaderError):
            await ControllerStore(old.client, fence=_Stale(old.election, term)).ensure_vips(
                [ServiceKey("demo", "b")]
            )
    with pytest.raises(NotLeaderError):
        await ControllerStore(old.client, fence=_Stale(old.election, term)).write_status(
            {keys.CONFIG_STATUS_KEY: b"{}"}, []
        )
    assert set((await ControllerStore(etcd).vips()).keys()) == {ServiceKey("demo", "a")}


class _Stale:
    """The old leader's fence at its old term, as a replica that missed its deposition has."""

    def __init__(self, election: LeaderElection, term: int) -> None:
        self._election = election
        self._term = term
        self.stepped_down = False

    def fence(self) -> list[object]:
        assert self._election._client.kv is not None
        return [self._election._client.kv.txn_compare_create_revision(keys.LEADER_KEY, self._term)]

    def step_down(self, reason: str) -> None:
        self.stepped_down = True
