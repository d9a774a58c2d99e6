"""Never push a collapse (issue 15): the collapse guard, Detached clusters and the trust grace.

The guard is pure (federation.collapse) and tested on snapshots; the controller's use of it,
of Detached clusters and of the trust grace runs against the in-memory ports
(tests/federation/fake_ports.py) on a fake clock. An etcd restart is what the memory feed
shows after one: its watch resumed (a new etcd session) and leases may be gone.
"""

from __future__ import annotations

import pytest

from federation import keys
from federation.collapse import CollapseGuard, CollapseSettings
from federation.controller import ControllerSettings
from federation.generate import generate
from federation.liveness import DampingSettings
from federation.merge import merge
from mesh.clock import FakeClock
from mesh.codec import loads
from mesh.model import Snapshot
from mesh.naming import ServiceKey, trust_domain_for
from tests.federation.fed_factories import export, info
from tests.federation.test_fed_core import Replica, east_and_west, replica, running, until

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

ECHO = ServiceKey("demo", "echo")


def snapshot(*clusters: str, endpoints: int = 1) -> Snapshot:
    infos = [info(c) for c in clusters]
    addresses = tuple(f"10.0.0.{i + 1}" for i in range(endpoints))
    exports = [export(c, addresses=addresses) for c in clusters]
    return generate(infos, merge(infos, exports, {}))


# --- the pure guard -----------------------------------------------------------------------


def test_the_first_config_and_pure_additions_are_published_whatever_the_session() -> None:
    guard = CollapseGuard()
    assert guard.check(None, snapshot(), 0.0, 0.0).publish
    assert guard.check(snapshot("east"), snapshot("east", "west"), 0.0, 0.0).publish
    assert guard.held is None


def test_a_young_session_may_not_drop_anything() -> None:
    guard = CollapseGuard(CollapseSettings(min_session=10))
    verdict = guard.check(snapshot("east", "west"), snapshot("east"), 9.9, 100.0)
    assert not verdict.publish
    assert "1 of 2 clusters (west)" in verdict.reason
    assert "9.9 s old" in verdict.reason
    assert guard.held_since == 100.0
    assert guard.check(snapshot("east", "west"), snapshot("east"), 10.0, 101.0).publish
    assert guard.held is None


def test_one_cluster_may_go_but_not_most_of_them_at_once() -> None:
    guard = CollapseGuard(CollapseSettings(min_session=0))
    three = snapshot("east", "north", "west")
    assert guard.check(snapshot("east", "west"), snapshot("east"), 99, 0).publish
    assert guard.check(three, snapshot("east", "west"), 99, 0).publish
    verdict = guard.check(three, snapshot("east"), 99, 0)
    assert not verdict.publish
    assert "more than 50% of the clusters" in verdict.reason
    assert not guard.check(snapshot("east", "west"), snapshot(), 99, 0).publish


def test_a_large_share_of_endpoints_is_held_a_small_count_never() -> None:
    guard = CollapseGuard(CollapseSettings(min_session=0, min_endpoints=10))
    assert guard.check(snapshot("east", endpoints=8), snapshot("east", endpoints=1), 99, 0).publish
    verdict = guard.check(snapshot("east", endpoints=40), snapshot("east", endpoints=12), 99, 0)
    assert not verdict.publish
    assert "28 of 40 endpoints" in verdict.reason
    assert guard.check(
        snapshot("east", endpoints=40), snapshot("east", endpoints=25), 99, 1
    ).publish


def test_a_drop_that_persists_past_confirm_after_is_published() -> None:
    guard = CollapseGuard(CollapseSettings(min_session=0, confirm_after=30))
    three, one = snapshot("east", "north", "west"), snapshot("east")
    assert not guard.check(three, one, 99, 100).publish
    assert not guard.check(three, one, 99, 129.9).publish
    verdict = guard.check(three, one, 99, 130)
    assert verdict.publish
    assert verdict.reason.startswith("confirmed after 30 s")
    assert guard.holds == 1


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_cluster_share"):
        CollapseSettings(max_cluster_share=0)
    with pytest.raises(ValueError, match="min_session"):
        CollapseSettings(min_session=-1)


# --- the controller ---------------------------------------------------------------------------


def settings(*, detach_grace: float = 0, min_session: float = 10) -> ControllerSettings:
    return ControllerSettings(
        replica="r1",
        debounce=0.0,
        damping=DampingSettings(detach_grace=detach_grace),
        collapse=CollapseSettings(min_session=min_session),
        trust_grace=60,
    )


def names(r: Replica) -> list[str]:
    current = r.ctl.current()
    return [] if current is None else [c.name for c in current.clusters]


def config_status(r: Replica) -> dict[str, object]:
    raw = r.store.data.get(keys.CONFIG_STATUS_KEY)
    return {} if raw is None else loads(raw, "config status")


def poke(r: Replica, n: int) -> None:
    """A change of east (a new service) so the controller syncs at the fake clock's time."""
    services = [export("east")] + [export("east", f"s{i}") for i in range(n)]
    r.store.publish(info("east"), services)


async def test_an_etcd_restart_that_loses_every_lease_publishes_no_collapse() -> None:
    # No Detached grace here: the guard alone must stop the collapse.
    clock = FakeClock()
    r = replica(always=True, settings=settings(), clock=clock)
    east_and_west(r.store, ECHO)
    async with running(r):
        await until(lambda: config_status(r).get("clusters") == ["east", "west"])
        clock.advance(60)
        version = r.sink.snapshots[-1].version
        r.feed.resumes += 1  # etcd restarted: the watch resumed, a new session...
        r.store.expire("east")  # ...and both leases were gone
        r.store.expire("west")
        await until(lambda: r.ctl.held() is not None)
        assert names(r) == ["east", "west"]  # the last good config, still served
        assert r.sink.snapshots[-1].version == version
        held = r.ctl.held()
        assert held is not None
        assert "would drop 2 of 2 clusters (east, west)" in held["reason"]
        await until(lambda: bool(config_status(r).get("held")))
        assert config_status(r)["clusters"] == ["east", "west"]
        east_and_west(r.store, ECHO)  # the agents re-register
        await until(lambda: r.ctl.held() is None and not config_status(r).get("held"))
        assert names(r) == ["east", "west"]
        assert r.sink.snapshots[-1].version == version  # nothing was ever pushed


async def test_a_lost_cluster_is_dropped_once_the_session_is_older_than_the_lease_ttl() -> None:
    clock = FakeClock()
    r = replica(always=True, settings=settings(), clock=clock)
    east_and_west(r.store, ECHO)
    async with running(r):
        await until(lambda: names(r) == ["east", "west"])
        r.store.expire("west")  # the session is as young as the replica: held
        await until(lambda: r.ctl.held() is not None)
        clock.advance(10)
        poke(r, 1)
        await until(lambda: names(r) == ["east"])
        assert r.ctl.held() is None


async def test_a_detached_cluster_keeps_its_endpoints_and_roots_then_the_roots_a_grace() -> None:
    clock = FakeClock()
    r = replica(always=True, settings=settings(detach_grace=30, min_session=0), clock=clock)
    east_and_west(r.store, ECHO)
    west = trust_domain_for("west")
    async with running(r):
        await until(lambda: names(r) == ["east", "west"])
        r.store.expire("west")
        await until(lambda: r.ctl.status()["detached"] == ["west"])
        current = r.ctl.current()
        assert current is not None
        assert names(r) == ["east", "west"]
        assert {e.cluster for e in current.services[0].endpoints} == {"east", "west"}
        clock.advance(30)  # the grace is over: west is gone, its roots stay trusted a while
        poke(r, 1)
        await until(lambda: names(r) == ["east"])
        current = r.ctl.current()
        assert current is not None
        assert current.trust_bundle[west] == ("ROOT-west",)
        assert {e.cluster for e in current.services[0].endpoints} == {"east"}
        clock.advance(60)
        poke(r, 2)
        await until(lambda: west not in r.sink.snapshots[-1].trust_bundle)
        assert "west" not in r.ctl.view.departed


async def test_a_reload_that_no_longer_finds_a_cluster_detaches_it() -> None:
    clock = FakeClock()
    r = replica(always=True, settings=settings(detach_grace=30, min_session=0), clock=clock)
    east_and_west(r.store, ECHO)
    async with running(r):
        await until(lambda: names(r) == ["east", "west"])
        # Gone while the feed was not listening (compacted away): only a reload sees it.
        for key in list(r.store.under(keys.cluster_prefix("west"))):
            del r.store.data[key]
        r.feed.lose_history()
        await until(lambda: r.ctl.status()["detached"] == ["west"])
        current = r.ctl.current()
        assert current is not None
        assert {e.cluster for e in current.services[0].endpoints} == {"east", "west"}
