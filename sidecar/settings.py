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
    `multiplex`: carry per-connection (TCP) calls as streams of pooled mTLS connections to
    each destination (`sidecar.smux`): at most `mux_connections` per destination, each with
    at most `mux_streams` streams, closed after `mux_idle_timeout` s without streams and
    retired after `mux_max_age` s. Off: one connection and handshake per call.
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
    multiplex: bool = True
    mux_streams: int = 128
    mux_connections: int = 4
    mux_idle_timeout: float = 30.0
    mux_max_age: float = 600.0

    def __post_init__(self) -> None:
        for name in ("outbound_port", "inbound_port", "dns_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ValueError(f"{name} {port} is outside 0..65535")
        if self.connect_timeout <= 0 or self.setup_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.mux_streams < 1 or self.mux_connections < 1:
            raise ValueError("mux_streams and mux_connections must be at least 1")
        if self.mux_idle_timeout <= 0 or self.mux_max_age <= 0:
            raise ValueError("mux_idle_timeout and mux_max_age must be positive")
