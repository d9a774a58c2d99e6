"""Virtual IP allocation maths, pure: the lowest free address of 10.255.0.0/16.

Host addresses ending in .0 or .255 are skipped: some stacks and middleboxes still treat them as
network/broadcast addresses of a /24. The store (`federation.store.VipStore`) makes allocation
atomic with an etcd transaction; this module only decides which address comes next.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

VIP_NETWORK = ipaddress.IPv4Network("10.255.0.0/16")


class VipExhaustedError(RuntimeError):
    """Every usable address of the VIP range is taken."""


def usable(address: ipaddress.IPv4Address) -> bool:
    last = int(address) & 0xFF
    return address in VIP_NETWORK and last not in (0, 255)


def free_vips(used: Iterable[str]) -> Iterator[str]:
    """Usable VIPs not in `used`, lowest first (malformed entries in `used` are ignored)."""
    taken: set[int] = set()
    for text in used:
        try:
            taken.add(int(ipaddress.IPv4Address(text)))
        except ValueError:
            continue
    for value in range(int(VIP_NETWORK.network_address), int(VIP_NETWORK.broadcast_address) + 1):
        if value in taken:
            continue
        address = ipaddress.IPv4Address(value)
        if usable(address):
            yield str(address)


def allocate(count: int, used: Iterable[str]) -> list[str]:
    """The `count` lowest free VIPs; raises `VipExhaustedError` if there are not enough."""
    out: list[str] = []
    if count <= 0:
        return out
    for vip in free_vips(used):
        out.append(vip)
        if len(out) == count:
            return out
    raise VipExhaustedError(f"only {len(out)} of {count} VIPs free in {VIP_NETWORK}")
