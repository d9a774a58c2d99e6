"""The resources the fake API server serves, and the shapes of its Status and list answers.

Only what fedgate reads or writes is served: core/v1 services, pods, configmaps and namespaces
(cluster-scoped), discovery.k8s.io/v1 endpointslices, admissionregistration.k8s.io/v1
mutatingwebhookconfigurations (cluster-scoped), multicluster.x-k8s.io/v1alpha1 serviceexports
and serviceimports (MCS API CRDs, both with a `status` subresource), coordination.k8s.io/v1
leases, and authentication.k8s.io/v1 tokenreviews (create only);
selfsubjectaccessreviews and the CRDs themselves are answered by access.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Resource:
    group: str  # "" is the core group, served under /api
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    # Built-in types' list items carry no kind/apiVersion on the wire; custom resources' do.
    builtin: bool = True
    status_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


SERVICES = Resource("", "v1", "services", "Service", status_subresource=True)
PODS = Resource("", "v1", "pods", "Pod", status_subresource=True)
ENDPOINTSLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
MCS = "multicluster.x-k8s.io"
SERVICEEXPORTS = Resource(
    MCS, "v1alpha1", "serviceexports", "ServiceExport", builtin=False, status_subresource=True
)
SERVICEIMPORTS = Resource(
    MCS, "v1alpha1", "serviceimports", "ServiceImport", builtin=False, status_subresource=True
)
NAMESPACES = Resource(
    "", "v1", "namespaces", "Namespace", namespaced=False, status_subresource=True
)
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
MUTATINGWEBHOOKS = Resource(
    "admissionregistration.k8s.io",
    "v1",
    "mutatingwebhookconfigurations",
    "MutatingWebhookConfiguration",
    namespaced=False,
)
# Leader election of the agent's replicas (clusters/kube/lease.py).
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
RESOURCES = (
    SERVICES,
    PODS,
    ENDPOINTSLICES,
    SERVICEEXPORTS,
    SERVICEIMPORTS,
    NAMESPACES,
    CONFIGMAPS,
    MUTATINGWEBHOOKS,
    LEASES,
)
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def by_path(prefix: str, plural: str) -> Resource | None:
    return next((r for r in RESOURCES if r.prefix == prefix and r.plural == plural), None)


def status(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    """A `meta/v1 Status` as the API server sends for errors (and in watch ERROR events)."""
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


def not_found(res: Resource, name: str) -> Obj:
    qualified = f"{res.plural}.{res.group}" if res.group else res.plural
    return status(
        404, "NotFound", f'{qualified} "{name}" not found', {"name": name, "kind": res.plural}
    )


def expired(requested: int, oldest: int) -> Obj:
    # The wording of the watch cache's answer (k8s.io/apiserver storage/cacher).
    return status(410, "Expired", f"too old resource version: {requested} ({oldest})")
