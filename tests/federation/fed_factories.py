"""Small builders for model values in the federation tests."""

from __future__ import annotations

from mesh.model import ClusterInfo, Endpoint, GatewayAddress, ServiceExport, ServicePort
from mesh.naming import ServiceKey, SpiffeId, trust_domain_for

HTTP = ServicePort("http", 8080, "HTTP")


def info(cluster: str, roots: tuple[str, ...] | None = None) -> ClusterInfo:
    return ClusterInfo(
        name=cluster,
        trust_domain=trust_domain_for(cluster),
        gateway=GatewayAddress("127.0.0.1", 15443, "127.0.0.1", 15001, "tls"),
        roots=roots if roots is not None else (f"ROOT-{cluster}",),
        region=f"region-{cluster}",
    )


def endpoint(cluster: str, address: str, pod: str = "", namespace: str = "demo") -> Endpoint:
    identity = SpiffeId(trust_domain_for(cluster), namespace, "default")
    return Endpoint(cluster, address, pod or f"pod-{address.replace('.', '-')}", identity)


def export(
    cluster: str,
    name: str = "echo",
    namespace: str = "demo",
    ports: tuple[ServicePort, ...] = (HTTP,),
    created: float = 1000.0,
    addresses: tuple[str, ...] = ("10.0.0.1",),
) -> ServiceExport:
    return ServiceExport(
        cluster=cluster,
        key=ServiceKey(namespace, name),
        ports=ports,
        created=created,
        endpoints=tuple(endpoint(cluster, a, namespace=namespace) for a in addresses),
    )
