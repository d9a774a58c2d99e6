"""The gateway boundary's exception family. Third-party errors (aioquic, OSError) are
translated into these at the edge, with `raise ... from e`."""


class GatewayError(Exception):
    """Base of every error raised by gateway/."""


class TunnelError(GatewayError):
    """The tunnel to a peer gateway failed: handshake refused, connection lost, stream reset."""


class TunnelTimeoutError(TunnelError):
    """A tunnel step (handshake, stream reply) did not finish in time."""


class PeerDownError(TunnelError):
    """The peer gateway failed its health probes or its dials: refused at once, no dial."""


class ResolveError(PeerDownError):
    """The peer gateway's published name has no address (and never had one): no dial."""


class CallRefusedError(GatewayError):
    """A call answered with an error status; `reason` becomes the reason phrase."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class PeerUnreachableError(CallRefusedError):
    """The tunnel to the peer cluster's gateway could not be opened or died before the reply:
    about the link, not the service (the CONNECT refusal says so, `mesh.connect`)."""
