"""The bootstrap ConfigMaps and the injector webhook's `caBundle`, pure: what the cluster should
hold, and the writes that get it there.

An injected pod mounts the ConfigMap `fedgate-bootstrap` of its own namespace
(`clusters.inject.spec.identity_volume`): `ca.pem` (the cluster CA's published roots: during a
root rotation both, so a sidecar started from either side trusts the CA), `control.pem` (the
federation control plane's root, which vouches for the controller) and `trust-domain`, the
layout `ca.bootstrap.Bootstrap` reads. As istiod's namespace controller keeps
`istio-ca-root-cert`, the agent keeps that ConfigMap in every namespace labelled
`fedgate.io/inject=enabled` (the namespaces the webhook injects into), so:

* a labelled namespace (or one labelled later) gets it; a namespace being deleted does not (the
  API server refuses new objects there);
* a deleted ConfigMap comes back, and one whose keys someone edited is set back;
* a root rotation rewrites every one of them (the kubelet refreshes the mounted files);
* nothing is ever deleted: a namespace that loses the label keeps its ConfigMap, because pods
  injected there still mount it. Other keys, labels and annotations on the ConfigMap belong to
  whoever set them: the writes are server-side applies of only fedgate's fields (field manager
  `fedgate`, `force` as a controller does), so they are left alone.

The `MutatingWebhookConfiguration` `fedgate-sidecar-injector` gets the same roots as its
webhook's `clientConfig.caBundle` (`webhook_ca`): an apply of only that field of only fedgate's
webhook (`webhooks` is a map keyed by `name`), so a root rotation needs no re-render. The apply
never creates the configuration: on a real API server a configuration holding only a caBundle
fails validation (422), which the driver reports as "not installed".

No I/O, no client: `plan` compares what the informers hold with what is wanted and returns only
the writes that change something, so a resync of an unchanged cluster writes nothing.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from clusters.inject.admission import CONFIGURATION_NAME, NAMESPACE_LABEL, WEBHOOK_NAME
from clusters.kube.mcs import MANAGED_BY, MANAGER, Apply, key_of

Obj = dict[str, Any]

CONFIG_MAP = "fedgate-bootstrap"
CONFIG_MAPS = "configmaps"
WEBHOOK_CONFIGURATIONS = "mutatingwebhookconfigurations"
ENABLED = "enabled"
NAMESPACE_SELECTOR = f"{NAMESPACE_LABEL}={ENABLED}"
CONFIG_MAP_SELECTOR = f"metadata.name={CONFIG_MAP}"  # a field selector: every namespace's one
WEBHOOK_API_VERSION = "admissionregistration.k8s.io/v1"


@dataclass(frozen=True, slots=True)
class BootstrapData:
    """What the ConfigMap carries: the cluster's published roots (PEM, newest last), the
    control plane's root (PEM) and the trust domain."""

    cluster_roots: tuple[str, ...]
    control_root_pem: str
    trust_domain: str

    def __post_init__(self) -> None:
        if not self.cluster_roots or not self.control_root_pem.strip() or not self.trust_domain:
            raise ValueError(
                "bootstrap data needs the cluster roots, the control root and a trust domain"
            )

    @property
    def ca_pem(self) -> str:
        return "".join(r if r.endswith("\n") else r + "\n" for r in self.cluster_roots)

    def data(self) -> dict[str, str]:
        return {
            "ca.pem": self.ca_pem,
            "control.pem": self.control_root_pem,
            "trust-domain": self.trust_domain,
        }


def config_map(namespace: str, data: BootstrapData, name: str = CONFIG_MAP) -> Obj:
    """The ConfigMap (apply configuration) of one namespace."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": {MANAGED_BY: MANAGER}},
        "data": data.data(),
    }


def wants_bootstrap(namespace: Mapping[str, Any]) -> bool:
    """A namespace labelled for injection and not being deleted."""
    meta = namespace.get("metadata") or {}
    terminating = meta.get("deletionTimestamp") or (
        (namespace.get("status") or {}).get("phase") == "Terminating"
    )
    return (meta.get("labels") or {}).get(NAMESPACE_LABEL) == ENABLED and not terminating


def _holds(held: Mapping[str, Any], wanted: Obj) -> bool:
    labels = (held.get("metadata") or {}).get("labels") or {}
    data = held.get("data") or {}
    return labels.get(MANAGED_BY) == MANAGER and all(
        data.get(k) == v for k, v in wanted["data"].items()
    )


def plan(
    namespaces: Iterable[Mapping[str, Any]],
    config_maps: Iterable[Mapping[str, Any]],
    data: BootstrapData,
    name: str = CONFIG_MAP,
) -> tuple[Apply, ...]:
    """The applies that give every namespace that `wants_bootstrap` its ConfigMap `name`
    holding `data`, in namespace order. `config_maps`: the cluster's ConfigMaps of that name
    (others are ignored)."""
    held = {key_of(c)[0]: c for c in config_maps if key_of(c)[1] == name}
    writes: list[Apply] = []
    for ns in sorted(
        str((n.get("metadata") or {}).get("name")) for n in namespaces if wants_bootstrap(n)
    ):
        wanted = config_map(ns, data, name)
        current = held.get(ns)
        if current is None or not _holds(current, wanted):
            writes.append(Apply(CONFIG_MAPS, ns, name, wanted))
    return tuple(writes)


def ca_bundle(data: BootstrapData) -> str:
    """`clientConfig.caBundle`: the roots' PEM, base64 (the field is `[]byte` in the API)."""
    return base64.b64encode(data.ca_pem.encode()).decode()


def webhook_ca(data: BootstrapData) -> Apply:
    """The apply of only fedgate's webhook's `caBundle` in `fedgate-sidecar-injector`."""
    body: Obj = {
        "apiVersion": WEBHOOK_API_VERSION,
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION_NAME},
        "webhooks": [{"name": WEBHOOK_NAME, "clientConfig": {"caBundle": ca_bundle(data)}}],
    }
    return Apply(WEBHOOK_CONFIGURATIONS, "", CONFIGURATION_NAME, body)


def webhook_holds(held: Mapping[str, Any] | None, data: BootstrapData) -> bool:
    """Whether the configuration `held` (None: not read yet) already carries the roots."""
    if held is None:
        return False
    hooks = [h for h in held.get("webhooks") or [] if h.get("name") == WEBHOOK_NAME]
    return bool(hooks) and all(
        (h.get("clientConfig") or {}).get("caBundle") == ca_bundle(data) for h in hooks
    )
