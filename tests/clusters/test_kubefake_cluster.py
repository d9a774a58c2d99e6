"""The fake API server's namespaces, configmaps and mutatingwebhookconfigurations, driven by the
unmodified `kubernetes` client: cluster-scoped paths, field selectors, defaulting and
validation, and server-side apply of one webhook of a configuration."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from clusters.inject.admission import webhook_configuration
from tests.clusters.kube_rig import api, client
from tests.kubefake import FakeKubeAPI
from tests.kubefake.resources import CONFIGMAPS, MUTATINGWEBHOOKS, NAMESPACES

__all__ = ["api", "client"]  # fixtures

APPLY = "application/apply-patch+yaml"


def get(api: FakeKubeAPI, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(api.url + path, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def config_map(ns: str, name: str, **data: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "data": data}


def test_namespaces_are_cluster_scoped_with_the_servers_defaults(
    api: FakeKubeAPI, client: Any
) -> None:
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespace({"metadata": {"name": "shop", "labels": {"team": "pay"}}})
    code, ns = get(api, "/api/v1/namespaces/shop")
    assert code == 200
    assert (ns["kind"], ns["apiVersion"]) == ("Namespace", "v1")
    assert "namespace" not in ns["metadata"]
    assert ns["metadata"]["labels"] == {"team": "pay", "kubernetes.io/metadata.name": "shop"}
    assert ns["spec"] == {"finalizers": ["kubernetes"]}
    assert ns["status"] == {"phase": "Active"}
    listed = core.list_namespace(label_selector="kubernetes.io/metadata.name=shop")
    assert [n.metadata.name for n in listed.items] == ["shop"]
    # A cluster-scoped resource has no namespaced path.
    code, status = get(
        api,
        "/apis/admissionregistration.k8s.io/v1/namespaces/shop/mutatingwebhookconfigurations",
    )
    assert (code, status["reason"]) == (404, "NotFound")


def test_field_selectors_pick_one_name_in_every_namespace(api: FakeKubeAPI, client: Any) -> None:
    s = api.store
    for ns in ("a", "b"):
        s.create(CONFIGMAPS, config_map(ns, "fedgate-bootstrap", k="v"))
        s.create(CONFIGMAPS, config_map(ns, "other", k="v"))
    core = kubernetes.client.CoreV1Api(client)
    listed = core.list_config_map_for_all_namespaces(
        field_selector="metadata.name=fedgate-bootstrap"
    )
    assert [(c.metadata.namespace, c.metadata.name) for c in listed.items] == [
        ("a", "fedgate-bootstrap"),
        ("b", "fedgate-bootstrap"),
    ]
    both = "metadata.name!=other,metadata.namespace=b"
    assert [
        c.metadata.name for c in core.list_config_map_for_all_namespaces(field_selector=both).items
    ] == ["fedgate-bootstrap"]
    # A watch with the selector sees only that name, and a namespace's deletion empties it.
    rv = listed.metadata.resource_version
    s.create(CONFIGMAPS, config_map("c", "other"))
    s.create(NAMESPACES, {"metadata": {"name": "a"}})
    s.delete(NAMESPACES, "", "a")
    resp = core.list_config_map_for_all_namespaces(
        field_selector="metadata.name=fedgate-bootstrap",
        watch=True,
        resource_version=rv,
        timeout_seconds=1,
        _preload_content=False,
    )
    events = [json.loads(line) for line in resp.data.splitlines() if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["namespace"]) for e in events] == [("DELETED", "a")]
    with pytest.raises(ApiException) as e:
        core.list_config_map_for_all_namespaces(field_selector="data.k=v")
    assert e.value.status == 400
    assert "field label not supported: data.k" in e.value.body


def test_a_webhook_configuration_is_defaulted_validated_and_applied_by_webhook_name(
    api: FakeKubeAPI, client: Any
) -> None:
    adm = kubernetes.client.AdmissionregistrationV1Api(client)
    name = "fedgate-sidecar-injector"
    partial = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{"name": "sidecar-injector.fedgate.io", "clientConfig": {"caBundle": "Y2E="}}],
    }
    opts = {"field_manager": "fedgate", "force": True, "_content_type": APPLY}
    with pytest.raises(ApiException) as e:  # an apply would create it from a caBundle alone
        adm.patch_mutating_webhook_configuration(name, partial, **opts)
    assert e.value.status == 422
    body = json.loads(e.value.body)
    assert body["reason"] == "Invalid"
    assert {c["field"] for c in body["details"]["causes"]} == {
        "webhooks[0].clientConfig",
        "webhooks[0].sideEffects",
        "webhooks[0].admissionReviewVersions",
    }
    installed = webhook_configuration(None)
    other = {**installed["webhooks"][0], "name": "other.example.com"}
    installed["webhooks"].append(other)
    api.store.apply(MUTATINGWEBHOOKS, "", name, installed, "kubectl")
    adm.patch_mutating_webhook_configuration(name, partial, **opts)
    held = api.store.get(MUTATINGWEBHOOKS, "", name)
    ours, theirs = held["webhooks"]
    assert ours["clientConfig"]["caBundle"] == "Y2E="
    assert ours["clientConfig"]["service"]["port"] == 443
    assert ours["matchPolicy"] == "Equivalent"  # defaulted
    assert "caBundle" not in theirs["clientConfig"]
    assert held["metadata"]["generation"] == 2
