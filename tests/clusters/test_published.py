"""The gateway address published from a LoadBalancer Service's status (clusters.published)."""

from __future__ import annotations

from typing import Any

import pytest

from clusters.published import published_host, published_port, published_tunnel


def svc(*ingress: dict[str, Any], ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "fedgate-gateway", "namespace": "fedgate-system"},
        "spec": {"type": "LoadBalancer", "ports": ports or []},
        "status": {"loadBalancer": {"ingress": list(ingress)}},
    }


AWS = "a1b2c3-123456789.elb.eu-west-1.amazonaws.com"


@pytest.mark.parametrize(
    ("ingress", "host"),
    [
        (({"ip": "203.0.113.7"},), "203.0.113.7"),  # GKE, MetalLB
        (({"hostname": AWS},), AWS),  # AWS ELB/NLB
        (({"hostname": AWS.upper() + "."},), AWS),  # normalised
        (({"ip": "203.0.113.7", "hostname": AWS},), "203.0.113.7"),  # both: the IP
        (({"ip": "2001:db8::7"},), "2001:db8::7"),
        (({"hostname": "bad_name!"}, {"ip": "203.0.113.8"}), "203.0.113.8"),  # skipped
        (({"ip": "not-an-ip"}, {"hostname": AWS}), AWS),
        (({"hostname": AWS}, {"ip": "203.0.113.9"}), AWS),  # the first valid entry
        ((), None),  # still provisioning
    ],
)
def test_the_published_host_is_the_first_ingress_ip_or_hostname(
    ingress: tuple[dict[str, Any], ...], host: str | None
) -> None:
    assert published_host(svc(*ingress)) == host


def test_a_service_without_status_publishes_nothing() -> None:
    assert published_host({"spec": {"type": "LoadBalancer"}}) is None
    assert published_tunnel({"status": {"loadBalancer": {}}}) is None


def test_the_port_is_the_tunnel_port_of_the_service() -> None:
    ports = [{"name": "status", "port": 15021}, {"name": "tunnel", "port": 443}]
    assert published_port(svc(ports=ports)) == 443
    assert published_port(svc(ports=[{"name": "tls", "port": 8443}])) == 8443
    assert published_port(svc(ports=[{"name": "other", "port": 80}])) == 15443


def test_published_tunnel_is_host_port_as_the_agent_takes_it() -> None:
    # fedgate.wiring.parse_hostport splits at the last colon.
    ports = [{"name": "tunnel", "port": 15443, "protocol": "TCP"}]
    assert published_tunnel(svc({"hostname": AWS}, ports=ports)) == f"{AWS}:15443"
    assert published_tunnel(svc({"ip": "2001:db8::7"}, ports=ports)) == "2001:db8::7:15443"
