"""One conformance suite for the controller's ports: the in-memory fakes and the etcd adapters.

test_fed_core.py trusts the fakes of tests/federation/fake_ports.py; this suite holds them to
what the etcd adapters (federation.controller_etcd) do, case by case: the feed loads then
follows every write, a leader allocates the lowest free VIPs and keeps the ones it gave, a
follower writes nothing, the seed yields to GitOps, status keys round-trip.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

import pytest
from etcd3aio import Etcd3Client

from federation import keys
from federation.catalog import Changed, KeyEvent, Loaded
from federation.controller_etcd import EtcdLeaderWriter
from federation.controller_ports import EventFeed, LeaderWriter
from federation.errors import NotLeaderError
from federation.etcd import open_client
from federation.status import LeaderRecord
from federation.store import EtcdWatcher
from mesh.model import ClusterWeight, TrafficPolicy
from mesh.naming import ServiceKey
from tests.etcd_fixture import EtcdServer, reset_etcd
from tests.federation.fake_ports import MemoryFeed, MemoryStore, MemoryWriter
from tests.helpers import until

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

ECHO = ServiceKey("demo", "echo")
WEB = ServiceKey("demo", "web")
POLICY = TrafficPolicy(ECHO, (ClusterWeight("east", 100),))
OTHER = "other"  # the replica that leads while ours follows


class Backend(Protocol):
    async def put(self, key: str, value: bytes) -> None: ...

    async def delete(self, key: str) -> None: ...

    def feed(self) -> EventFeed: ...

    def writer(self, leading: bool) -> contextlib.AbstractAsyncContextManager[LeaderWriter]: ...


class MemoryBackend:
    def __init__(self) -> None:
        self.store = MemoryStore()

    async def put(self, key: str, value: bytes) -> None:
        self.store.write({key: value})

    async def delete(self, key: str) -> None:
        self.store.write(deletes=[key])

    def feed(self) -> EventFeed:
        return MemoryFeed(self.store)

    @contextlib.asynccontextmanager
    async def writer(self, leading: bool) -> AsyncIterator[LeaderWriter]:
        writer = MemoryWriter(self.store, "r1", other="" if leading else OTHER)
        task = asyncio.create_task(writer.run(lambda _: None), name="test:memory-writer")
        await asyncio.sleep(0)  # run() takes the callback
        if leading:
            writer.gain()
        try:
            yield writer
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class EtcdBackend:
    def __init__(self, client: Etcd3Client) -> None:
        self.client = client

    async def put(self, key: str, value: bytes) -> None:
        assert self.client.kv is not None
        await self.client.kv.put(key, value)

    async def delete(self, key: str) -> None:
        assert self.client.kv is not None
        await self.client.kv.delete(key)

    def feed(self) -> EventFeed:
        return EtcdWatcher(self.client, keys.ROOT)

    @contextlib.asynccontextmanager
    async def writer(self, leading: bool) -> AsyncIterator[LeaderWriter]:
        assert self.client.kv is not None
        assert self.client.lease is not None
        squatter = None
        if not leading:  # another replica holds the leader key
            squatter = int((await self.client.lease.grant(30)).ID)
            await self.client.kv.put(keys.LEADER_KEY, LeaderRecord(OTHER).encode(), lease=squatter)
        writer = EtcdLeaderWriter(self.client, replica="r1", record=LeaderRecord("r1"), ttl=2)
        task = asyncio.create_task(writer.run(lambda _: None), name="test:etcd-writer")
        try:
            await until(lambda: writer.is_leader if leading else writer.leader_id == OTHER)
            yield writer
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if squatter is not None:
                await self.client.lease.revoke(squatter)


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.etcd)])
def kind(request: pytest.FixtureRequest) -> EtcdServer | None:
    return request.getfixturevalue("etcd_server") if request.param == "etcd" else None


@pytest.fixture
async def backend(kind: EtcdServer | None) -> AsyncIterator[Backend]:
    if kind is None:
        yield MemoryBackend()
        return
    client = await open_client([kind.endpoint])
    await reset_etcd(client)
    try:
        yield EtcdBackend(client)
    finally:
        await client.close()


async def next_batch(batches: AsyncIterator[Loaded | Changed]) -> Loaded | Changed:
    return await asyncio.wait_for(anext(batches), 5.0)


def values(events: tuple[KeyEvent, ...]) -> dict[str, bytes | None]:
    return {e.key: e.value for e in events}


# --- EventFeed ----------------------------------------------------------------------------


async def test_the_feed_loads_then_follows_every_write(backend: Backend) -> None:
    a, b = keys.info_key("east"), keys.info_key("west")
    await backend.put(a, b"A")
    feed = backend.feed()
    async with contextlib.aclosing(feed.batches()) as batches:
        first = await next_batch(batches)
        assert isinstance(first, Loaded)
        assert values(first.events) == {a: b"A"}
        await backend.put(b, b"B")
        put = await next_batch(batches)
        assert isinstance(put, Changed)
        assert values(put.events) == {b: b"B"}
        assert put.revision > first.revision
        await backend.delete(a)
        deleted = await next_batch(batches)
        assert isinstance(deleted, Changed)
        assert values(deleted.events) == {a: None}
    loaded = await feed.load()
    assert values(loaded.events) == {b: b"B"}
    assert (feed.resumes, feed.reloads) == (0, 0)


# --- LeaderWriter -------------------------------------------------------------------------


async def test_a_leader_allocates_the_lowest_free_vips_and_keeps_them(backend: Backend) -> None:
    async with backend.writer(leading=True) as writer:
        assert writer.is_leader
        assert writer.term > 0
        assert writer.leader_id == "r1"
        assert dict(await writer.ensure_vips([ECHO])) == {ECHO: "10.255.0.1"}
        assert dict(await writer.ensure_vips([WEB, ECHO])) == {
            ECHO: "10.255.0.1",
            WEB: "10.255.0.2",
        }
        loaded = await backend.feed().load()
        assert values(loaded.events)[keys.vip_key(WEB)] == b"10.255.0.2"


async def test_a_follower_writes_nothing(backend: Backend) -> None:
    async with backend.writer(leading=False) as writer:
        assert not writer.is_leader
        assert writer.term == 0
        assert writer.leader_id == OTHER
        with pytest.raises(NotLeaderError):
            await writer.ensure_vips([ECHO])
        with pytest.raises(NotLeaderError):
            await writer.seed_policies([POLICY])
        with pytest.raises(NotLeaderError):
            await writer.write_status({keys.CONFIG_STATUS_KEY: b"{}"}, [])
        loaded = await backend.feed().load()
        assert [e.key for e in loaded.events] in ([], [keys.LEADER_KEY])


async def test_the_seed_is_written_until_gitops_applies_a_commit(backend: Backend) -> None:
    async with backend.writer(leading=True) as writer:
        entries = await writer.seed_policies([POLICY])
        assert entries is not None
        assert set(entries) == {keys.policy_key(ECHO)}
        assert await writer.seed_policies([POLICY]) == entries  # unchanged: nothing to write
        await backend.put(keys.COMMIT_KEY, b"0123abcd")
        assert await writer.seed_policies([]) is None  # GitOps owns the config now
        loaded = await backend.feed().load()
        assert keys.policy_key(ECHO) in values(loaded.events)


async def test_status_keys_round_trip(backend: Backend) -> None:
    echo, config = keys.service_status_key(ECHO), keys.CONFIG_STATUS_KEY
    async with backend.writer(leading=True) as writer:
        assert await writer.read_status() == {}
        assert await writer.write_status({echo: b'{"vip":""}', config: b"{}"}, []) == 2
        assert await writer.read_status() == {echo: b'{"vip":""}', config: b"{}"}
        assert await writer.write_status({}, [echo]) == 1
        assert await writer.read_status() == {config: b"{}"}
