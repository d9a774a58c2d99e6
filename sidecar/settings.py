"""The sidecar's settings, parsed once at the edge (fedgate/) and passed in."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.capture import CAPTURE_GID


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    """One pod's sidecar.

    `cluster`, `pod`, `namespace`: who this sidecar serves (logged with every connection).
    `outbound_port`: where captured outgoing TCP is redirected (listens on `outbound_host`).
    `inbound_port`: the mutual-TLS port of every sidecar; callers connect to
    `<endpoint address>:<inbound_port>`, so it must be the same across the mesh.
    `dns_host`/`dns_port`: the clusterset DNS server (the pod's resolv.conf points here).
    `capture`: install the iptables rules in the current network namespace on `start()`.
    `app_host`: where the pod's applications listen (the inbound connects to `app_host:<port>`).
    Ports may be 0 (ephemeral) for tests; the bound addresses are on the `Sidecar`.
    """

    cluster: str
    pod: str
    namespace: str
    outbound_port: int = 15001
    inbound_port: int = 15006
    dns_host: str = "127.0.0.1"
    dns_port: int = 53
    capture: bool = False
    outbound_host: str = "0.0.0.0"
    inbound_host: str = "0.0.0.0"
    app_host: str = "127.0.0.1"
    proxy_gid: int = CAPTURE_GID
    connect_timeout: float = 5.0
    # Connect, CONNECT exchange, TLS handshake and stream header together, per connection.
    setup_timeout: float = 10.0
    dns_ttl: int = 5

    def __post_init__(self) -> None:
        for name in ("outbound_port", "inbound_port", "dns_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ValueError(f"{name} {port} is outside 0..65535")
        if self.connect_timeout <= 0 or self.setup_timeout <= 0:
            raise ValueError("timeouts must be positive")
