"""Routing maths, simulated with a seeded RNG."""

from __future__ import annotations

import random

import pytest

from mesh.errors import InvalidNameError, NoRouteError
from mesh.model import ClusterWeight, Endpoint, MergedService, ServicePort, TrafficPolicy
from mesh.naming import ServiceKey, SpiffeId
from mesh.routing import cluster_weights, pick_cluster, pick_endpoint

KEY = ServiceKey("demo", "echo")


def ep(cluster: str, n: int) -> Endpoint:
    return Endpoint(
        cluster, f"10.0.0.{n}", f"echo-{n}", SpiffeId(f"{cluster}.fedgate.local", "demo", "echo")
    )


def service(*eps: Endpoint) -> MergedService:
    return MergedService(KEY, "10.255.0.1", (ServicePort("http", 8080),), ("east", "west"), eps)


def test_local_remote_weights_hold() -> None:
    svc = service(ep("east", 1), ep("west", 2), ep("west", 3))
    pol = TrafficPolicy(KEY, (ClusterWeight("local", 80), ClusterWeight("remote", 20)))
    choices = cluster_weights(svc, pol, "east")
    rng = random.Random(7)
    picks = [pick_cluster(choices, rng) for _ in range(10_000)]
    share = picks.count("east") / len(picks)
    assert 0.78 < share < 0.82


def test_no_policy_is_proportional_to_endpoints() -> None:
    svc = service(ep("east", 1), ep("west", 2), ep("west", 3))
    weights = {c.cluster: c.weight for c in cluster_weights(svc, None, "east")}
    assert weights == pytest.approx({"east": 1 / 3, "west": 2 / 3})


def test_weight_to_empty_cluster_is_dropped() -> None:
    svc = service(ep("west", 2))
    pol = TrafficPolicy(KEY, (ClusterWeight("local", 80), ClusterWeight("remote", 20)))
    assert [c.cluster for c in cluster_weights(svc, pol, "east")] == ["west"]


def test_no_endpoints_no_route() -> None:
    with pytest.raises(NoRouteError):
        pick_cluster(cluster_weights(service(), None, "east"), random.Random(1))
    with pytest.raises(NoRouteError):
        pick_endpoint((), random.Random(1))


def test_names_are_strict() -> None:
    assert ServiceKey.parse_fqdn("Echo.Demo.svc.clusterset.local.") == KEY
    with pytest.raises(InvalidNameError):
        ServiceKey.parse_fqdn("echo.demo.svc.cluster.local")
    with pytest.raises(InvalidNameError):
        SpiffeId.parse("spiffe://east.fedgate.local/ns/demo")
