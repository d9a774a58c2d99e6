"""The fake API server's authorization and CRD answers: SelfSubjectAccessReview and the
apiextensions.k8s.io/v1 CustomResourceDefinitions of the custom resources it serves.

Shapes as kube-apiserver returns them (fixtures/selfsubjectaccessreview.json,
fixtures/customresourcedefinition.json). Everything is allowed unless a test denies it
(`FakeKubeAPI.deny`); RBAC never denies explicitly, so a refused review is `allowed: false`
without `denied`, as with RBAC alone. A CRD a test removed (`FakeKubeAPI.remove_crd`) is not
listed, and its resources answer 404 as on a server without it.
"""

from __future__ import annotations

import uuid
from typing import Any

from tests.kubefake.resources import RESOURCES, Resource

Obj = dict[str, Any]
SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
CRD_PREFIX = "/apis/apiextensions.k8s.io/v1"
CRD_PLURAL = "customresourcedefinitions"
BINDING = (
    'RBAC: allowed by ClusterRoleBinding "fedgate-agent" of ClusterRole "fedgate-agent" to '
    'ServiceAccount "fedgate-agent/fedgate-system"'
)
Rule = tuple[str, str, str, str]  # verb, group, resource, subresource


def review(body: Obj, denied: set[Rule]) -> Obj:
    """Answer a SelfSubjectAccessReview (resource attributes; non-resource ones are allowed)."""
    spec = body.get("spec") or {}
    attrs = spec.get("resourceAttributes") or {}
    rule = (
        str(attrs.get("verb", "")),
        str(attrs.get("group", "")),
        str(attrs.get("resource", "")),
        str(attrs.get("subresource", "")),
    )
    allowed = rule not in denied and ("*", *rule[1:]) not in denied
    status: Obj = {"allowed": True, "reason": BINDING} if allowed else {"allowed": False}
    return {
        "kind": "SelfSubjectAccessReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {"creationTimestamp": None},
        "spec": spec,
        "status": status,
    }


def crd_name(res: Resource) -> str:
    return f"{res.plural}.{res.group}"


CUSTOM = {crd_name(res): res for res in RESOURCES if not res.builtin}
_SHORT = {"serviceexports": ["svcex"], "serviceimports": ["svcim"]}
_EPOCH = "2026-01-01T00:00:00Z"


def crd(res: Resource, rv: int = 1) -> Obj:
    """The CustomResourceDefinition of `res`, established (a list item: no kind/apiVersion)."""
    names = {
        "plural": res.plural,
        "singular": res.kind.lower(),
        "shortNames": _SHORT.get(res.plural, []),
        "kind": res.kind,
        "listKind": f"{res.kind}List",
    }
    version: Obj = {
        "name": res.version,
        "served": True,
        "storage": True,
        "schema": {
            "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        },
    }
    if res.status_subresource:
        version["subresources"] = {"status": {}}
    return {
        "metadata": {
            "name": crd_name(res),
            "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, crd_name(res))),
            "resourceVersion": str(rv),
            "generation": 1,
            "creationTimestamp": _EPOCH,
        },
        "spec": {
            "group": res.group,
            "names": names,
            "scope": "Namespaced" if res.namespaced else "Cluster",
            "versions": [version],
            "conversion": {"strategy": "None"},
        },
        "status": {
            "conditions": [
                {
                    "type": "NamesAccepted",
                    "status": "True",
                    "lastTransitionTime": _EPOCH,
                    "reason": "NoConflicts",
                    "message": "no conflicts found",
                },
                {
                    "type": "Established",
                    "status": "True",
                    "lastTransitionTime": _EPOCH,
                    "reason": "InitialNamesAccepted",
                    "message": "the initial names have been accepted",
                },
            ],
            "acceptedNames": names,
            "storedVersions": [res.version],
        },
    }


def crd_list(installed: set[str], rv: int) -> Obj:
    return {
        "kind": "CustomResourceDefinitionList",
        "apiVersion": "apiextensions.k8s.io/v1",
        "metadata": {"resourceVersion": str(rv)},
        "items": [crd(CUSTOM[name]) for name in sorted(installed) if name in CUSTOM],
    }
