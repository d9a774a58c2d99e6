"""Route table: simulate calls through a table built from a hand-made snapshot."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh.errors import NoRouteError
from mesh.naming import ServiceKey
from sidecar.routes import Egress, Local, Remote, RouteTable
from tests.sidecar.conftest import PAYMENTS, cluster, endpoint, snapshot

VIP = "127.77.0.10"
EAST_EPS = (endpoint("east", "10.1.0.5", "payments-0"), endpoint("east", "10.1.0.6", "payments-1"))
WEST_EPS = (
    endpoint("west", "10.2.0.5", "payments-w0"),
    endpoint("west", "10.2.0.6", "payments-w1", sa="payments-v2"),
)


def table(**kw: object) -> RouteTable:
    defaults: dict[str, object] = {
        "clusters": (cluster("east", ("127.0.0.1", 15443)), cluster("west", ("127.0.0.1", 25443))),
        "endpoints": EAST_EPS + WEST_EPS,
    }
    defaults.update(kw)
    return RouteTable.build(snapshot(**defaults), "east")  # type: ignore[arg-type]


def simulate(t: RouteTable, n: int = 10_000, seed: int = 7) -> Counter[str]:
    route = t.lookup(VIP, 8080)
    assert route is not None
    rng = random.Random(seed)
    seen: Counter[str] = Counter()
    for _ in range(n):
        d = route.decide(rng)
        seen[d.endpoint.cluster if isinstance(d, Local) else d.cluster] += 1
    return seen


def test_weights_80_20_local_remote_hold_over_10000_calls() -> None:
    seen = simulate(table(weights=(("local", 80), ("remote", 20))))
    assert seen["east"] + seen["west"] == 10_000
    assert abs(seen["east"] / 10_000 - 0.8) < 0.02
    assert abs(seen["west"] / 10_000 - 0.2) < 0.02


def test_local_decision_goes_to_an_endpoint_and_expects_its_identity() -> None:
    route = table(weights=(("local", 100),)).lookup(VIP, 8080)
    assert route is not None
    rng = random.Random(1)
    picked: Counter[str] = Counter()
    for _ in range(1000):
        d = route.decide(rng)
        assert isinstance(d, Local)
        assert d.endpoint in EAST_EPS
        assert d.identities == frozenset({d.endpoint.identity})
        picked[d.endpoint.pod] += 1
    assert set(picked) == {"payments-0", "payments-1"}


def test_remote_decision_uses_the_local_gateway_and_remote_identities() -> None:
    route = table(weights=(("west", 1),)).lookup(VIP, 8080)
    assert route is not None
    d = route.decide(random.Random(1))
    assert isinstance(d, Remote)
    assert d.cluster == "west"
    assert d.egress == Egress("127.0.0.1", 15443)  # east's gateway, not west's
    assert d.identities == frozenset(e.identity for e in WEST_EPS)


def test_a_cluster_without_endpoints_gets_nothing() -> None:
    t = table(
        clusters=(cluster("east"), cluster("west"), cluster("north")),
        weights=(("local", 50), ("west", 25), ("north", 25)),
    )
    seen = simulate(t)
    assert "north" not in seen
    assert abs(seen["east"] / 10_000 - 50 / 75) < 0.02


def test_without_a_local_gateway_remote_endpoints_are_unreachable() -> None:
    t = table(clusters=(cluster("east", None), cluster("west")), weights=(("remote", 100),))
    assert simulate(t, 500) == Counter({"east": 500})


def test_only_remote_endpoints_and_no_gateway_means_no_route() -> None:
    t = table(clusters=(cluster("east", None), cluster("west")), endpoints=WEST_EPS)
    route = t.lookup(VIP, 8080)
    assert route is not None
    with pytest.raises(NoRouteError):
        route.decide(random.Random(1))


def test_no_endpoints_anywhere_means_no_route() -> None:
    route = table(endpoints=()).lookup(VIP, 8080)
    assert route is not None
    with pytest.raises(NoRouteError):
        route.decide(random.Random(1))


def test_non_vip_destinations_are_passthrough() -> None:
    t = table()
    assert t.lookup("10.1.0.5", 8080) is None
    assert not t.is_vip("10.1.0.5")
    # A VIP with a port the service does not declare is not passthrough: it is refused.
    assert t.lookup(VIP, 9999) is None
    assert t.is_vip(VIP)


def test_service_without_vip_is_served_but_not_routable() -> None:
    t = table(vip="")
    assert t.lookup("", 8080) is None
    assert t.vip_of(PAYMENTS) is None
    assert t.serves(PAYMENTS, 8080)
    assert not t.serves(PAYMENTS, 8081)
    assert not t.serves(ServiceKey("shop", "cart"), 8080)


def test_without_policy_endpoints_are_equally_likely() -> None:
    seen = simulate(table())
    assert abs(seen["east"] / 10_000 - 0.5) < 0.02


def test_describe_lists_effective_weights() -> None:
    [row] = table(weights=(("local", 80), ("remote", 20))).describe()
    assert row["service"] == "payments.shop.svc.clusterset.local"
    assert row["weights"] == {"east": 0.8, "west": 0.2}
    assert row["endpoints"] == {"east": 2, "west": 2}
