"""The controller-owned etcd keys: VIP allocations and the applied traffic policies.

Unlike the catalog these keys carry no lease: they are the federation's own state and must
survive every agent and controller restart, so a service keeps its VIP for ever once allocated
(a VIP is never handed to another service, even after its last export disappears; reclaiming
them is a later, deliberate operation).

Allocation is one etcd transaction per round: read every VIP at revision R, choose the lowest
free addresses (`federation.vip`), then create the keys only if each is still absent AND no key
under /fedgate/vips/ changed after R. Two controllers racing cannot hand one address to two
services: the loser re-reads and retries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

import structlog
from etcd3aio import Etcd3Client, prefix_range_end

from federation import keys
from federation.errors import StoreConflictError
from federation.etcd import store_errors
from federation.store import DEFAULT_TIMEOUT, TXN_ATTEMPTS, kv_service, unchanged_since
from federation.vip import allocate, usable
from mesh.codec import decode, dumps, policy_from_json, policy_to_json
from mesh.errors import MeshError
from mesh.model import TrafficPolicy
from mesh.naming import ServiceKey

_log = structlog.get_logger("fedgate.federation.owned")


class ControllerStore:
    """Reads and writes /fedgate/vips/ and /fedgate/config/policies/."""

    def __init__(self, client: Etcd3Client, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._client = client
        self._timeout = timeout

    async def _vips_at(self) -> tuple[dict[ServiceKey, str], set[str], set[ServiceKey], int]:
        """(valid VIPs by service, every address in use, services with a bad VIP, revision)."""
        kv = kv_service(self._client)
        with store_errors("read VIPs"):
            response = await kv.get(
                keys.VIPS_PREFIX, prefix_range_end(keys.VIPS_PREFIX), timeout=self._timeout
            )
        vips: dict[ServiceKey, str] = {}
        used: set[str] = set()
        broken: set[ServiceKey] = set()
        owner: dict[str, ServiceKey] = {}
        for item in response.kvs:
            key = item.key.decode("utf-8", "replace")
            value = item.value.decode("utf-8", "replace").strip()
            used.add(value)  # even a malformed entry keeps its address out of reuse
            try:
                service = keys.parse_service_key(keys.VIPS_PREFIX, key)
            except ValueError as e:
                _log.warning("skipping malformed VIP key", key=key, error=str(e))
                continue
            try:
                if not usable(ipaddress.IPv4Address(value)):
                    raise ValueError(f"{value!r} is outside the VIP range")
            except ValueError as e:
                _log.warning("malformed VIP, it will be reallocated", key=key, error=str(e))
                broken.add(service)
                continue
            if value in owner:
                _log.error(
                    "VIP assigned twice", vip=value, services=[str(owner[value]), str(service)]
                )
            owner.setdefault(value, service)
            vips[service] = value
        return vips, used, broken, int(response.header.revision)

    async def vips(self) -> dict[ServiceKey, str]:
        return (await self._vips_at())[0]

    async def ensure_vips(self, services: Iterable[ServiceKey]) -> dict[ServiceKey, str]:
        """Allocate a VIP to every service in `services` that has none; return all VIPs."""
        wanted = set(services)
        kv = kv_service(self._client)
        for _ in range(TXN_ATTEMPTS):
            vips, used, broken, revision = await self._vips_at()
            missing = sorted(wanted - vips.keys())
            if not missing:
                return vips
            new = dict(zip(missing, allocate(len(missing), used), strict=True))
            # Create-if-absent; a corrupt value (in `broken`) is replaced, guarded by the range
            # compare like everything else.
            compare = [unchanged_since(keys.VIPS_PREFIX, revision)]
            compare += [
                kv.txn_compare_create_revision(keys.vip_key(s), 0)
                for s in missing
                if s not in broken
            ]
            puts = [kv.txn_op_put(keys.vip_key(s), vip) for s, vip in new.items()]
            with store_errors("allocate VIPs"):
                result = await kv.txn(compare, puts, timeout=self._timeout)
            if result.succeeded:
                for service, vip in new.items():
                    _log.info("VIP allocated", service=str(service), vip=vip)
                return {**vips, **new}
        raise StoreConflictError(f"VIP allocation lost {TXN_ATTEMPTS} transactions in a row")

    async def write_policies(self, policies: Sequence[TrafficPolicy]) -> None:
        """Make /fedgate/config/policies/ hold exactly `policies`, in one transaction."""
        by_key = {keys.policy_key(p.key).encode(): dumps(policy_to_json(p)) for p in policies}
        if len(by_key) != len(policies):
            raise ValueError("two policies for one service")
        kv = kv_service(self._client)
        prefix = keys.POLICIES_PREFIX
        for _ in range(TXN_ATTEMPTS):
            with store_errors("read policies"):
                current = await kv.get(prefix, prefix_range_end(prefix), timeout=self._timeout)
            existing = {item.key: bytes(item.value) for item in current.kvs}
            if existing == by_key:
                return
            ops = [kv.txn_op_put(k, v) for k, v in by_key.items() if existing.get(k) != v]
            ops += [kv.txn_op_delete(k) for k in existing if k not in by_key]
            with store_errors("write policies"):
                result = await kv.txn(
                    [unchanged_since(prefix, int(current.header.revision))],
                    ops,
                    timeout=self._timeout,
                )
            if result.succeeded:
                _log.info("policies written", count=len(by_key), changed=len(ops))
                return
        raise StoreConflictError(f"policy write lost {TXN_ATTEMPTS} transactions in a row")

    async def policies(self) -> tuple[TrafficPolicy, ...]:
        kv = kv_service(self._client)
        prefix = keys.POLICIES_PREFIX
        with store_errors("read policies"):
            response = await kv.get(prefix, prefix_range_end(prefix), timeout=self._timeout)
        out: list[TrafficPolicy] = []
        for item in response.kvs:
            key = item.key.decode("utf-8", "replace")
            try:
                service = keys.parse_service_key(prefix, key)
                policy: TrafficPolicy = decode(item.value, policy_from_json, key)
                if policy.key != service:
                    raise ValueError(f"value is the policy of {policy.key}")
            except (ValueError, MeshError) as e:
                _log.warning("skipping malformed policy key", key=key, error=str(e))
                continue
            out.append(policy)
        return tuple(out)
