"""The sidecar boundary's exception family.

Third-party and OS errors are translated into these at the edge (`raise ... from e`), so callers
(the lead's wiring, the admin endpoint) handle one family with messages a reader can act on.
"""


class SidecarError(Exception):
    """Base of every error raised by sidecar/."""


class CaptureError(SidecarError):
    """Traffic capture could not be installed or queried (iptables, SO_ORIGINAL_DST, setgid)."""


class DnsFormatError(SidecarError):
    """A DNS message is malformed, oversized, or uses a construct we refuse (RFC 1035 §4.1)."""


class ProxyError(SidecarError):
    """One proxied connection failed; `reason` is the short category logged with it."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class UnprocessedError(ProxyError):
    """A request the upstream provably never processed (an HTTP/2 stream refused or above a
    GOAWAY's last-stream-id, a stale pooled HTTP/1.1 connection): safe to send again."""


class ConfigRejectedError(SidecarError):
    """A snapshot or identity cannot be applied; the sidecar keeps running on the last good one."""
