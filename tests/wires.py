"""Run a module's config-stream and CA client tests over both gRPC clients (issue 17).

`wire` rebinds the module's `ConfigClient` and `obtain_svid` to the real ones with `wire=` set,
and `ProxyWiring` to one with `grpc_client=` set,
so every existing test runs unchanged against the real grpcio servers with each client."""

from __future__ import annotations

import functools
from collections.abc import Callable

import grpc
import pytest

from ca.authority import CertificateAuthority
from ca.client import obtain_svid
from ca.verify import utcnow
from federation.api.client import ConfigClient
from federation.api.wire import WIRES
from federation.generate import generate
from federation.merge import merge
from federation.server import ConfigDiscoveryServicer, ConfigServer, SnapshotPublisher, serve
from fedgate.wiring import ProxyWiring
from mesh.naming import controller_dns_name, controller_identity
from tests.federation.fed_factories import export, info


@pytest.fixture(params=WIRES)
def wire(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    real: dict[str, Callable[..., object]] = {
        "ConfigClient": ConfigClient,
        "obtain_svid": obtain_svid,
    }
    for name, function in real.items():
        if hasattr(request.module, name):
            bound = functools.partial(function, wire=request.param)
            monkeypatch.setattr(request.module, name, bound)
    if hasattr(request.module, "ProxyWiring"):  # fedgate's wiring: CA renewal and config
        wiring = functools.partial(ProxyWiring, grpc_client=request.param)
        monkeypatch.setattr(request.module, "ProxyWiring", wiring)
    return str(request.param)


async def tls_config_server(client_root_pem: bytes) -> tuple[ConfigServer, bytes]:
    """A config server with one snapshot, presenting the controller's identity (issued by a
    fresh control-plane CA, whose root is returned) and requiring a client certificate
    signed by `client_root_pem`."""
    control = CertificateAuthority.create("fedgate.local", utcnow())
    own = control.issue(controller_identity(), utcnow(), dns_names=(controller_dns_name(),))
    creds = grpc.ssl_server_credentials(
        [(own.key_pem, own.cert_pem)], root_certificates=client_root_pem, require_client_auth=True
    )
    publisher = SnapshotPublisher()
    clusters = [info("east")]
    publisher.update(generate(clusters, merge(clusters, [export("east")], {}), []))
    return await serve(ConfigDiscoveryServicer(publisher), "127.0.0.1:0", creds), control.root_pem
