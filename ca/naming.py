"""Where a proxy finds the CA and what the CA's certificate names: for `ca.client`, without
the CA's gRPC server module (`ca.service`, which loads grpc) on a proxy's import path."""

from __future__ import annotations

from ca.errors import IssuanceError


def ca_server_name(trust_domain: str) -> str:
    return f"ca.{trust_domain}"


def renew_address_for(address: str) -> str:
    """The default renewal address: the bootstrap address's port + 1."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise IssuanceError(f"CA address {address!r} is not host:port")
    return f"{host}:{int(port) + 1}"
