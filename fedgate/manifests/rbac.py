"""The namespace, ServiceAccounts and the agent's least-privilege RBAC.

Every rule is justified in docs/kubernetes.md ("RBAC the agent needs"); `fedgate check` asks
for the same list (`fedgate.check_facts.NEEDS`), and a test keeps the two in step. Only the
agent talks to the Kubernetes API: the gateway, the controller and etcd get ServiceAccounts
without any binding, and no mounted API token.
"""

from __future__ import annotations

from clusters.inject.admission import CONFIGURATION_NAME as WEBHOOK_CONFIGURATION
from fedgate.manifests.common import Obj, meta, obj
from fedgate.manifests.settings import (
    AGENT,
    CONTROLLER,
    ETCD,
    GATEWAY_SERVICE_ACCOUNT,
    NAMESPACE,
    ManifestSettings,
)

MCS = "multicluster.x-k8s.io"
RBAC = "rbac.authorization.k8s.io/v1"

# (apiGroup, resources, verbs), one line per row of the docs' table.
AGENT_RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    (MCS, ("serviceexports",), ("list", "watch")),
    (MCS, ("serviceexports/status",), ("patch",)),
    (MCS, ("serviceimports",), ("list", "create", "patch", "delete")),
    (MCS, ("serviceimports/status",), ("patch",)),
    ("", ("services", "pods"), ("list", "watch")),
    ("discovery.k8s.io", ("endpointslices",), ("list", "watch")),
    ("authentication.k8s.io", ("tokenreviews",), ("create",)),
    # `fedgate check --in-cluster` run in the agent's pod: its own permissions, and whether the
    # MCS CRDs are established.
    ("authorization.k8s.io", ("selfsubjectaccessreviews",), ("create",)),
    ("apiextensions.k8s.io", ("customresourcedefinitions",), ("list",)),
    # The bootstrap writer (clusters/kube/bootstrap_writer.py): `fedgate-bootstrap` in every
    # namespace labelled for injection; the namespaces are not known in advance.
    ("", ("namespaces",), ("list", "watch")),
    ("", ("configmaps",), ("list", "watch", "create", "patch")),
)
# Rules limited to named objects: the injector webhook's own configuration, whose caBundle the
# agent keeps equal to its roots (and no other webhook).
AGENT_NAMED_RULES: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        (WEBHOOK_CONFIGURATION,),
        ("get", "patch"),
    ),
)


# The agent replicas' leader election: a Role in fedgate-system only (a Lease is namespaced),
# `get`/`update` limited to the one Lease by name; `create` cannot be (the name is not known to
# RBAC before the object exists), so it is granted on leases of this namespace.
AGENT_LEASE = "fedgate-agent"
AGENT_LEASE_RULES: tuple[Obj, ...] = (
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": [AGENT_LEASE],
        "verbs": ["get", "update"],
    },
)


def namespace() -> Obj:
    ns = meta(NAMESPACE, namespace=None)
    # The control plane itself is never injected (the webhook selects `enabled` namespaces).
    ns["labels"]["fedgate.io/inject"] = "disabled"
    return obj("v1", "Namespace", ns)


def service_account(name: str) -> Obj:
    return obj("v1", "ServiceAccount", meta(name), automountServiceAccountToken=False)


def agent_rbac() -> list[Obj]:
    rules = [
        {"apiGroups": [group], "resources": list(res), "verbs": list(verbs)}
        for group, res, verbs in AGENT_RULES
    ] + [
        {
            "apiGroups": [group],
            "resources": [res],
            "resourceNames": list(names),
            "verbs": list(verbs),
        }
        for group, res, names, verbs in AGENT_NAMED_RULES
    ]
    return [
        obj(RBAC, "ClusterRole", meta(AGENT, namespace=None), rules=rules),
        obj(
            RBAC,
            "ClusterRoleBinding",
            meta(AGENT, namespace=None),
            roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": AGENT},
            subjects=[{"kind": "ServiceAccount", "name": AGENT, "namespace": NAMESPACE}],
        ),
        obj(RBAC, "Role", meta(AGENT), rules=list(AGENT_LEASE_RULES)),
        obj(
            RBAC,
            "RoleBinding",
            meta(AGENT),
            roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AGENT},
            subjects=[{"kind": "ServiceAccount", "name": AGENT, "namespace": NAMESPACE}],
        ),
    ]


def accounts(settings: ManifestSettings) -> list[Obj]:
    names = [AGENT, GATEWAY_SERVICE_ACCOUNT] + ([CONTROLLER, ETCD] if settings.management else [])
    return [service_account(name) for name in names]
