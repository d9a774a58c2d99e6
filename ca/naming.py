"""Where a proxy finds the CA, and the DNS names the CA and gateways carry: for `ca.client` and
the gateway, without the CA's gRPC server module (`ca.service`, which loads grpc) on a proxy's
import path."""

from __future__ import annotations

from ca.errors import IssuanceError
from mesh.naming import SYSTEM_NAMESPACE, SpiffeId


def ca_server_name(trust_domain: str) -> str:
    return f"ca.{trust_domain}"


def renew_address_for(address: str) -> str:
    """The default renewal address: the bootstrap address's port + 1."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise IssuanceError(f"CA address {address!r} is not host:port")
    return f"{host}:{int(port) + 1}"


def dns_names_for(spiffe_id: SpiffeId) -> tuple[str, ...]:
    """Gateways also carry a DNS SAN so QUIC/TLS peers can verify them by name."""
    if spiffe_id.namespace == SYSTEM_NAMESPACE and spiffe_id.service_account == "gateway":
        return (f"gateway.{spiffe_id.trust_domain}",)
    return ()
