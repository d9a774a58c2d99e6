"""The faithful fake API server speaks the real protocol: checked with the unmodified client
(typed APIs, `kubernetes.watch.Watch`, server-side apply, TokenReview) and raw HTTP."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from tests.clusters.kube_objects import (
    NS,
    endpoint,
    endpoint_slice,
    fixture,
    pod,
    service,
    service_export,
)
from tests.clusters.kube_rig import api_client, write_kubeconfig
from tests.kubefake import FakeKubeAPI, TokenIdentity
from tests.kubefake.resources import ENDPOINTSLICES, PODS, SERVICEEXPORTS, SERVICES

MCS = ("multicluster.x-k8s.io", "v1alpha1")
APPLY = "application/apply-patch+yaml"


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    reviews = {
        "good": TokenIdentity("system:serviceaccount:shop:payments", ("fedgate",)),
        "other-audience": TokenIdentity("system:serviceaccount:shop:payments", ("vault",)),
    }
    with FakeKubeAPI(token_reviews=reviews) as fake:
        yield fake


@pytest.fixture
def client(api: FakeKubeAPI, tmp_path: Path) -> Iterator[Any]:
    with api_client(tmp_path, api.url) as c:
        yield c


def raw(api: FakeKubeAPI, path: str) -> tuple[int, bytes, dict[str, str]]:
    host, port = api.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def test_list_has_the_real_shape_and_server_metadata(api: FakeKubeAPI, client: Any) -> None:
    created = kubernetes.client.CoreV1Api(client).create_namespaced_service(
        NS, service("pay", ("http", 8080, "http"))
    )
    assert created.spec.cluster_ip.startswith("10.")
    status, body, _ = raw(api, "/api/v1/services")
    doc = json.loads(body)
    assert status == 200
    assert (doc["kind"], doc["apiVersion"]) == ("ServiceList", "v1")
    assert doc["metadata"]["resourceVersion"] == created.metadata.resource_version
    (item,) = doc["items"]
    assert "kind" not in item
    assert "apiVersion" not in item
    meta = item["metadata"]
    assert {"uid", "resourceVersion", "creationTimestamp", "namespace", "labels"} <= set(meta)
    assert item["spec"]["ports"][0]["targetPort"] == 8080
    # Custom resources' list items keep kind and apiVersion.
    api.store.create(SERVICEEXPORTS, service_export("pay"))
    doc = kubernetes.client.CustomObjectsApi(client).list_cluster_custom_object(
        *MCS, "serviceexports"
    )
    assert doc["items"][0]["kind"] == "ServiceExport"
    assert doc["items"][0]["metadata"]["generation"] == 1


def test_endpointslice_service_name_selector(api: FakeKubeAPI, client: Any) -> None:
    for name, svc in (("pay-a", "pay"), ("pay-b", "pay"), ("cart-a", "cart")):
        api.store.create(ENDPOINTSLICES, endpoint_slice(name, svc, endpoint("10.0.0.1", "p")))
    discovery = kubernetes.client.DiscoveryV1Api(client)
    found = discovery.list_namespaced_endpoint_slice(
        NS, label_selector="kubernetes.io/service-name=pay"
    )
    assert sorted(s.metadata.name for s in found.items) == ["pay-a", "pay-b"]
    none = discovery.list_endpoint_slice_for_all_namespaces(
        label_selector="kubernetes.io/service-name in (cart),app!=x"
    )
    assert [s.metadata.name for s in none.items] == ["cart-a"]


def test_watch_stream_events_bookmarks_and_selector_transitions(
    api: FakeKubeAPI, client: Any
) -> None:
    core = kubernetes.client.CoreV1Api(client)
    rv = core.list_namespaced_pod(NS).metadata.resource_version
    api.store.create(PODS, pod("p1", "sa", app="pay"))
    p = api.store.get(PODS, NS, "p1")
    p["metadata"]["labels"]["app"] = "other"  # leaves the selector: DELETED for this watcher
    api.store.update(PODS, p)
    api.store.create(PODS, pod("p2", "sa", app="pay"))
    api.store.delete(PODS, NS, "p2")
    api.bookmark_interval = 0.3  # periodic bookmarks within this 1 s watch
    w = kubernetes.watch.Watch()
    events = [
        (e["type"], e["raw_object"]["metadata"].get("name"))
        for e in w.stream(
            core.list_namespaced_pod,
            NS,
            label_selector="app=pay",
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=1,
        )
    ]
    assert events[:4] == [("ADDED", "p1"), ("DELETED", "p1"), ("ADDED", "p2"), ("DELETED", "p2")]
    assert events[4:]
    assert set(events[4:]) == {("BOOKMARK", None)}
    assert w.resource_version == str(api.store.rv)


def test_watch_from_a_compacted_version_is_410_expired(api: FakeKubeAPI, client: Any) -> None:
    core = kubernetes.client.CoreV1Api(client)
    rv = core.list_service_for_all_namespaces().metadata.resource_version
    api.store.create(SERVICES, service("pay", ("http", 80, None)))
    api.compact()
    status, body, headers = raw(
        api, f"/api/v1/services?watch=1&resourceVersion={rv}&allowWatchBookmarks=true"
    )
    assert status == 200
    assert headers["Transfer-Encoding"] == "chunked"
    event = json.loads(body)
    assert event == {
        "type": "ERROR",
        "object": fixture("watch-expired.json")["object"]
        | {"message": f"too old resource version: {rv} ({api.store.rv + 1})"},
    }
    # The unmodified client's own Watch surfaces it as ApiException 410.
    with pytest.raises(ApiException) as err:
        list(
            kubernetes.watch.Watch().stream(
                core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=1
            )
        )
    assert err.value.status == 410


def test_errors_are_status_objects(api: FakeKubeAPI, client: Any) -> None:
    core = kubernetes.client.CoreV1Api(client)
    with pytest.raises(ApiException) as err:
        core.read_namespaced_service("nope", NS)
    assert err.value.status == 404
    assert json.loads(err.value.body)["reason"] == "NotFound"
    core.create_namespaced_service(NS, service("pay"))
    with pytest.raises(ApiException) as err:
        core.create_namespaced_service(NS, service("pay"))
    assert (err.value.status, json.loads(err.value.body)["reason"]) == (409, "AlreadyExists")
    stale = core.read_namespaced_service("pay", NS)
    stale.spec.ports = [{"name": "a", "port": 1}]
    core.replace_namespaced_service("pay", NS, stale)
    with pytest.raises(ApiException) as err:  # optimistic concurrency on resourceVersion
        core.replace_namespaced_service("pay", NS, stale)
    assert err.value.status == 409


def test_server_side_apply_keeps_other_managers_fields(api: FakeKubeAPI, client: Any) -> None:
    custom = kubernetes.client.CustomObjectsApi(client)

    def apply(body: dict[str, Any], manager: str, **kw: Any) -> Any:
        return custom.patch_namespaced_custom_object(
            *MCS,
            NS,
            "serviceimports",
            "pay",
            body,
            field_manager=manager,
            _content_type=APPLY,
            **kw,
        )

    imp = {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceImport",
        "metadata": {"name": "pay"},
    }
    apply(
        imp
        | {
            "spec": {
                "type": "ClusterSetIP",
                "ips": ["242.0.0.1"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            }
        },
        "fedgate",
    )
    apply(imp | {"metadata": {"name": "pay", "labels": {"team": "pay"}}}, "kubectl")
    # fedgate re-applies without ports: its own field goes, kubectl's label stays.
    out = apply(imp | {"spec": {"type": "ClusterSetIP", "ips": ["242.0.0.2"]}}, "fedgate")
    assert out["spec"] == {"type": "ClusterSetIP", "ips": ["242.0.0.2"]}
    assert out["metadata"]["labels"] == {"team": "pay"}
    managers = {m["manager"]: m["fieldsV1"] for m in out["metadata"]["managedFields"]}
    assert managers["fedgate"] == {"f:spec": {"f:ips": {}, "f:type": {}}}
    with pytest.raises(ApiException) as err:  # another manager's field: conflict unless forced
        apply(imp | {"spec": {"type": "Headless"}}, "kubectl")
    assert err.value.status == 409
    out = apply(imp | {"spec": {"type": "Headless"}}, "kubectl", force=True)
    assert out["spec"]["type"] == "Headless"
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(
            *MCS, NS, "serviceimports", "pay", imp, _content_type=APPLY
        )
    assert err.value.status == 400  # fieldManager is required


def test_serviceexport_status_apply_touches_only_status(api: FakeKubeAPI, client: Any) -> None:
    created = api.store.create(SERVICEEXPORTS, service_export("pay"))
    cond = {
        "type": "Valid",
        "status": "True",
        "reason": "ServiceExported",
        "message": "",
        "lastTransitionTime": "2026-11-30T09:14:01Z",
    }
    body = service_export("pay") | {"status": {"conditions": [cond]}}
    out = kubernetes.client.CustomObjectsApi(client).patch_namespaced_custom_object_status(
        *MCS, NS, "serviceexports", "pay", body, field_manager="fedgate", _content_type=APPLY
    )
    assert out["status"]["conditions"] == [cond]
    assert out["metadata"]["uid"] == created["metadata"]["uid"]
    assert out["metadata"]["generation"] == 1  # a status write is not a spec change
    assert int(out["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    assert out["metadata"]["managedFields"][0]["subresource"] == "status"


def test_token_review(api: FakeKubeAPI, client: Any) -> None:
    auth = kubernetes.client.AuthenticationV1Api(client)

    def review(token: str) -> Any:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": ["fedgate"]},
        }
        return auth.create_token_review(body).status

    ok = review("good")
    assert ok.authenticated is True
    assert ok.user.username == "system:serviceaccount:shop:payments"
    assert "system:serviceaccounts:shop" in ok.user.groups
    assert ok.audiences == ["fedgate"]
    for bad in ("other-audience", "forged"):
        refused = review(bad)
        assert not refused.authenticated
        assert "invalid bearer token" in refused.error


def test_bearer_token_auth(tmp_path: Path) -> None:
    with FakeKubeAPI(bearer_tokens={"s3cret"}) as fake:
        for token, ok in (("s3cret", True), ("wrong", False), (None, False)):
            config = write_kubeconfig(tmp_path / "kc", fake.url, token=token)
            c = kubernetes.config.new_client_from_config(config_file=str(config))
            try:
                if ok:
                    kubernetes.client.CoreV1Api(c).list_pod_for_all_namespaces()
                else:
                    with pytest.raises(ApiException) as err:
                        kubernetes.client.CoreV1Api(c).list_pod_for_all_namespaces()
                    assert err.value.status == 401
            finally:
                c.close()


def test_runs_standalone_with_fixtures(tmp_path: Path) -> None:
    fixtures = Path(__file__).resolve().parents[1] / "kubefake" / "fixtures"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kubefake", "--port", "0", "--fixtures", str(fixtures)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        fake = FakeKubeAPI.__new__(FakeKubeAPI)  # only to reuse `raw` on the URL
        fake._host, fake._port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        status, body, _ = raw(fake, "/apis/discovery.k8s.io/v1/endpointslices")
        assert status == 200
        assert [i["metadata"]["name"] for i in json.loads(body)["items"]] == ["payments-7xk2p"]
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_created_objects_have_the_fields_a_real_server_fills_in(
    api: FakeKubeAPI, client: Any
) -> None:
    core = kubernetes.client.CoreV1Api(client)
    body = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}
    core.create_namespaced_pod(NS, body)
    created = api.store.get(PODS, NS, "p")
    real = fixture("pod.json")  # what a real API server returned for a scheduled pod
    scheduled_only = {"nodeName"}
    assert set(real["spec"]) - scheduled_only <= set(created["spec"])
    assert set(real["spec"]["containers"][0]) - {"ports"} <= set(created["spec"]["containers"][0])
    assert created["spec"]["serviceAccountName"] == "default"
    assert created["status"]["phase"] == "Pending"
    sl = api.store.create(ENDPOINTSLICES, endpoint_slice("s", "pay", endpoint("10.0.0.1", "p")))
    assert sl["metadata"]["generation"] == 1
    sl["endpoints"][0]["conditions"] = {"ready": False}
    assert api.store.update(ENDPOINTSLICES, sl)["metadata"]["generation"] == 2
    sl = api.store.get(ENDPOINTSLICES, NS, "s")
    sl["metadata"]["labels"]["x"] = "y"  # metadata only: no new generation
    assert api.store.update(ENDPOINTSLICES, sl)["metadata"]["generation"] == 2


def test_status_conditions_merge_by_type_between_managers(api: FakeKubeAPI, client: Any) -> None:
    api.store.create(SERVICEEXPORTS, service_export("pay"))
    custom = kubernetes.client.CustomObjectsApi(client)

    def apply(manager: str, *conditions: tuple[str, str]) -> Any:
        body = service_export("pay") | {
            "status": {
                "conditions": [
                    {
                        "type": t,
                        "status": v,
                        "reason": "R",
                        "message": "",
                        "lastTransitionTime": "2026-11-30T09:14:01Z",
                    }
                    for t, v in conditions
                ]
            }
        }
        return custom.patch_namespaced_custom_object_status(
            *MCS, NS, "serviceexports", "pay", body, field_manager=manager, _content_type=APPLY
        )

    def types(obj: Any) -> dict[str, str]:
        return {c["type"]: c["status"] for c in obj["status"].get("conditions", [])}

    apply("fedgate", ("Valid", "True"), ("Conflict", "False"))
    out = apply("other-mcs-controller", ("Ready", "True"))
    assert types(out) == {"Valid": "True", "Conflict": "False", "Ready": "True"}
    out = apply("fedgate", ("Valid", "False"))  # Conflict no longer applied: it goes
    assert types(out) == {"Valid": "False", "Ready": "True"}
    fields = {m["manager"]: m["fieldsV1"] for m in out["metadata"]["managedFields"]}
    assert set(fields["fedgate"]["f:status"]["f:conditions"]) == {'k:{"type":"Valid"}'}
    with pytest.raises(ApiException) as err:  # another manager's condition: a conflict
        apply("fedgate", ("Valid", "False"), ("Ready", "False"))
    assert err.value.status == 409
