"""The address a cluster publishes for its gateway, from the gateway's Kubernetes Service.

A `LoadBalancer` Service's `status.loadBalancer.ingress` lists where the load balancer
answers: an `ip` (GKE, MetalLB, kind's cloud-provider-kind) or a `hostname` (AWS ELB/NLB, some
others), possibly both in one entry. The published address is the first entry's `ip`, else its
`hostname` (Istio's choice for its east-west gateway); entries that are neither a valid IP
address nor a valid DNS name are skipped. No entry yet (the load balancer is being
provisioned): None, and nothing is published until one appears. A hostname is published as is:
the peers' gateways resolve it and follow its changes (`gateway.resolve`), so an address behind
the name may change without a new publication.

Pure: the caller hands in the Service as the API returns it (a dict). What it does not do:
watch the Service (the Kubernetes source does; wiring: docs/kubernetes.md, "Gateway address").
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

# RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
TUNNEL_PORT_NAMES = ("tunnel", "tls")
DEFAULT_TUNNEL_PORT = 15443


def _ip(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _hostname(value: object) -> str | None:
    if not isinstance(value, str) or not _HOSTNAME.match(value) or _ip(value) is not None:
        return None
    return value.rstrip(".").lower()


def published_host(service: Mapping[str, Any]) -> str | None:
    """The host (IP address or DNS name) the load balancer of `service` answers on; None
    while it has none."""
    status = service.get("status") or {}
    ingress = (status.get("loadBalancer") or {}).get("ingress") or []
    for entry in ingress:
        if not isinstance(entry, Mapping):
            continue
        host = _ip(entry.get("ip")) or _hostname(entry.get("hostname"))
        if host is not None:
            return host
    return None


def published_port(service: Mapping[str, Any]) -> int:
    """The Service port peers dial: the one named `tunnel` (or `tls`), else the one that is
    15443, else 15443."""
    ports = [p for p in (service.get("spec") or {}).get("ports") or [] if isinstance(p, Mapping)]
    for name in TUNNEL_PORT_NAMES:
        for p in ports:
            if p.get("name") == name and isinstance(p.get("port"), int):
                return int(p["port"])
    return DEFAULT_TUNNEL_PORT


def published_tunnel(service: Mapping[str, Any]) -> str | None:
    """`host:port` as the agent's `--gateway-tunnel` takes it (split at the last colon, so an
    IPv6 address goes unbracketed); None while the load balancer has no address."""
    host = published_host(service)
    return None if host is None else f"{host}:{published_port(service)}"
