"""The MCS merge: namespace sameness, port union, conflicts, liveness, order independence."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from federation.merge import export_conditions, merge
from mesh.model import ServiceExport, ServicePort
from mesh.naming import ServiceKey
from tests.federation.fed_factories import HTTP, endpoint, export, info

ECHO = ServiceKey("demo", "echo")
GRPC = ServicePort("grpc", 9090, "GRPC")


def only(services: tuple[object, ...]) -> object:
    assert len(services) == 1
    return services[0]


def test_namespace_sameness_merges_one_service_across_clusters() -> None:
    services = merge(
        [info("east"), info("west")],
        [export("east", addresses=("10.0.0.1",)), export("west", addresses=("10.1.0.1",))],
        {ECHO: "10.255.0.1"},
    )
    [echo] = services
    assert echo.key == ECHO
    assert echo.vip == "10.255.0.1"
    assert echo.clusters == ("east", "west")
    assert echo.ports == (HTTP,)
    assert {e.cluster for e in echo.endpoints} == {"east", "west"}
    assert [c.type for c in echo.conditions] == ["Valid"]


def test_same_name_in_other_namespace_is_another_service() -> None:
    services = merge(
        [info("east"), info("west")],
        [export("east", namespace="demo"), export("west", namespace="prod")],
        {},
    )
    assert [s.key for s in services] == [ServiceKey("demo", "echo"), ServiceKey("prod", "echo")]
    assert [s.clusters for s in services] == [("east",), ("west",)]
    assert all(s.vip == "" for s in services)  # not allocated yet: still served


def test_ports_union_by_name() -> None:
    [echo] = merge(
        [info("east"), info("west")],
        [export("east", ports=(HTTP,)), export("west", ports=(HTTP, GRPC), created=2000.0)],
        {},
    )
    assert echo.ports == (HTTP, GRPC)
    assert [c.type for c in echo.conditions] == ["Valid"]


def test_unnamed_ports_union_by_protocol_and_port() -> None:
    a = ServicePort("", 8080, "TCP")
    b = ServicePort("", 8080, "HTTP")
    [echo] = merge(
        [info("east"), info("west")],
        [export("east", ports=(a,)), export("west", ports=(a, b), created=2000.0)],
        {},
    )
    assert echo.ports == (a, b)
    assert [c.type for c in echo.conditions] == ["Valid"]


def test_unnamed_port_equal_to_a_named_one_is_the_same_port() -> None:
    [echo] = merge(
        [info("east"), info("west")],
        [export("east", ports=(HTTP,)), export("west", ports=(ServicePort("", 8080, "HTTP"),))],
        {},
    )
    assert echo.ports == (HTTP,)
    assert [c.type for c in echo.conditions] == ["Valid"]


def test_conflicting_port_oldest_export_wins_and_every_export_gets_conflict() -> None:
    exports = [
        export("west", ports=(ServicePort("http", 9000, "HTTP"),), created=1000.0),
        export("east", ports=(HTTP,), created=500.0),  # oldest
        export("north", ports=(ServicePort("http", 8080, "TCP"),), created=2000.0),
    ]
    clusters = [info("east"), info("west"), info("north")]
    [echo] = merge(clusters, exports, {})
    assert echo.ports == (HTTP,)
    [condition] = echo.conditions
    assert (condition.type, condition.status, condition.reason) == (
        "Conflict",
        True,
        "PortConflict",
    )
    for name in ("east", "west", "north"):
        assert name in condition.message
    assert "9000/HTTP" in condition.message
    assert "8080/TCP" in condition.message
    status = export_conditions([echo], exports)
    assert set(status) == {("east", ECHO), ("west", ECHO), ("north", ECHO)}
    assert all(conditions[0].type == "Conflict" for conditions in status.values())


def test_conflict_tie_on_created_is_broken_by_cluster_name() -> None:
    [echo] = merge(
        [info("east"), info("west")],
        [
            export("west", ports=(ServicePort("http", 9000, "HTTP"),), created=1000.0),
            export("east", ports=(HTTP,), created=1000.0),
        ],
        {},
    )
    assert echo.ports == (HTTP,)
    assert echo.conditions[0].type == "Conflict"


def test_two_names_for_one_port_is_a_conflict() -> None:
    [echo] = merge(
        [info("east"), info("west")],
        [
            export("east", ports=(HTTP,)),
            export("west", ports=(ServicePort("web", 8080, "HTTP"),), created=2000.0),
        ],
        {},
    )
    assert echo.ports == (HTTP,)
    assert echo.conditions[0].type == "Conflict"
    assert "'web'" in echo.conditions[0].message


def test_dead_cluster_exports_are_excluded() -> None:
    services = merge(
        [info("east")],  # west's leased info key expired
        [export("east", addresses=("10.0.0.1",)), export("west", addresses=("10.1.0.1",))],
        {},
    )
    [echo] = services
    assert echo.clusters == ("east",)
    assert echo.endpoints == (endpoint("east", "10.0.0.1"),)
    # A dead cluster's conflicting export does not mark the service conflicted either.
    [echo] = merge(
        [info("east")],
        [export("east"), export("west", ports=(ServicePort("http", 1, "TCP"),), created=1.0)],
        {},
    )
    assert echo.ports == (HTTP,)
    assert echo.conditions[0].type == "Valid"


def test_service_of_dead_clusters_only_disappears() -> None:
    assert merge([info("east")], [export("west")], {ECHO: "10.255.0.1"}) == ()


def test_endpoints_are_the_deduplicated_union() -> None:
    [echo] = merge(
        [info("east"), info("west")],
        [
            export("east", addresses=("10.0.0.2", "10.0.0.1")),
            export("west", addresses=("10.1.0.1",)),
        ],
        {},
    )
    assert [e.address for e in echo.endpoints] == ["10.0.0.1", "10.0.0.2", "10.1.0.1"]


# --- property: the merge does not depend on input order ---------------------------------------

CLUSTERS = ("east", "west", "north")
port_strategy = st.builds(
    ServicePort,
    name=st.sampled_from(["", "http", "grpc", "web"]),
    port=st.sampled_from([80, 8080, 9090]),
    protocol=st.sampled_from(["TCP", "HTTP", "GRPC"]),
)
export_strategy = st.builds(
    lambda cluster, name, ports, created, addresses: export(
        cluster, name, ports=tuple(ports), created=created, addresses=tuple(addresses)
    ),
    cluster=st.sampled_from(CLUSTERS),
    name=st.sampled_from(["echo", "db"]),
    ports=st.lists(port_strategy, max_size=3),
    created=st.sampled_from([1.0, 2.0, 3.0]),
    addresses=st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]), max_size=2),
)


@given(
    exports=st.lists(export_strategy, max_size=6),
    live=st.sets(st.sampled_from(CLUSTERS)),
    seed=st.integers(0, 2**32),
)
def test_merge_is_independent_of_input_order(
    exports: list[ServiceExport], live: set[str], seed: int
) -> None:
    clusters = [info(c) for c in sorted(live)]
    vips = {ECHO: "10.255.0.1"}
    expected = merge(clusters, exports, vips)
    rng = random.Random(seed)
    shuffled_exports = exports[:]
    rng.shuffle(shuffled_exports)
    shuffled_clusters = clusters[:]
    rng.shuffle(shuffled_clusters)
    assert merge(shuffled_clusters, shuffled_exports, vips) == expected
    for service in expected:
        assert len({(p.protocol, p.port) for p in service.ports}) == len(service.ports)
        named = [p.name for p in service.ports if p.name]
        assert len(set(named)) == len(named)
