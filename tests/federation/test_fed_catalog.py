"""The controller's in-memory view: etcd events in, decoded state and what changed out."""

from __future__ import annotations

from dataclasses import replace

from federation import keys
from federation.catalog import CatalogView, KeyEvent
from federation.fedconfig import config_from_entries
from federation.liveness import DOWN, ClusterLiveness
from federation.status import liveness_to_json
from mesh.codec import cluster_to_json, dumps, export_to_json, policy_to_json
from mesh.model import ClusterWeight, ServiceExport, TrafficPolicy
from mesh.naming import ServiceKey
from tests.federation.fed_factories import endpoint, export, info

ECHO = ServiceKey("demo", "echo")
DB = ServiceKey("demo", "db")


def put_info(cluster: str, revision: int = 1) -> KeyEvent:
    return KeyEvent(keys.info_key(cluster), dumps(cluster_to_json(info(cluster))), revision)


def put_export(x: ServiceExport, revision: int = 1) -> KeyEvent:
    return KeyEvent(keys.export_key(x.cluster, x.key), dumps(export_to_json(x)), revision)


def test_events_build_the_view_and_name_the_services_they_touch() -> None:
    view = CatalogView()
    changes = view.apply([put_info("east"), put_export(export("east")), put_info("west", 2)])
    assert changes.clusters == {"east", "west"}
    assert changes.services == {ECHO}
    assert [x.cluster for x in view.exports_of(ECHO, ["east", "west"])] == ["east"]
    assert view.revision == 2

    # An export of west touches echo only; a repeated identical info touches nothing.
    changes = view.apply([put_export(export("west", created=5.0), 3), put_info("east", 3)])
    assert changes.services == {ECHO}
    assert changes.clusters == set()
    assert view.services_of(["west"]) == {ECHO}

    # Losing west's info (lease expiry deletes every key of the lease, exports first, in key
    # order) touches its services; its last catalog is kept as departed.
    changes = view.apply(
        [
            KeyEvent(keys.export_key("west", ECHO), None, 4),
            KeyEvent(keys.info_key("west"), None, 4),
        ]
    )
    assert changes.clusters == {"west"}
    assert changes.services == {ECHO}
    assert set(view.infos) == {"east"}
    assert ECHO not in view.by_cluster.get("west", set())
    assert view.services_of(["west"]) == {ECHO}  # from the departed copy
    assert [x.created for x in view.exports_of(ECHO, ["west"])] == [5.0]
    assert view.info_of("west") == info("west")
    assert view.drop_departed(["west"]) == {ECHO}
    assert view.services_of(["west"]) == set()
    assert view.exports_of(ECHO, ["west"]) == []


def test_an_export_removed_while_the_info_stays_is_gone_and_a_return_replaces_the_copy() -> None:
    view = CatalogView()
    view.apply([put_info("west"), put_export(export("west")), put_export(export("west", "db"))])
    view.apply([KeyEvent(keys.export_key("west", DB), None, 2)])
    # Then the lease went, with every key left.
    view.apply(
        [KeyEvent(keys.export_key("west", ECHO), None, 3), KeyEvent(keys.info_key("west"), None, 3)]
    )
    assert set(view.departed["west"].exports) == {ECHO}  # db was really removed before
    view.apply([put_info("west", 4)])  # the agent is back: its live keys count again
    assert "west" not in view.departed
    assert view.exports_of(ECHO, ["west"]) == []  # not republished yet: nothing


def test_a_reload_keeps_the_last_catalog_of_clusters_it_no_longer_finds() -> None:
    view = CatalogView()
    view.apply([put_info("east"), put_info("west"), put_export(export("west"))])
    changes = view.reload([put_info("east", 9)])
    assert "west" in changes.clusters
    assert ECHO in changes.services
    assert set(view.infos) == {"east"}
    assert [x.cluster for x in view.exports_of(ECHO, ["east", "west"])] == ["west"]


def test_bad_keys_are_reported_and_never_reach_the_merge() -> None:
    view = CatalogView()
    impostor = ServiceExport("east", DB, (), 1.0, (endpoint("west", "10.1.0.9"),))
    foreign_domain = ServiceExport(
        "east", DB, (), 1.0, (replace(endpoint("west", "10.1.0.9"), cluster="east"),)
    )
    changes = view.apply(
        [
            put_info("east"),
            KeyEvent("/fedgate/clusters/Bad/info", b"{}", 2),
            KeyEvent("/fedgate/clusters/east/weird", b"{}", 3),
            KeyEvent(keys.info_key("west"), b"not json", 4),
            put_export(export("east", "db"), 5),
            # Under east's prefix: an export whose endpoints belong to west.
            KeyEvent(keys.export_key("east", DB), dumps(export_to_json(impostor)), 6),
            KeyEvent(keys.vip_key(ECHO), b"192.168.0.1", 7),
        ]
    )
    assert [p.key for p in changes.problems] == [
        "/fedgate/clusters/Bad/info",
        "/fedgate/clusters/east/weird",
        keys.info_key("west"),
        keys.export_key("east", DB),
        keys.vip_key(ECHO),
    ]
    # The bad new value of db's key replaced the good one: db is gone, not stale.
    assert view.exports_of(DB, ["east"]) == []
    assert changes.services == {DB}
    assert ECHO not in view.vips
    # Endpoints in another trust domain are kept but never merged.
    view.apply([KeyEvent(keys.export_key("east", DB), dumps(export_to_json(foreign_domain)), 8)])
    assert view.exports_of(DB, ["east"]) == []


def test_config_liveness_and_leader_keys() -> None:
    view = CatalogView()
    policy = TrafficPolicy(ECHO, (ClusterWeight("local", 1),))
    record = ClusterLiveness("west", DOWN, 1000.0, 1.0, 1.0, 1)
    changes = view.apply(
        [
            KeyEvent(keys.policy_key(ECHO), dumps(policy_to_json(policy)), 1),
            KeyEvent(keys.COMMIT_KEY, b"abc123\n", 1),
            KeyEvent(keys.DENIED_PREFIX + "spiffe-east", b"spiffe://east.fedgate.local/x", 1),
            KeyEvent(keys.CONFIG_PREFIX + "authz/demo/echo", b"{}", 1),
            KeyEvent(keys.cluster_status_key("west"), dumps(liveness_to_json(record)), 2),
            KeyEvent(keys.LEADER_KEY, b'{"id": "c0"}', 3),
            KeyEvent(keys.service_status_key(ECHO), b"{}", 4),  # the leader's own write: ignored
        ]
    )
    assert changes.config
    assert changes.liveness
    assert changes.leader
    config = view.config()
    assert config.commit == "abc123"
    assert config.policies == (policy,)
    assert dict(config.denied) == {"spiffe-east": "spiffe://east.fedgate.local/x"}
    assert list(config.documents) == [keys.CONFIG_PREFIX + "authz/demo/echo"]
    assert view.liveness == {"west": record}
    assert not view.apply([KeyEvent(keys.CONFIG_STATUS_KEY, b"{}", 5)])  # nothing we track


def test_a_malformed_policy_is_reported_and_the_rest_of_the_config_stands() -> None:
    good = TrafficPolicy(ECHO, (ClusterWeight("local", 1),))
    config, problems = config_from_entries(
        {
            keys.policy_key(ECHO): dumps(policy_to_json(good)),
            keys.policy_key(DB): dumps(policy_to_json(good)),  # echo's policy under db's key
            keys.POLICIES_PREFIX + "x": b"{}",
        }
    )
    assert config.policies == (good,)
    assert sorted(p.key for p in problems) == [keys.policy_key(DB), keys.POLICIES_PREFIX + "x"]
