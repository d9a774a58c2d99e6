"""Config generation: trust bundle, stable versions, and where a request goes through it."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace

from federation import keys
from federation.fedconfig import config_from_entries
from federation.generate import generate
from federation.merge import merge
from mesh.codec import decode, dumps, snapshot_from_json, snapshot_to_json
from mesh.model import ClusterInfo, ClusterWeight, ServiceExport, Snapshot, TrafficPolicy
from mesh.naming import ServiceKey
from mesh.routing import cluster_weights, pick_cluster
from tests.federation.fed_factories import export, info

ECHO = ServiceKey("demo", "echo")


def build(
    clusters: list[ClusterInfo] | None = None,
    exports: list[ServiceExport] | None = None,
    policies: tuple[TrafficPolicy, ...] = (),
) -> Snapshot:
    if clusters is None:
        clusters = [info("east"), info("west")]
    if exports is None:
        exports = [
            export("east", addresses=("10.0.0.1", "10.0.0.2")),
            export("west", addresses=("10.1.0.1",)),
        ]
    return generate(clusters, merge(clusters, exports, {ECHO: "10.255.0.1"}), policies)


def test_trust_bundle_has_every_live_cluster_domain() -> None:
    snapshot = build()
    assert dict(snapshot.trust_bundle) == {
        "east.fedgate.local": ("ROOT-east",),
        "west.fedgate.local": ("ROOT-west",),
    }
    only_east = build(clusters=[info("east")])
    assert list(only_east.trust_bundle) == ["east.fedgate.local"]


def test_bundle_keeps_several_roots_per_domain_for_rotation() -> None:
    snapshot = build(clusters=[info("east", roots=("NEW", "OLD")), info("west")])
    assert snapshot.trust_bundle["east.fedgate.local"] == ("NEW", "OLD")


def test_version_is_a_stable_content_hash() -> None:
    a = build()
    b = generate(list(reversed(a.clusters)), list(reversed(a.services)), [])
    assert a.version == b.version
    assert len(a.version) == 16
    changed = build(exports=[export("east", addresses=("10.0.0.9",))])
    assert changed.version != a.version
    assert build(policies=(TrafficPolicy(ECHO, (ClusterWeight("local", 1),)),)).version != a.version


def test_snapshot_roundtrips_through_the_wire_codec() -> None:
    snapshot = build()
    decoded = decode(dumps(snapshot_to_json(snapshot)), snapshot_from_json, "snapshot")
    assert decoded == replace(snapshot, trust_bundle=decoded.trust_bundle)
    assert dict(decoded.trust_bundle) == dict(snapshot.trust_bundle)


def test_request_routed_through_generated_config_follows_policy() -> None:
    # Simulate: a sidecar in east calls echo.demo.svc.clusterset.local:8080 with the
    # generated snapshot; 80/20 local/remote must send ~20% of calls to west.
    policy = TrafficPolicy(ECHO, (ClusterWeight("local", 80), ClusterWeight("remote", 20)))
    snapshot = build(policies=(policy,))
    service = snapshot.service_by_vip("10.255.0.1")
    assert service is not None
    assert service.port(8080) is not None
    choices = cluster_weights(service, snapshot.policy(service.key), "east")
    rng = random.Random(7)
    calls = Counter(pick_cluster(choices, rng) for _ in range(10_000))
    assert 1700 < calls["west"] < 2300
    assert calls["east"] + calls["west"] == 10_000
    # With west dead, every call stays in east.
    snapshot = build(clusters=[info("east")], policies=(policy,))
    service = snapshot.service(ECHO)
    assert service is not None
    assert {c.cluster for c in cluster_weights(service, policy, "east")} == {"east"}


def test_the_federation_documents_locality_is_laid_over_what_agents_published() -> None:
    federation = {
        "spec": {
            "clusters": [
                {"name": "east", "network": "net-a", "locality": {"region": "eu", "zone": "a"}},
                {"name": "west"},
            ]
        }
    }
    config, problems = config_from_entries({keys.FEDERATION_KEY: json.dumps(federation).encode()})
    assert problems == ()
    east = ClusterInfo("east", "east.fedgate.local", None, (), region="agent-said")
    west = ClusterInfo("west", "west.fedgate.local", None, (), region="us-west")
    snap = generate([east, west], [], config)
    by_name = {c.name: c for c in snap.clusters}
    assert (by_name["east"].network, by_name["east"].region, by_name["east"].zone) == (
        "net-a",
        "eu",
        "a",
    )
    assert by_name["west"].region == "us-west"  # nothing declared: the agent's value stands


def test_a_malformed_federation_document_is_a_named_problem_not_a_crash() -> None:
    config, problems = config_from_entries({keys.FEDERATION_KEY: b'{"spec": {"clusters": 3}}'})
    assert [p.key for p in problems] == [keys.FEDERATION_KEY]
    assert "Federation document is malformed" in problems[0].error
    assert dict(config.localities) == {}
