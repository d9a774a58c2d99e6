"""The controller loop against in-memory ports (tests/federation/fake_ports.py): no etcd.

What the etcd tests cannot pin down: leadership that changes hands while a sync is running,
and a replica that becomes leader after the services were merged (issue 15: "a service
exported in the first seconds after `rig up` never resolves").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from federation import keys
from federation.collapse import CollapseSettings
from federation.controller import Controller, ControllerSettings
from federation.controller_ports import EventFeed, LeaderWriter, SnapshotSink
from federation.errors import StoreError
from federation.liveness import SUPPRESSED, ClusterLiveness
from federation.status import liveness_entries
from mesh.clock import FakeClock
from mesh.codec import loads
from mesh.model import ClusterWeight, TrafficPolicy
from mesh.naming import ServiceKey
from tests import helpers
from tests.federation.fake_ports import MemoryFeed, MemorySink, MemoryStore, MemoryWriter
from tests.federation.fed_factories import export, info

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

ECHO = ServiceKey("demo", "echo")
WEB = ServiceKey("demo", "web")
API = ServiceKey("shop", "api")
POLICY = TrafficPolicy(ECHO, (ClusterWeight("east", 80), ClusterWeight("west", 20)))


@dataclass
class Replica:
    store: MemoryStore
    feed: MemoryFeed
    writer: MemoryWriter
    sink: MemorySink
    ctl: Controller

    def vip(self, key: ServiceKey) -> str | None:
        """The service's VIP in the last snapshot ("" none yet); None if it is not merged."""
        snapshot = self.ctl.current()
        service = snapshot.service(key) if snapshot is not None else None
        return service.vip if service is not None else None

    def status(self, key: ServiceKey) -> dict[str, Any] | None:
        raw = self.store.data.get(keys.service_status_key(key))
        return None if raw is None else loads(raw, "service status")


def replica(
    store: MemoryStore | None = None,
    *,
    always: bool = False,
    seed: tuple[TrafficPolicy, ...] | None = None,
    settings: ControllerSettings | None = None,
    clock: FakeClock | None = None,
) -> Replica:
    store = store or MemoryStore()
    feed, writer, sink = MemoryFeed(store), MemoryWriter(store, always=always), MemorySink()
    # The fakes are the ports (a mypy check of this file would say if they drifted).
    ports: tuple[EventFeed, LeaderWriter, SnapshotSink] = (feed, writer, sink)
    # The fake clock stands still, so every etcd session would stay "young" for the collapse
    # guard: these tests are about other things (tests/federation/test_fed_collapse.py).
    settings = settings or ControllerSettings(
        replica="r1", debounce=0.0, collapse=CollapseSettings(min_session=0)
    )
    ctl = Controller(*ports, settings=settings, seed_policies=seed, clock=clock or FakeClock())
    return Replica(store, feed, writer, sink, ctl)


@contextlib.asynccontextmanager
async def running(r: Replica) -> AsyncIterator[Replica]:
    task = asyncio.create_task(r.ctl.run(), name="test:controller-core")
    try:
        yield r
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# In memory a condition takes a few loop turns: poll often (tests.helpers' one poller).
until = functools.partial(helpers.until, interval=0.001)


async def settle() -> None:
    """Enough loop turns for any pending sync to run (to check that nothing more happens)."""
    for _ in range(200):
        await asyncio.sleep(0)


def east_and_west(store: MemoryStore, *services: ServiceKey) -> None:
    store.publish(info("east"), [export("east", k.name, k.namespace) for k in services])
    store.publish(
        info("west"),
        [export("west", k.name, k.namespace, addresses=("10.1.0.1",)) for k in services],
    )


@contextlib.asynccontextmanager
async def leading_with_echo(
    seed: tuple[TrafficPolicy, ...] | None = None,
) -> AsyncIterator[Replica]:
    """A running replica that leads, with echo merged, its VIP allocated and its status written."""
    r = replica(seed=seed)
    east_and_west(r.store, ECHO)
    r.writer.gain()
    async with running(r):
        await until(lambda: bool(r.vip(ECHO)) and r.status(ECHO) is not None)
        yield r


async def export_web_held_in(r: Replica, call: str) -> asyncio.Event:
    """Export web and hold the sync that follows inside the writer's `call`; set the gate to
    let that call go on (later calls are not held)."""
    gate = r.writer.hold(call)
    east_and_west(r.store, ECHO, WEB)
    await r.writer.entered[call].wait()
    del r.writer.gates[call]
    return gate


# --- one replica --------------------------------------------------------------------------


async def test_a_follower_publishes_the_merged_view_and_writes_nothing() -> None:
    r = replica()
    east_and_west(r.store, ECHO)
    async with running(r):
        await until(lambda: r.vip(ECHO) is not None)
        snapshot = r.ctl.current()
        assert snapshot is not None
        assert [c.name for c in snapshot.clusters] == ["east", "west"]
        echo = snapshot.service(ECHO)
        assert echo is not None
        assert echo.vip == ""  # no leader has allocated one yet
        assert [e.address for e in echo.endpoints] == ["10.0.0.1", "10.1.0.1"]
        await settle()
        assert r.writer.calls == []
        assert r.store.under(keys.STATUS_PREFIX) == {}
        status = r.ctl.status()
        assert (status["leader"], status["leaderReplica"], status["term"]) == (False, "", 0)


async def test_a_single_replica_allocates_vips_and_writes_status_once() -> None:
    r = replica(always=True)
    east_and_west(r.store, ECHO, WEB)
    async with running(r):
        await until(lambda: bool(r.vip(ECHO) and r.vip(WEB)) and r.status(WEB) is not None)
        assert {r.vip(ECHO), r.vip(WEB)} == {"10.255.0.1", "10.255.0.2"}
        assert r.store.vips() == {ECHO: r.vip(ECHO), WEB: r.vip(WEB)}
        echo = r.status(ECHO)
        assert echo is not None
        assert echo["vip"] == r.vip(ECHO)
        assert [c["type"] for c in echo["conditions"]] == ["Valid"]
        assert set(r.store.under(keys.CLUSTER_STATUS_PREFIX)) == {
            keys.cluster_status_key("east"),
            keys.cluster_status_key("west"),
        }
        assert keys.CONFIG_STATUS_KEY in r.store.data
        # The controller's own writes come back through the feed; they change nothing more.
        await settle()
        writes = r.writer.calls.count("write_status")
        await settle()
        assert r.writer.calls.count("write_status") == writes
        assert r.ctl.status()["leaderReplica"] == "r1"


async def test_one_shot_sync_without_the_feed_loop() -> None:
    r = replica(always=True)
    east_and_west(r.store, ECHO)
    snapshot = await r.ctl.sync()
    echo = snapshot.service(ECHO)
    assert echo is not None
    assert echo.vip == "10.255.0.1"
    assert r.status(ECHO) is not None


async def test_a_lost_cluster_leaves_routing_and_the_leader_records_it() -> None:
    clock = FakeClock()
    r = replica(always=True, clock=clock)
    east_and_west(r.store, ECHO)
    async with running(r):
        await until(lambda: r.ctl.current() is not None and r.status(ECHO) is not None)
        r.store.expire("west")

        def west_is(state: str) -> bool:
            raw = r.store.data.get(keys.cluster_status_key("west"))
            return raw is not None and loads(raw, "liveness")["state"] == state

        await until(lambda: west_is("Detached"))  # the agent is gone, not the cluster
        snapshot = r.ctl.current()
        assert snapshot is not None
        assert [c.name for c in snapshot.clusters] == ["east", "west"]
        assert r.status(ECHO)["endpoints"] == {"east": 1, "west": 1}  # type: ignore[index]
        clock.advance(r.ctl.settings.damping.detach_grace)
        r.store.publish(info("east"), [export("east", "echo", "demo"), export("east", "web")])
        await until(lambda: west_is("Down"))
        snapshot = r.ctl.current()
        assert snapshot is not None
        assert [c.name for c in snapshot.clusters] == ["east"]
        status = r.status(ECHO)
        assert status is not None
        assert status["endpoints"] == {"east": 1}


async def test_lost_history_replaces_the_whole_view() -> None:
    r = replica()
    east_and_west(r.store, ECHO, WEB)
    async with running(r):
        await until(lambda: r.vip(WEB) is not None)
        # Deleted while the feed was not listening (compacted away): only a reload sees it.
        del r.store.data[keys.export_key("east", WEB)]
        del r.store.data[keys.export_key("west", WEB)]
        r.feed.lose_history()
        await until(lambda: r.vip(WEB) is None)
        assert r.vip(ECHO) == ""
        assert r.ctl.status()["watchReloads"] == 1


async def test_the_seed_is_taken_in_at_once_and_never_overrides_gitops() -> None:
    r = replica(always=True, seed=(POLICY,))
    east_and_west(r.store, ECHO)
    async with running(r):
        await until(lambda: (s := r.ctl.current()) is not None and s.policies == (POLICY,))
        assert keys.policy_key(ECHO) in r.store.data

    gitops = replica(always=True, seed=(POLICY,))
    gitops.store.write({keys.COMMIT_KEY: b"0123abcd"})
    east_and_west(gitops.store, ECHO)
    snapshot = await gitops.ctl.sync()
    assert snapshot.policies == ()
    assert gitops.store.under(keys.POLICIES_PREFIX) == {}


async def test_a_failed_vip_allocation_is_retried() -> None:
    r = replica(always=True)
    r.writer.fail["ensure_vips"] = StoreError("etcd unavailable")
    east_and_west(r.store, ECHO)
    async with running(r):
        await until(lambda: r.vip(ECHO) == "10.255.0.1")  # at the next sync
        assert r.writer.calls.count("ensure_vips") == 2


# --- leadership changes -------------------------------------------------------------------


async def test_a_new_leader_allocates_vips_to_services_merged_before_it_led() -> None:
    """Issue 15: services exported before a leader was elected kept no VIP for ever."""
    r = replica()
    east_and_west(r.store, ECHO, WEB)
    async with running(r):
        await until(lambda: r.vip(ECHO) == "" and r.vip(WEB) == "")
        await settle()
        r.writer.gain()  # no catalog change comes with it
        await until(lambda: bool(r.vip(ECHO) and r.vip(WEB)))
        assert r.store.vips() == {ECHO: r.vip(ECHO), WEB: r.vip(WEB)}
        await until(lambda: (s := r.status(WEB)) is not None and s["vip"] == r.vip(WEB))
        echo = r.status(ECHO)
        assert echo is not None
        assert echo["vip"] == r.vip(ECHO)


async def test_leadership_gained_in_the_middle_of_a_follower_sync() -> None:
    r = replica()
    east_and_west(r.store, ECHO, WEB)
    r.sink.during_update = r.writer.gain  # while the first (follower) sync publishes
    async with running(r):
        await until(lambda: bool(r.vip(ECHO) and r.vip(WEB)))
        await until(lambda: r.status(ECHO) is not None and r.status(WEB) is not None)
        assert r.sink.snapshots[0].services[0].vip == ""  # the follower sync's snapshot


async def test_leadership_lost_in_the_middle_of_a_vip_allocation() -> None:
    async with leading_with_echo() as r:
        gate = await export_web_held_in(r, "ensure_vips")
        r.writer.lose()  # another replica leads before the allocation lands: fenced out
        gate.set()
        # The sync still publishes the merged view, without the VIP it could not allocate.
        await until(lambda: r.vip(WEB) == "")
        await settle()
        # As a follower it keeps following, and writes nothing at all.
        writes = len(r.writer.calls)
        east_and_west(r.store, ECHO, WEB, API)
        await until(lambda: r.vip(API) == "")
        await settle()
        assert r.writer.calls[writes:] == []
        assert r.status(WEB) is None
        assert WEB not in r.store.vips()
        # Leading again, it allocates what is missing and writes every status.
        r.writer.gain()
        await until(lambda: bool(r.vip(WEB) and r.vip(API)))
        await until(lambda: r.status(API) is not None and r.status(WEB) is not None)
        assert r.store.vips() == {ECHO: "10.255.0.1", WEB: r.vip(WEB), API: r.vip(API)}


async def test_leadership_lost_in_the_middle_of_a_status_write() -> None:
    async with leading_with_echo() as r:
        gate = await export_web_held_in(r, "write_status")
        r.writer.lose()
        gate.set()
        await settle()
        assert r.status(WEB) is None  # the write was fenced out
        assert r.vip(WEB)  # allocated before the loss
        reads = r.writer.calls.count("read_status")
        r.writer.gain()
        await until(lambda: r.status(WEB) is not None)
        assert r.writer.calls.count("read_status") == reads + 1  # a new term reads afresh


async def test_leadership_lost_and_regained_within_one_sync_starts_the_new_term_over() -> None:
    async with leading_with_echo(seed=(POLICY,)) as r:
        assert r.writer.calls.count("seed_policies") == 1
        gate = await export_web_held_in(r, "ensure_vips")
        r.writer.lose()
        r.writer.gain()  # a new term begins while the old term's allocation is in flight
        gate.set()
        await until(lambda: bool(r.vip(WEB)) and r.status(WEB) is not None)
        # The new term's first sync did the new-leader duties, seed included.
        await until(lambda: r.writer.calls.count("seed_policies") == 2)
        assert r.ctl.status()["term"] == r.writer.term


async def test_followers_and_a_new_leader_damp_with_the_last_leaders_records() -> None:
    r = replica()
    now = FakeClock().now()  # the replica's clock
    held = ClusterLiveness("west", SUPPRESSED, 5000.0, now, now, losses=3)
    r.store.write(liveness_entries([held]))  # the last leader held west out
    east_and_west(r.store, ECHO)
    async with running(r):
        await until(lambda: r.vip(ECHO) == "")
        snapshot = r.ctl.current()
        assert snapshot is not None
        assert [c.name for c in snapshot.clusters] == ["east"]
        r.writer.gain()
        await until(lambda: bool(r.vip(ECHO)) and r.status(ECHO) is not None)
        snapshot = r.ctl.current()
        assert snapshot is not None
        assert [c.name for c in snapshot.clusters] == ["east"]  # still held out
        record = loads(r.store.data[keys.cluster_status_key("west")], "liveness")
        assert (record["state"], record["losses"]) == (SUPPRESSED, 3)


async def test_a_reload_in_the_middle_of_a_leader_sync() -> None:
    async with leading_with_echo() as r:
        gate = await export_web_held_in(r, "ensure_vips")
        # While the allocation is in flight, the feed loses history; echo is gone by then.
        del r.store.data[keys.export_key("east", ECHO)]
        del r.store.data[keys.export_key("west", ECHO)]
        r.feed.lose_history()
        gate.set()
        await until(lambda: r.vip(ECHO) is None and bool(r.vip(WEB)))
        await until(lambda: r.status(ECHO) is None and r.status(WEB) is not None)
