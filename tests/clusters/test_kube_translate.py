"""The pure half of the Kubernetes source: translation, the informer cache, backoff; and the
sample fixtures (shapes from the Kubernetes API reference and the MCS API)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import kubernetes
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusters.kube.cache import Backoff, InvalidEventError, ObjectCache
from clusters.kube.translate import ClusterObjects, Rejection, key_of, translate
from mesh.model import Endpoint, ServicePort
from mesh.naming import ServiceKey, SpiffeId
from tests.clusters.kube_objects import (
    FIXTURES,
    endpoint,
    endpoint_slice,
    fixture,
    pod,
    service,
    service_export,
)

TD = "east.fedgate.local"


def _meta(obj: dict[str, Any], rv: str, uid: str = "u", ts: str = "2026-11-30T09:14:00Z") -> Any:
    obj["metadata"].update(resourceVersion=rv, uid=uid, creationTimestamp=ts)
    return obj


def objects(*objs: dict[str, Any]) -> ClusterObjects:
    by_kind: dict[str, dict[tuple[str, str], Any]] = {
        k: {} for k in ("ServiceExport", "Service", "EndpointSlice", "Pod")
    }
    for i, o in enumerate(objs):
        o["metadata"].setdefault("creationTimestamp", "2026-11-30T09:14:00Z")
        o["metadata"].setdefault("uid", f"uid-{i}")
        by_kind[o["kind"]][key_of(o)] = o
    return ClusterObjects(*by_kind.values())


# --- fixtures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("service.json", "V1Service"),
        ("endpointslice.json", "V1EndpointSlice"),
        ("pod.json", "V1Pod"),
        ("tokenreview.json", "V1TokenReview"),
    ],
)
def test_builtin_fixtures_deserialize_into_the_clients_models(name: str, model: str) -> None:
    client = kubernetes.client.ApiClient()
    try:
        obj = client.deserialize((FIXTURES / name).read_text(), model, "application/json")
        assert obj.metadata is not None
        # Nothing was lost on the way: the model serialises back to the fixture's fields.
        back = client.sanitize_for_serialization(obj)
        assert back["kind"] == fixture(name)["kind"]
    finally:
        client.close()


def test_every_fixture_is_json_and_objects_carry_server_metadata() -> None:
    for path in sorted(FIXTURES.glob("*.json")):
        doc = json.loads(path.read_text())
        if "type" in doc:  # watch events
            assert doc["type"] in ("BOOKMARK", "ERROR")
            assert doc["object"]["metadata"].get("resourceVersion") or doc["type"] == "ERROR"
            continue
        if doc["kind"] in ("TokenReview", "SelfSubjectAccessReview"):
            continue  # reviews are answered, never stored: no server metadata
        meta = doc["metadata"]
        namespaced = doc["kind"] != "CustomResourceDefinition"  # CRDs are cluster-scoped
        for field in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp"):
            if field != "namespace" or namespaced:
                assert meta.get(field), f"{path.name}: metadata.{field}"


def test_fixture_set_translates() -> None:
    objs = objects(
        fixture("serviceexport.json"),
        fixture("service.json"),
        fixture("endpointslice.json"),
        fixture("pod.json"),
    )
    exports, rejected = translate(objs, "east", TD)
    assert rejected == ()
    (x,) = exports
    assert x.key == ServiceKey("shop", "payments")
    assert x.created == datetime(2026, 11, 30, 9, 14, tzinfo=UTC).timestamp()
    assert x.ports == (
        ServicePort("http", 8080, "HTTP"),
        ServicePort("grpc", 9090, "GRPC"),
        ServicePort("h2c", 8081, "HTTP2"),
        ServicePort("db", 5432, "TCP"),
    )
    # The terminating endpoint (10.244.2.9) is not offered; the ready one is, with the pod's
    # service account as its identity and its labels for subsets.
    assert x.endpoints == (
        Endpoint(
            "east",
            "10.244.1.17",
            "payments-6d4cf56db6-abcde",
            SpiffeId(TD, "shop", "payments"),
            (("app", "payments"), ("pod-template-hash", "6d4cf56db6"), ("version", "v2")),
        ),
    )


# --- translation --------------------------------------------------------------------------


def test_only_exported_services_federate_and_a_missing_service_is_rejected() -> None:
    exports, rejected = translate(
        objects(service("cart", ("http", 80, None)), service_export("ghost")), "east", TD
    )
    assert exports == ()
    assert rejected == (
        Rejection("ServiceExport", "shop", "ghost", "no Service shop/ghost to export"),
    )


def test_several_slices_not_ready_terminating_and_duplicates() -> None:
    objs = objects(
        service_export("pay"),
        service("pay", ("http", 8080, "http")),
        pod("p1", "pay", version="v1"),
        pod("p2", "pay", version="v2"),
        pod("p3", "pay"),
        pod("p4", "other-sa"),
        endpoint_slice(
            "pay-a",
            "pay",
            endpoint("10.0.0.1", "p1"),
            endpoint("10.0.0.3", "p3", ready=False),
            endpoint("10.0.0.4", "p4", ready=None),  # unset means ready
        ),
        endpoint_slice(
            "pay-b",
            "pay",
            endpoint("10.0.0.2", "p2", ready=False, serving=True, terminating=True),
            endpoint("10.0.0.1", "p1"),  # listed twice while slices rebalance
        ),
        endpoint_slice("cart-a", "cart", endpoint("10.0.9.9", "p1")),
    )
    (x,), rejected = translate(objs, "east", TD)
    assert rejected == ()
    assert [(e.address, e.identity.service_account) for e in x.endpoints] == [
        ("10.0.0.1", "pay"),
        ("10.0.0.4", "other-sa"),
    ]
    assert x.endpoints[0].labels == (("version", "v1"),)


def test_udp_ports_and_bad_endpoints_are_rejected_each_with_a_reason() -> None:
    svc = service("pay", ("http", 80, None))
    svc["spec"]["ports"].append({"name": "dns", "port": 53, "protocol": "UDP"})
    p1 = pod("p1", "pay")
    p1["metadata"]["uid"] = "uid-now"
    no_ref = endpoint("10.0.0.5", None)
    objs = objects(
        service_export("pay"),
        svc,
        p1,
        endpoint_slice(
            "pay-a",
            "pay",
            endpoint("10.0.0.1", "p1", uid="uid-before"),
            endpoint("10.0.0.2", "gone"),
            no_ref,
        ),
    )
    (x,), rejected = translate(objs, "east", TD)
    assert x.ports == (ServicePort("http", 80, "TCP"),)
    assert x.endpoints == ()
    reasons = {(r.kind, r.name, r.reason.split(":")[0]) for r in rejected}
    assert reasons == {
        ("Service", "pay", "port dns"),
        ("EndpointSlice", "pay-a", "endpoint 10.0.0.1"),
        ("EndpointSlice", "pay-a", "endpoint 10.0.0.2"),
        ("EndpointSlice", "pay-a", "endpoint 10.0.0.5"),
    }
    assert any("stale" in r.reason for r in rejected)


def test_external_name_and_portless_services_are_rejected() -> None:
    ext = service("ext")
    ext["spec"] = {"type": "ExternalName", "externalName": "db.example.com"}
    exports, rejected = translate(
        objects(service_export("ext"), ext, service_export("none"), service("none")), "east", TD
    )
    assert exports == ()
    assert [(r.name, r.kind) for r in rejected] == [
        ("ext", "ServiceExport"),
        ("none", "ServiceExport"),
    ]


# --- cache --------------------------------------------------------------------------------


def test_cache_relist_counts_only_real_changes_and_deletes_what_vanished() -> None:
    c = ObjectCache("Pod")
    a, b = _meta(pod("a", "sa"), "10", "ua"), _meta(pod("b", "sa"), "11", "ub")
    assert c.replace([a, b], "11") == 2
    b2 = _meta(pod("b", "sa"), "15", "ub")
    d = _meta(pod("d", "sa"), "16", "ud")
    # a unchanged (not a change), b modified, c... d added; nothing else listed -> nothing lost
    assert c.replace([a, b2, d], "16") == 2
    assert c.replace([b2, d], "17") == 1  # a deleted while we were away
    assert set(c.objects) == {("shop", "b"), ("shop", "d")}
    assert (c.lists, c.resource_version, c.synced) == (3, "17", True)


def test_cache_skips_duplicate_events_and_bookmarks_only_advance_the_version() -> None:
    c = ObjectCache("Pod")
    c.replace([], "5")
    a = _meta(pod("a", "sa"), "6")
    assert c.apply("ADDED", a) is True
    assert c.apply("ADDED", a) is False  # the same (uid, rv) again: a duplicate
    assert c.apply("BOOKMARK", {"metadata": {"resourceVersion": "9"}}) is False
    assert c.resource_version == "9"
    assert c.apply("DELETED", _meta(pod("a", "sa"), "10")) is True
    assert c.apply("DELETED", _meta(pod("a", "sa"), "10")) is False
    assert (c.applied, c.duplicates, c.objects) == (2, 2, {})
    with pytest.raises(InvalidEventError):
        c.apply("SURPRISE", a)


def test_backoff_grows_is_capped_jittered_and_resets() -> None:
    b = Backoff(initial=1.0, cap=4.0, factor=2.0, jitter=1.0, rng=random.Random(7))
    delays = [b.next() for _ in range(5)]
    for d, base in zip(delays, [1, 2, 4, 4, 4], strict=True):
        assert base <= d < 2 * base
    assert len(set(delays)) == 5  # jittered
    b.reset()
    assert 1.0 <= b.next() < 2.0


# --- robustness: whatever the API holds, translation rejects, never raises ------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def _mangled(obj: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """`obj` with one field somewhere replaced by arbitrary JSON."""
    out = json.loads(json.dumps(obj))
    cur: Any = out
    while True:
        keys = list(cur) if isinstance(cur, dict) else list(range(len(cur)))
        if not keys:
            return out
        k = data.draw(st.sampled_from(keys))
        if data.draw(st.booleans()) or not isinstance(cur[k], dict | list) or not cur[k]:
            cur[k] = data.draw(_json)
            return out
        cur = cur[k]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_malformed_objects_are_rejected_never_raised(data: st.DataObject) -> None:
    good = [
        service_export("pay"),
        service("pay", ("http", 80, "http")),
        endpoint_slice("pay-a", "pay", endpoint("10.0.0.1", "p1", uid="uid-2")),
        pod("p1", "sa"),
    ]
    victim = data.draw(st.integers(0, 3))
    good[victim] = _mangled(good[victim], data)
    by_kind = [
        {("shop", "pay"): good[0]},
        {("shop", "pay"): good[1]},
        {("shop", "pay-a"): good[2]},
        {("shop", "p1"): good[3]},
    ]
    for o in good:
        if isinstance(o.get("metadata"), dict):
            o["metadata"].setdefault("creationTimestamp", "2026-11-30T09:14:00Z")
    exports, rejected = translate(ClusterObjects(*by_kind), "east", TD)
    assert len(exports) <= 1
    assert all(isinstance(r, Rejection) for r in rejected)
