"""Route decisions, simulated through the generated config (Istio's pilot/pkg/simulation style).

An operator's YAML goes through the real GitOps validation and conversion and the etcd entries
the controller reads back, endpoints through the real MCS merge, config generation (which lays
the Federation's declared regions over what the agents published) and the snapshot's JSON
codec (what the wire carries);
the sidecar's route table is built from the result and requests are "sent" through it with a
seeded rng. Assertions are about where requests went, never about the config's shape.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

import pytest

from federation.fedconfig import config_from_entries
from federation.generate import generate
from federation.gitops.load import SourceFile
from federation.gitops.store import desired_entries
from federation.gitops.validate import validate_files
from federation.merge import merge
from mesh.codec import snapshot_from_json, snapshot_to_json
from mesh.errors import NoRouteError
from mesh.model import ClusterInfo, Endpoint, GatewayAddress, ServiceExport, ServicePort
from mesh.naming import ServiceKey, SpiffeId
from sidecar.routes import Local, RouteTable, ServiceRoute
from sidecar.traffic.balance import remote_host
from sidecar.traffic.match import RequestInfo, effective

API = ServiceKey("shop", "api")
VIP = "10.255.0.7"
N = 10_000

FEDERATION = """\
apiVersion: fedgate.io/v1alpha1
kind: Federation
metadata: {name: prod}
spec:
  clusters:
    - {name: east, locality: {region: us-east}}
    - {name: north, locality: {region: us-east}}
    - {name: west, locality: {region: us-west}}
"""


def policy_yaml(spec: str) -> str:
    head = """\
apiVersion: fedgate.io/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: shop}
spec:
  host: api.shop.svc.clusterset.local
"""
    return head + "".join(f"  {line}\n" for line in spec.strip("\n").splitlines())


def ep(cluster: str, n: int, version: str = "v1") -> Endpoint:
    octet = {"east": 1, "north": 2, "west": 3}[cluster]
    return Endpoint(
        cluster,
        f"10.{octet}.0.{10 + n}",
        f"api-{cluster}-{n}",
        SpiffeId(f"{cluster}.fedgate.local", "shop", "api"),
        (("version", version),),
    )


def cluster(name: str) -> ClusterInfo:
    """A cluster as its agent publishes it: no region (the Federation document declares it)."""
    octet = {"east": 1, "north": 2, "west": 3}[name]
    gw = GatewayAddress(f"172.30.0.{10 + octet}", 15443, f"10.{octet}.0.1", 15008)
    return ClusterInfo(name, f"{name}.fedgate.local", gw, ())


CLUSTERS = (cluster("east"), cluster("north"), cluster("west"))


def route_for(spec: str, endpoints: Iterable[Endpoint], local: str = "east") -> ServiceRoute:
    files = [SourceFile("federation.yaml", FEDERATION.encode())]
    if spec:
        files.append(SourceFile("policies/api.yaml", policy_yaml(spec).encode()))
    result = validate_files(files)
    assert result.ok, result.issues
    assert result.config is not None
    by_cluster: dict[str, list[Endpoint]] = {}
    for e in endpoints:
        by_cluster.setdefault(e.cluster, []).append(e)
    exports = [
        ServiceExport(c, API, (ServicePort("http", 8080, "HTTP"),), 1.0, tuple(eps))
        for c, eps in by_cluster.items()
    ]
    services = merge(CLUSTERS, exports, {API: VIP})
    config, problems = config_from_entries(desired_entries(result.config))  # as etcd holds it
    assert problems == ()
    snap = generate(CLUSTERS, services, config)
    wire = snapshot_from_json(snapshot_to_json(snap))  # what a sidecar receives
    route = RouteTable.build(wire, local).lookup(VIP, 8080)
    assert route is not None
    return route


def simulate(
    route: ServiceRoute,
    n: int = N,
    *,
    path: str = "/",
    headers: tuple[tuple[str, str], ...] = (),
    ejected: frozenset[str] = frozenset(),
    seed: int = 11,
) -> Counter[str]:
    """Where `n` requests go: a local pod's name, or a remote cluster's name."""
    rng = random.Random(seed)
    eff = effective(route.policy, RequestInfo.build("GET", path, headers))
    seen: Counter[str] = Counter()
    for _ in range(n):
        t = route.target(eff, rng, lambda h: h not in ejected)
        seen[t.endpoint.pod if t.endpoint else t.cluster] += 1
    return seen


def share(seen: Counter[str], *keys: str) -> float:
    return sum(seen[k] for k in keys) / sum(seen.values())


EAST_V1 = (ep("east", 0), ep("east", 1))
EAST_V2 = (ep("east", 2, "v2"),)
SUBSETS = """
subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def test_canary_subset_gets_its_ten_percent() -> None:
    route = route_for(
        SUBSETS + "subsetWeights: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]",
        EAST_V1 + EAST_V2,
    )
    seen = simulate(route)
    assert share(seen, "api-east-2") == pytest.approx(0.10, abs=0.01)
    assert share(seen, "api-east-0") == pytest.approx(0.45, abs=0.015)


def test_header_and_path_routes_pick_their_subset_and_the_rest_fall_through() -> None:
    route = route_for(
        SUBSETS
        + """
subsetWeights: [{subset: v1, weight: 100}]
routes:
  - name: testers
    match:
      - headers: {x-tester: {exact: "yes"}}
      - uri: {prefix: /beta/}
    subsetWeights: [{subset: v2, weight: 100}]
  - name: regex
    match: [{uri: {regex: "/v[0-9]+/canary"}}]
    subsetWeights: [{subset: v1, weight: 50}, {subset: v2, weight: 50}]
""",
        EAST_V1 + EAST_V2,
    )
    assert simulate(route, 100, headers=(("X-Tester", "yes"),)) == {"api-east-2": 100}
    assert simulate(route, 100, path="/beta/x?q=1") == {"api-east-2": 100}
    assert simulate(route, 100, headers=(("x-tester", "no"),))["api-east-2"] == 0
    assert share(simulate(route, path="/v2/canary"), "api-east-2") == pytest.approx(0.5, abs=0.02)
    assert simulate(route, 100, path="/v2/canary/x")["api-east-2"] == 0  # regex is a full match


def test_cluster_weights_hold_and_remote_share_splits_by_endpoints() -> None:
    route = route_for(
        "clusterWeights: [{cluster: local, weight: 60}, {cluster: remote, weight: 40}]",
        (*EAST_V1, ep("north", 0), ep("west", 0), ep("west", 1), ep("west", 2)),
    )
    seen = simulate(route)
    assert share(seen, "api-east-0", "api-east-1") == pytest.approx(0.60, abs=0.015)
    assert share(seen, "north") == pytest.approx(0.10, abs=0.01)
    assert share(seen, "west") == pytest.approx(0.30, abs=0.015)


def test_a_remote_cluster_with_mixed_versions_serves_a_subset_by_its_labels() -> None:
    route = route_for(
        SUBSETS + "subsetWeights: [{subset: v2, weight: 100}]",
        (*EAST_V1, ep("north", 0, "v2"), ep("west", 0, "v2"), ep("west", 1, "v1")),
    )
    # east has no v2; north and west have one v2 endpoint each (west also runs a v1).
    seen = simulate(route, 2000)
    assert set(seen) == {"north", "west"}
    assert share(seen, "west") == pytest.approx(0.5, abs=0.05)
    # The call carries the subset's labels, so west's ingress picks its v2 endpoint only, and
    # only the identities of v2 endpoints are accepted.
    eff = effective(route.policy, RequestInfo.build("GET", "/", ()))
    target = route.target(eff, random.Random(3), lambda h: True, cluster_ref="west")
    assert target.labels == (("version", "v2"),)
    assert target.identities == {ep("west", 0, "v2").identity}


def test_locality_failover_spills_gradually_tier_by_tier() -> None:
    route = route_for(
        "localityFailover: {spillOverThreshold: 70}",
        (*EAST_V1, ep("north", 0), ep("west", 0)),
    )
    assert simulate(route) == {
        "api-east-0": pytest.approx(N / 2, rel=0.05),
        "api-east-1": pytest.approx(N / 2, rel=0.05),
    }
    one_down = simulate(route, ejected=frozenset({"10.1.0.10"}))
    # Half of the local tier is healthy: 0.5 / 0.7 = 71.4 % stays, 28.6 % spills to the region.
    assert share(one_down, "api-east-1") == pytest.approx(0.714, abs=0.015)
    assert share(one_down, "north") == pytest.approx(0.286, abs=0.015)
    assert one_down["west"] == 0
    both_down = simulate(route, ejected=frozenset({"10.1.0.10", "10.1.0.11"}))
    assert both_down == {"north": N}
    region_down = simulate(
        route, ejected=frozenset({"10.1.0.10", "10.1.0.11", remote_host("north")})
    )
    assert region_down == {"west": N}


def test_without_failover_a_weighted_cluster_with_no_healthy_endpoint_is_skipped() -> None:
    route = route_for(
        "clusterWeights: [{cluster: local, weight: 100}]",
        (*EAST_V1, ep("west", 0)),
    )
    assert simulate(route, 500)["west"] == 0
    everything = frozenset({"10.1.0.10", "10.1.0.11"})
    assert simulate(route, 500, ejected=everything) == {"west": 500}


def test_all_hosts_ejected_is_panic_mode_not_an_outage() -> None:
    route = route_for("", EAST_V1)
    rng = random.Random(1)
    t = route.target(effective(None, None), rng, lambda h: False)
    assert t.panic
    assert t.endpoint in EAST_V1


def test_a_retry_prefers_a_host_not_tried_yet() -> None:
    route = route_for("clusterWeights: [{cluster: local, weight: 100}]", (*EAST_V1, ep("west", 0)))
    rng = random.Random(5)
    eff = effective(route.policy, None)
    for _ in range(200):
        first = route.target(eff, rng, lambda h: True)
        again = route.target(eff, rng, lambda h: True, frozenset({first.host}))
        assert again.host != first.host
        assert again.cluster == "east"  # the other local endpoint before another cluster
    both = frozenset(e.address for e in EAST_V1)
    # Every local host tried: a cluster the weights keep at 0 still gets no retry (Istio), so
    # the retry stays in east; with a share, west gets it.
    assert route.target(eff, rng, lambda h: True, both).cluster == "east"
    shared = route_for(
        "clusterWeights: [{cluster: local, weight: 90}, {cluster: west, weight: 10}]",
        (*EAST_V1, ep("west", 0)),
    )
    shared_eff = effective(shared.policy, None)
    assert shared.target(shared_eff, rng, lambda h: True, both).cluster == "west"


def test_mirror_target_is_restricted_to_its_subset_and_cluster() -> None:
    route = route_for(SUBSETS, (*EAST_V1, ep("west", 0, "v2")))
    rng = random.Random(2)
    eff = effective(route.policy, None)
    for _ in range(50):
        t = route.target(eff, rng, lambda h: True, subset="v2")
        assert t.cluster == "west"
        t = route.target(eff, rng, lambda h: True, cluster_ref="local")
        assert t.cluster == "east"
    with pytest.raises(NoRouteError, match="subset v2 in cluster local"):
        route.target(eff, rng, lambda h: True, subset="v2", cluster_ref="local")


def test_tcp_connections_use_the_same_balancer() -> None:
    route = route_for(
        SUBSETS + "subsetWeights: [{subset: v2, weight: 100}]",
        EAST_V1 + EAST_V2,
    )
    rng = random.Random(3)
    decisions = [route.decide(rng) for _ in range(50)]
    assert {d.endpoint.pod for d in decisions if isinstance(d, Local)} == {"api-east-2"}
