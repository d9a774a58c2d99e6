"""Leader election among controller replicas: one etcd key on a lease, and write fencing.

Every replica serves config streams; only the leader writes (VIP allocation, status, the policy
seed, later the GitOps apply). The leader holds `/fedgate/leader` (a `LeaderRecord`) attached
to its own lease and keeps the lease alive. Its *term* is the key's create revision: every
leader write is a transaction that also compares `create_revision(/fedgate/leader) == term`
(`fence()`), so a replica that lost leadership without noticing (paused, partitioned) cannot
write: etcd refuses it atomically, whatever the clocks say.

| state     | event                                           | next                          |
|-----------|-------------------------------------------------|-------------------------------|
| Follower  | leader key absent (start, or its DELETE seen)   | Campaign                      |
| Campaign  | create-if-absent transaction succeeds           | Leader (term = its revision)  |
| Campaign  | the key exists                                  | Follower, watching the key    |
| Leader    | keepalive answered with TTL > 0                 | Leader                        |
| Leader    | lease gone, or no renewal for `ttl - margin` s  | Follower (then Campaign)      |
| Leader    | a fenced write fails (`step_down()`)            | Follower (lease revoked)      |
| Leader    | `resign()` (clean stop)                         | lease revoked: key deleted    |

A killed leader's key expires with its lease (`ttl` seconds, 3-5 in the rig); a replica that
stops cleanly resigns, so the others take over at once. etcd3aio's own `Election` is not used:
it never renews its lease (leadership silently ends after `ttl`) and has no fencing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog
from etcd3aio import Etcd3Client

from federation import keys
from federation.aio import wait_event
from federation.errors import FederationError, NotLeaderError, StoreError
from federation.etcd import store_errors
from federation.status import LeaderRecord
from federation.store import DEFAULT_TIMEOUT, kv_service, renew_lease, watch_stream

_log = structlog.get_logger("fedgate.federation.leader")

FOLLOWER = "Follower"
CAMPAIGN = "Campaign"
LEADER = "Leader"


class LeaderElection:
    def __init__(
        self,
        client: Etcd3Client,
        record: LeaderRecord,
        *,
        ttl: int = 5,
        timeout: float = DEFAULT_TIMEOUT,
        on_change: Callable[[bool], None] | None = None,
        retry: float = 0.5,
    ) -> None:
        if ttl < 2:
            raise ValueError("leader lease ttl must be at least 2 s (etcd's minimum)")
        self._client = client
        self._record = record
        self._ttl = ttl
        self._timeout = min(timeout, ttl / 3)
        self._on_change = on_change
        self._retry = retry
        self._state = FOLLOWER
        self._lease: int | None = None
        self._term = 0
        self._lost = asyncio.Event()
        self.leader: LeaderRecord | None = None  # the leader as last seen (ourselves included)
        self.terms = 0  # metric: times this replica became leader
        self._log = _log.bind(replica=record.id)

    @property
    def identity(self) -> str:
        return self._record.id

    @property
    def state(self) -> str:
        return self._state

    @property
    def is_leader(self) -> bool:
        return self._state == LEADER

    @property
    def term(self) -> int:
        return self._term if self.is_leader else 0

    def fence(self) -> list[Any]:
        """The compares that make a transaction a leader write; raises NotLeaderError."""
        if not self.is_leader:
            raise NotLeaderError(f"replica {self._record.id} is not the leader")
        kv = kv_service(self._client)
        return [kv.txn_compare_create_revision(keys.LEADER_KEY, self._term)]

    def step_down(self, reason: str) -> None:
        """Stop acting as leader now (a fenced write failed); `run` campaigns again."""
        if self.is_leader:
            self._log.warning("stepping down", reason=reason, term=self._term)
            self._lost.set()

    async def run(self) -> None:
        """Campaign, lead, follow, for ever; resigns when cancelled."""
        try:
            while True:
                try:
                    await self._round()
                except StoreError as e:
                    self._log.warning("election round failed", error=str(e))
                    self._set(FOLLOWER)
                    await asyncio.sleep(self._retry)
        finally:
            with contextlib.suppress(StoreError):
                await self.resign()

    async def resign(self) -> None:
        """Give up leadership at once (revoke the lease, deleting the key)."""
        lease, self._lease = self._lease, None
        self._set(FOLLOWER)
        if lease is not None and self._client.lease is not None:
            with store_errors("resign"):
                await self._client.lease.revoke(lease, timeout=self._timeout)
            self._log.info("resigned")

    def _set(self, state: str) -> None:
        was = self.is_leader
        self._state = state
        if was != self.is_leader:
            if self.is_leader:
                self.terms += 1
                self.leader = self._record
            self._log.info("leadership changed", leader=self.is_leader, term=self._term)
            if self._on_change is not None:
                self._on_change(self.is_leader)

    async def _round(self) -> None:
        kv = kv_service(self._client)
        lease_service = self._client.lease
        if lease_service is None:
            raise StoreError("etcd client is not connected")
        self._state = CAMPAIGN
        with store_errors("leader lease grant"):
            grant = await lease_service.grant(self._ttl, timeout=self._timeout)
        lease = int(grant.ID)
        record = LeaderRecord(
            self._record.id, self._record.grpc, self._record.admin, since=time.time()
        )
        with store_errors("campaign"):
            result = await kv.txn(
                [kv.txn_compare_create_revision(keys.LEADER_KEY, 0)],
                [kv.txn_op_put(keys.LEADER_KEY, record.encode(), lease=lease)],
                [kv.txn_op_get(keys.LEADER_KEY)],
                timeout=self._timeout,
            )
        if result.succeeded:
            self._lease = lease
            self._term = int(result.header.revision)
            self._record = record
            self._lost.clear()
            self._set(LEADER)
            try:
                await self._hold(lease)
            finally:
                self._set(FOLLOWER)
                with contextlib.suppress(StoreError):
                    await self.resign()
            return
        with contextlib.suppress(StoreError), store_errors("revoke unused lease"):
            await lease_service.revoke(lease, timeout=self._timeout)
        self._set(FOLLOWER)
        kvs = result.responses[0].response_range.kvs
        if kvs:
            with contextlib.suppress(FederationError, ValueError):
                self.leader = LeaderRecord.decode(bytes(kvs[0].value))
        await self._wait_vacant(int(result.header.revision) + 1)

    async def _wait_vacant(self, revision: int) -> None:
        """Return once the leader key is deleted (after `revision`)."""
        async with contextlib.aclosing(
            watch_stream(self._client, keys.LEADER_KEY, revision, exact=True)
        ) as stream:
            async for batch in stream:
                for ev in batch.events:
                    if ev.value is None:
                        self.leader = None
                        return
                    with contextlib.suppress(FederationError, ValueError):
                        self.leader = LeaderRecord.decode(ev.value)

    async def _hold(self, lease: int) -> None:
        """Keep the lease alive; return when leadership is (or may be) lost."""
        margin = self._ttl / 3
        interval = self._ttl / 3
        renewed = time.monotonic()
        while not self._lost.is_set():
            if await wait_event(self._lost, interval):
                return
            sent = time.monotonic()
            try:
                ttl = await self._renew(lease)
            except StoreError as e:
                if time.monotonic() - renewed > self._ttl - margin:
                    self._log.warning("leader lease not renewed in time", error=str(e))
                    return
                interval = min(0.2, margin)
                continue
            if ttl <= 0:
                self._log.warning("leader lease expired")
                return
            renewed = sent
            interval = self._ttl / 3

    async def _renew(self, lease: int) -> int:
        return await renew_lease(self._client, lease, self._timeout)
