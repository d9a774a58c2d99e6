"""Names: Kubernetes MCS clusterset FQDNs and SPIFFE IDs.

`<svc>.<ns>.svc.clusterset.local` names a service across every cluster (namespace sameness);
`spiffe://<cluster>.<federation-domain>/ns/<ns>/sa/<sa>` names a workload. Parsing is strict:
anything a peer sends passes through here before it is trusted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.errors import InvalidNameError

CLUSTERSET_SUFFIX = "svc.clusterset.local"
DEFAULT_FEDERATION_DOMAIN = "fedgate.local"
SYSTEM_NAMESPACE = "fedgate-system"

# RFC 1123 label, as Kubernetes requires for namespaces and service names.
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,253}[a-z0-9])?$")


def check_label(value: str, what: str) -> str:
    if not _LABEL.match(value):
        raise InvalidNameError(f"{what} {value!r} is not an RFC 1123 label")
    return value


@dataclass(frozen=True, order=True, slots=True)
class ServiceKey:
    """A service across the clusterset: namespace sameness makes (namespace, name) the key."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        check_label(self.namespace, "namespace")
        check_label(self.name, "service name")

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.{CLUSTERSET_SUFFIX}"

    def __str__(self) -> str:
        return f"{self.name}.{self.namespace}"

    @classmethod
    def parse_fqdn(cls, fqdn: str) -> ServiceKey:
        """Parse `<svc>.<ns>.svc.clusterset.local` (a trailing dot is allowed, case-insensitive)."""
        name = fqdn.lower().rstrip(".")
        suffix = "." + CLUSTERSET_SUFFIX
        if not name.endswith(suffix):
            raise InvalidNameError(f"{fqdn!r} is not under {CLUSTERSET_SUFFIX}")
        parts = name[: -len(suffix)].split(".")
        if len(parts) != 2:
            raise InvalidNameError(f"{fqdn!r} is not <service>.<namespace>.{CLUSTERSET_SUFFIX}")
        return cls(namespace=parts[1], name=parts[0])

    @classmethod
    def parse_short(cls, text: str) -> ServiceKey:
        """Parse `<svc>.<ns>` as used on the command line."""
        parts = text.split(".")
        if len(parts) != 2:
            raise InvalidNameError(f"{text!r} is not <service>.<namespace>")
        return cls(namespace=parts[1], name=parts[0])


def trust_domain_for(cluster: str, federation_domain: str = DEFAULT_FEDERATION_DOMAIN) -> str:
    return f"{check_label(cluster, 'cluster name')}.{federation_domain}"


@dataclass(frozen=True, order=True, slots=True)
class SpiffeId:
    """`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, the only identity shape fedgate issues."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise InvalidNameError(f"trust domain {self.trust_domain!r} is malformed")
        check_label(self.namespace, "namespace")
        check_label(self.service_account, "service account")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise InvalidNameError(f"{uri!r} is not a spiffe:// URI")
        trust_domain, _, path = uri[len(prefix) :].partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise InvalidNameError(f"{uri!r} is not spiffe://<trust-domain>/ns/<ns>/sa/<sa>")
        return cls(trust_domain=trust_domain, namespace=parts[1], service_account=parts[3])


def gateway_identity(trust_domain: str) -> SpiffeId:
    return SpiffeId(trust_domain, SYSTEM_NAMESPACE, "gateway")


def controller_identity(federation_domain: str = DEFAULT_FEDERATION_DOMAIN) -> SpiffeId:
    """The controller lives in the federation's own trust domain, not in any one cluster's."""
    return SpiffeId(federation_domain, SYSTEM_NAMESPACE, "controller")


def controller_dns_name(federation_domain: str = DEFAULT_FEDERATION_DOMAIN) -> str:
    return f"controller.{federation_domain}"
