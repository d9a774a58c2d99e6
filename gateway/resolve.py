"""Peer gateway addresses published as DNS names: resolved, re-resolved, followed.

A cluster may publish its gateway under a hostname (a cloud load balancer's
`status.loadBalancer.ingress[].hostname`, e.g. an AWS NLB name), and the addresses behind such
a name change. The egress resolves the published host before dialling, so the pool
(`gateway.pool`) keys its connections on the address actually dialled: when a re-resolution
returns a new address, the target changes, new calls get connections to the new address and
the old connections are retired (no new streams; they close when their last stream ends), so
no established call is dropped.

Rules, per name (`ResolveCache`, pure; `Resolver` is its asyncio driver):
* an IP literal is used as is, never looked up
* never resolved                -> the call waits for one lookup (shared by concurrent calls)
* once resolved, a name is looked up again every `refresh` s in the background (Envoy's
  `dns_refresh_rate`, default 5 s: the system resolver gives no TTL to honour), so a new call
  finds an address at most `refresh` s old, even after a long time without calls; a call that
  finds the entry due anyway goes on with the cached address and the lookup runs behind it
* a lookup's answer holds the current address -> keep it (several A records must not make the
  links flap between them); else take the first answer in sorted order
* a lookup fails or answers nothing -> keep the last good address and try again after
  `retry` s (a DNS outage must not cut a working link); never resolved: the call fails
What it does not do: read DNS TTLs, or spread calls over several addresses of one name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.errors import ResolveError
from mesh.tasks import TaskSet

_log = structlog.get_logger("fedgate.gateway.resolve")

Lookup = Callable[[str], Awaitable[Sequence[str]]]


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Entry:
    address: str
    due: float  # when to look the name up again


def pick(current: str | None, answers: Sequence[str]) -> str | None:
    """The address to dial among a lookup's `answers`: the current one while it is listed."""
    if not answers:
        return None
    if current in answers:
        return current
    return sorted(answers)[0]


class ResolveCache:
    """The rules above, for every name; `now` is passed in."""

    def __init__(self, refresh: float = 5.0, retry: float = 1.0) -> None:
        if refresh <= 0 or retry <= 0:
            raise ValueError("refresh and retry must be positive")
        self.refresh = refresh
        self.retry = retry
        self.entries: dict[str, Entry] = {}

    def cached(self, host: str) -> str | None:
        entry = self.entries.get(host)
        return entry.address if entry is not None else None

    def wait(self, host: str, now: float) -> float:
        """Seconds until `host` is due for its next lookup."""
        entry = self.entries.get(host)
        return self.refresh if entry is None else max(0.0, entry.due - now)

    def stale(self, host: str, now: float) -> bool:
        """Whether `host` should be looked up (never resolved, or due)."""
        entry = self.entries.get(host)
        return entry is None or now >= entry.due

    def answered(self, host: str, answers: Sequence[str], now: float) -> tuple[str | None, str]:
        """A lookup of `host` answered `answers` (empty: it failed). Returns the address to use
        now (None: none known) and the one it replaced ("" if unchanged or first)."""
        entry = self.entries.get(host)
        current = entry.address if entry is not None else None
        chosen = pick(current, answers)
        if chosen is None:
            if entry is not None:
                self.entries[host] = Entry(entry.address, now + self.retry)
            return current, ""
        self.entries[host] = Entry(chosen, now + self.refresh)
        return chosen, (current if current is not None and current != chosen else "")


async def system_lookup(host: str) -> list[str]:
    """The system resolver's addresses for `host` (/etc/hosts, then DNS, as every process)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, None, type=socket.SOCK_STREAM, family=socket.AF_UNSPEC
    )
    return sorted({str(info[4][0]) for info in infos})


class Resolver:
    """Resolves published gateway hosts for the egress, by `ResolveCache`'s rules."""

    def __init__(
        self,
        lookup: Lookup = system_lookup,
        refresh: float = 5.0,
        retry: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        log: Any = _log,
    ) -> None:
        self.cache = ResolveCache(refresh, retry)
        self._lookup = lookup
        self._clock = clock
        self._log = log
        self._inflight: dict[str, asyncio.Future[str | None]] = {}
        self._tasks = TaskSet("gateway-resolve")
        self._watched: set[str] = set()  # names with a refresh loop
        self.changes = 0  # addresses replaced by a re-resolution (a metric)

    async def address(self, host: str) -> str:
        """The address to dial for `host`, or ResolveError."""
        if is_address(host):
            return host
        cached = self.cache.cached(host)
        if self.cache.stale(host, self._clock()):
            pending = self._start(host)
            if cached is None:
                got = await asyncio.shield(pending)
                if got is None:
                    raise ResolveError(f"cannot resolve the published gateway name {host}")
                if host not in self._watched:
                    self._watched.add(host)
                    self._tasks.spawn(self._refresh(host), f"refresh-{host}")
                return got
        assert cached is not None
        return cached

    def _start(self, host: str) -> asyncio.Future[str | None]:
        pending = self._inflight.get(host)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._inflight[host] = pending
            self._tasks.spawn(self._resolve(host, pending), f"resolve-{host}")
        return pending

    async def _refresh(self, host: str) -> None:
        """Look `host` up whenever it is due, for the resolver's lifetime (peer gateways are
        few; each costs one lookup per `refresh`)."""
        while True:
            await asyncio.sleep(self.cache.wait(host, self._clock()))
            await self._start(host)

    async def _resolve(self, host: str, done: asyncio.Future[str | None]) -> None:
        try:
            try:
                answers: Sequence[str] = await self._lookup(host)
            except OSError as e:  # socket.gaierror included
                self._log.warning("gateway name lookup failed", host=host, reason=str(e))
                answers = ()
            address, replaced = self.cache.answered(host, answers, self._clock())
            if replaced:
                self.changes += 1
                self._log.info("peer gateway address changed", host=host, old=replaced, new=address)
            if not done.done():
                done.set_result(address)
        finally:
            self._inflight.pop(host, None)
            if not done.done():
                done.set_result(self.cache.cached(host))

    async def aclose(self) -> None:
        await self._tasks.aclose()
