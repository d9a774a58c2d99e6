"""Transparent traffic capture inside a pod's network namespace (Istio-style iptables).

`capture_rules` is a pure function returning `iptables-restore` text for the pod netns:

- nat OUTPUT (chain `FEDGATE_OUTPUT`): TCP from processes whose GID is the sidecar's (1337)
  returns untouched, so the sidecar's own connections are never looped back into itself; TCP to
  `lo` or 127.0.0.0/8 returns (local calls stay local); every other TCP connection is REDIRECTed
  to the outbound port (15001), where `original_dst` recovers where it was going.
- filter INPUT (chain `FEDGATE_INBOUND`): accept `lo`, established/related, and new TCP to the
  inbound port (15006) and to each of `accept_ports` (none in the rig; the sidecar's probe port
  in Kubernetes, `fedgate inject`); drop every other inbound connection attempt (SYN), so a pod's
  applications are reachable only through the sidecar's mutual TLS.

Both tables act on SYNs only. The sidecar opens its config stream before it captures, and the
first nat rule starts connection tracking in the namespace: the next packet of a connection that
already exists is then tracked as NEW. Matching NEW alone would drop that stream's next inbound
packet (and every retransmission), or redirect an app's open connection mid-stream; a non-SYN
packet cannot open a connection, so leaving it alone admits nothing new.

`install` runs `iptables-restore` (it replaces the nat and filter tables of the namespace it runs
in: call it only inside a pod namespace). `original_dst` reads SO_ORIGINAL_DST from an accepted
socket. What this module does not do: IPv6 (`ip6tables`), UDP/DNS capture, or creating namespaces.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
from dataclasses import dataclass

from sidecar.errors import CaptureError

CAPTURE_GID = 1337
# linux/netfilter_ipv4.h: SO_ORIGINAL_DST at level SOL_IP returns a struct sockaddr_in.
SO_ORIGINAL_DST = 80
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # sin_family (skipped), sin_port, sin_addr, zero
OUTPUT_CHAIN = "FEDGATE_OUTPUT"
INBOUND_CHAIN = "FEDGATE_INBOUND"


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """Ports and the GID the rules are generated for."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    proxy_gid: int = CAPTURE_GID
    # Inbound ports accepted without the sidecar's mTLS: in Kubernetes, the sidecar's own
    # probe/metrics port, which the kubelet and Prometheus reach from outside the pod.
    accept_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name, port in (
            ("outbound_port", self.outbound_port),
            ("inbound_port", self.inbound_port),
            *(("accept_ports", p) for p in self.accept_ports),
        ):
            if not 0 < port < 65536:
                raise ValueError(f"{name} {port} is outside 1..65535")
        if self.proxy_gid < 0:
            raise ValueError(f"proxy_gid {self.proxy_gid} is negative")


def capture_rules(config: CaptureConfig) -> str:
    """The `iptables-restore` input for a pod namespace (both tables, committed atomically)."""
    lines = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        f":{OUTPUT_CHAIN} - [0:0]",
        f"-A OUTPUT -p tcp -j {OUTPUT_CHAIN}",
        # The sidecar's own sockets (GID 1337) must escape capture or they would loop forever.
        f"-A {OUTPUT_CHAIN} -m owner --gid-owner {config.proxy_gid} -j RETURN",
        f"-A {OUTPUT_CHAIN} -o lo -j RETURN",
        f"-A {OUTPUT_CHAIN} -d 127.0.0.0/8 -j RETURN",
        f"-A {OUTPUT_CHAIN} -p tcp --syn -j REDIRECT --to-ports {config.outbound_port}",
        "COMMIT",
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        f":{INBOUND_CHAIN} - [0:0]",
        f"-A INPUT -j {INBOUND_CHAIN}",
        f"-A {INBOUND_CHAIN} -i lo -j ACCEPT",
        f"-A {INBOUND_CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A {INBOUND_CHAIN} -p tcp --dport {config.inbound_port} -j ACCEPT",
        *(f"-A {INBOUND_CHAIN} -p tcp --dport {p} -j ACCEPT" for p in config.accept_ports),
        f"-A {INBOUND_CHAIN} -p tcp --syn -m conntrack --ctstate NEW -j DROP",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


_FAILED_LINE = re.compile(r"line:?\s*(\d+)")


def install(rules: str, iptables_restore: str = "iptables-restore", timeout: float = 10.0) -> None:
    """Apply `rules` in the current network namespace; CaptureError names the failing rule."""
    try:
        proc = subprocess.run(  # fixed argv, no shell
            [iptables_restore, "--wait"],
            input=rules,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise CaptureError(f"{iptables_restore} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise CaptureError(f"{iptables_restore} did not finish within {timeout} s") from e
    if proc.returncode == 0:
        return
    message = (proc.stderr or proc.stdout).strip()
    match = _FAILED_LINE.search(message)
    lines = rules.splitlines()
    if match and 0 < int(match.group(1)) <= len(lines):
        n = int(match.group(1))
        raise CaptureError(f"iptables-restore rejected line {n} {lines[n - 1]!r}: {message}")
    raise CaptureError(f"iptables-restore failed (exit {proc.returncode}): {message}")


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going before capture: (IPv4 address, port)."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
    except OSError as e:
        raise CaptureError(
            f"SO_ORIGINAL_DST unavailable (not a redirected connection?): {e}"
        ) from e
    if len(raw) < _SOCKADDR_IN.size:
        raise CaptureError(f"SO_ORIGINAL_DST returned {len(raw)} bytes, expected sockaddr_in")
    port, addr = _SOCKADDR_IN.unpack_from(raw)
    return socket.inet_ntoa(addr), port


def drop_to_capture_gid(gid: int = CAPTURE_GID) -> None:
    """Make this process's GID `gid` (before it opens sockets) so its traffic escapes capture.

    `-m owner --gid-owner` matches the socket's creator's filesystem GID, which follows the
    effective GID; supplementary groups are cleared so nothing else matches by accident.
    """
    try:
        os.setgroups([])
        os.setgid(gid)
    except OSError as e:
        raise CaptureError(f"cannot switch to GID {gid} (needs root or CAP_SETGID): {e}") from e
    if os.getegid() != gid:
        raise CaptureError(f"effective GID is {os.getegid()} after setgid({gid})")
