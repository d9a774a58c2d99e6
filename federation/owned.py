"""The controller-owned etcd keys: VIP allocations, the policy seed, and status write-back.

Unlike the catalog these keys carry no lease: they are the federation's own state and must
survive every agent and controller restart, so a service keeps its VIP for ever once allocated
(a VIP is never handed to another service, even after its last export disappears; reclaiming
them is a later, deliberate operation).

Allocation is one etcd transaction per round: read every VIP at revision R, choose the lowest
free addresses (`federation.vip`), then create the keys only if each is still absent AND no key
under /fedgate/vips/ changed after R. Two controllers racing cannot hand one address to two
services: the loser re-reads and retries.

With several replicas only the leader writes here: every write carries the leader's fence
(federation.leader: `create_revision(/fedgate/leader) == term`). When a fenced transaction
fails, the store re-reads the leader key to tell "someone else leads now" (`NotLeaderError`,
and the election steps down) from an ordinary write conflict (retried).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import structlog
from etcd3aio import Etcd3Client, prefix_range_end

from federation import keys
from federation.errors import NotLeaderError, StoreConflictError
from federation.etcd import store_errors
from federation.store import (
    DEFAULT_TIMEOUT,
    TXN_ATTEMPTS,
    TXN_MAX_OPS,
    kv_service,
    load_prefix,
    unchanged_since,
)
from federation.vip import allocate, usable
from mesh.codec import decode, dumps, policy_from_json, policy_to_json
from mesh.errors import MeshError
from mesh.model import TrafficPolicy
from mesh.naming import ServiceKey

_log = structlog.get_logger("fedgate.federation.owned")

VIP_BATCH = 100  # services per allocation transaction (each costs a compare and a put)


class Fence(Protocol):
    """What makes a transaction a leader write (federation.leader.LeaderElection)."""

    def fence(self) -> list[Any]:
        """Compares to add to the transaction; raises NotLeaderError when not leading."""
        ...

    def step_down(self, reason: str) -> None: ...


class ControllerStore:
    """Reads and writes /fedgate/vips/, /fedgate/config/policies/ and /fedgate/status/."""

    def __init__(
        self, client: Etcd3Client, *, fence: Fence | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._client = client
        self._fence = fence
        self._timeout = timeout

    def _compares(self) -> list[Any]:
        return self._fence.fence() if self._fence is not None else []

    async def _check_fence(self, compares: list[Any], what: str) -> None:
        """After a failed fenced transaction: raise NotLeaderError if the fence is why."""
        if not compares or self._fence is None:
            return
        kv = kv_service(self._client)
        with store_errors("read leader key"):
            current = await kv.get(keys.LEADER_KEY, timeout=self._timeout)
        term = int(compares[0].create_revision)
        found = int(current.kvs[0].create_revision) if current.kvs else 0
        if found != term:
            self._fence.step_down(f"{what}: leader key term {found}, ours {term}")
            raise NotLeaderError(f"{what}: this replica no longer leads (term {term})")

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
        """Allocate a VIP to every service in `services` that has none; return all VIPs.

        At most VIP_BATCH services per transaction (etcd caps compares and operations per
        transaction at --max-txn-ops, 128 by default), so a thousand new services take ten.
        """
        wanted = set(services)
        vips: dict[ServiceKey, str] = {}
        while True:
            vips, missing = await self._allocate_batch(wanted)
            if not missing:
                return vips

    async def _allocate_batch(
        self, wanted: set[ServiceKey]
    ) -> tuple[dict[ServiceKey, str], list[ServiceKey]]:
        """Allocate up to VIP_BATCH missing VIPs; (all VIPs, services still missing one)."""
        kv = kv_service(self._client)
        for _ in range(TXN_ATTEMPTS):
            vips, used, broken, revision = await self._vips_at()
            missing = sorted(wanted - vips.keys())[:VIP_BATCH]
            if not missing:
                return vips, []
            new = dict(zip(missing, allocate(len(missing), used), strict=True))
            # Create-if-absent; a corrupt value (in `broken`) is replaced, guarded by the range
            # compare like everything else.
            fence = self._compares()
            compare = [*fence, unchanged_since(keys.VIPS_PREFIX, revision)]
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
                vips = {**vips, **new}
                return vips, sorted(wanted - vips.keys())
            await self._check_fence(fence, "allocate VIPs")
        raise StoreConflictError(f"VIP allocation lost {TXN_ATTEMPTS} transactions in a row")

    async def write_policies(
        self, policies: Sequence[TrafficPolicy], *, seed: bool = False
    ) -> bool:
        """Make /fedgate/config/policies/ hold exactly `policies`, in one transaction.

        With `seed`, only while no GitOps commit was applied (/fedgate/config/commit absent):
        the config directory seeds a federation, it never overrides GitOps. Returns False when
        a commit made the seed moot.
        """
        by_key = {keys.policy_key(p.key).encode(): dumps(policy_to_json(p)) for p in policies}
        if len(by_key) != len(policies):
            raise ValueError("two policies for one service")
        kv = kv_service(self._client)
        prefix = keys.POLICIES_PREFIX
        for _ in range(TXN_ATTEMPTS):
            with store_errors("read policies"):
                current = await kv.get(prefix, prefix_range_end(prefix), timeout=self._timeout)
                commit = await kv.get(keys.COMMIT_KEY, count_only=True, timeout=self._timeout)
            if seed and commit.count:
                _log.info("GitOps config present, policy seed skipped")
                return False
            existing = {item.key: bytes(item.value) for item in current.kvs}
            if existing == by_key:
                return True
            ops = [kv.txn_op_put(k, v) for k, v in by_key.items() if existing.get(k) != v]
            ops += [kv.txn_op_delete(k) for k in existing if k not in by_key]
            fence = self._compares()
            compare = [*fence, unchanged_since(prefix, int(current.header.revision))]
            if seed:
                compare.append(kv.txn_compare_create_revision(keys.COMMIT_KEY, 0))
            with store_errors("write policies"):
                result = await kv.txn(compare, ops, timeout=self._timeout)
            if result.succeeded:
                _log.info("policies written", count=len(by_key), changed=len(ops))
                return True
            await self._check_fence(fence, "write policies")
        raise StoreConflictError(f"policy write lost {TXN_ATTEMPTS} transactions in a row")

    async def read(self, prefix: str) -> dict[str, bytes]:
        """Every key under `prefix` (paged, at one revision)."""
        loaded = await load_prefix(self._client, prefix, timeout=self._timeout)
        return {e.key: e.value for e in loaded.events if e.value is not None}

    async def write_status(self, puts: Mapping[str, bytes], deletes: Sequence[str]) -> int:
        """Leader write-back: put and delete status keys, fenced, <= TXN_MAX_OPS per txn.

        Status keys have one writer (the leader), so no data compare is needed; a failure is
        the fence's (NotLeaderError). Returns the number of operations written.
        """
        kv = kv_service(self._client)
        ops = [kv.txn_op_put(k, v) for k, v in puts.items()]
        ops += [kv.txn_op_delete(k) for k in deletes]
        for start in range(0, len(ops), TXN_MAX_OPS):
            fence = self._compares()
            with store_errors("write status"):
                result = await kv.txn(
                    fence, ops[start : start + TXN_MAX_OPS], timeout=self._timeout
                )
            if not result.succeeded:
                await self._check_fence(fence, "write status")
                raise StoreConflictError("status write failed without a fence change")
        return len(ops)

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
