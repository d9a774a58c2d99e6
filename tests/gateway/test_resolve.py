"""Published gateway names: the re-resolution rules (pure, fake clock) and their driver."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.errors import PeerDownError, ResolveError
from gateway.resolve import ResolveCache, Resolver, is_address, pick, system_lookup
from tests.helpers import until


def test_ip_literals_are_addresses_and_names_are_not() -> None:
    assert is_address("172.30.0.11")
    assert is_address("fd00::1")
    assert not is_address("gw.west.example.com")


def test_pick_keeps_the_current_address_while_it_is_listed() -> None:
    assert pick(None, ["10.0.0.2", "10.0.0.1"]) == "10.0.0.1"
    assert pick("10.0.0.2", ["10.0.0.1", "10.0.0.2"]) == "10.0.0.2"
    assert pick("10.0.0.9", ["10.0.0.2", "10.0.0.1"]) == "10.0.0.1"
    assert pick("10.0.0.9", []) is None


def test_the_cache_refreshes_when_due_and_reports_a_change() -> None:
    c = ResolveCache(refresh=5.0, retry=1.0)
    assert c.stale("gw", 0.0)
    assert c.answered("gw", ["10.0.0.1"], 0.0) == ("10.0.0.1", "")
    assert not c.stale("gw", 4.9)
    assert c.stale("gw", 5.0)
    assert c.answered("gw", ["10.0.0.1"], 5.0) == ("10.0.0.1", "")
    assert c.answered("gw", ["10.0.0.2"], 10.0) == ("10.0.0.2", "10.0.0.1")
    assert c.cached("gw") == "10.0.0.2"


def test_a_failed_lookup_keeps_the_last_good_address_and_retries_sooner() -> None:
    c = ResolveCache(refresh=5.0, retry=1.0)
    c.answered("gw", ["10.0.0.1"], 0.0)
    assert c.answered("gw", [], 5.0) == ("10.0.0.1", "")
    assert not c.stale("gw", 5.9)
    assert c.stale("gw", 6.0)
    assert c.answered("other", [], 0.0) == (None, "")
    assert c.cached("other") is None


def test_refresh_and_retry_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ResolveCache(refresh=0)


class Dns:
    """The name service the resolver asks: answers set by the test, lookups counted."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.lookups = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self, host: str) -> Sequence[str]:
        self.lookups += 1
        if self.gate is not None:
            await self.gate.wait()
        if host not in self.answers:
            raise OSError(f"{host}: Name or service not known")
        return self.answers[host]


async def test_the_first_lookup_is_shared_and_later_ones_run_behind_the_calls() -> None:
    dns, now = Dns(), [0.0]
    dns.answers["gw"] = ["10.0.0.1"]
    dns.gate = asyncio.Event()
    r = Resolver(dns, refresh=5.0, clock=lambda: now[0])
    first = [asyncio.create_task(r.address("gw")) for _ in range(3)]
    await asyncio.sleep(0)
    dns.gate.set()
    assert await asyncio.gather(*first) == ["10.0.0.1"] * 3
    assert dns.lookups == 1
    assert await r.address("10.9.9.9") == "10.9.9.9"  # a literal is never looked up
    assert dns.lookups == 1
    # Due: the call is not held up (the cached address now), the lookup runs behind it.
    now[0] = 5.0
    dns.answers["gw"] = ["10.0.0.2"]
    dns.gate.clear()
    assert await r.address("gw") == "10.0.0.1"
    dns.gate.set()
    await until(lambda: r.cache.cached("gw"), check=lambda a: a == "10.0.0.2", what="refresh")
    assert await r.address("gw") == "10.0.0.2"
    assert (dns.lookups, r.changes) == (2, 1)
    await r.aclose()


async def test_a_name_never_resolved_refuses_the_call_as_a_down_peer() -> None:
    r = Resolver(Dns())
    with pytest.raises(ResolveError, match="cannot resolve the published gateway name gw"):
        await r.address("gw")
    assert issubclass(ResolveError, PeerDownError)  # the egress answers 503, no dial
    await r.aclose()


async def test_the_system_resolver_reads_the_hosts_file() -> None:
    assert "127.0.0.1" in await system_lookup("localhost")
    r = Resolver()
    assert await r.address("localhost") in {"127.0.0.1", "::1"}
    await r.aclose()


async def test_a_resolved_name_is_refreshed_without_calls() -> None:
    dns = Dns()
    dns.answers["gw"] = ["10.0.0.1"]
    r = Resolver(dns, refresh=0.05)
    assert await r.address("gw") == "10.0.0.1"
    dns.answers["gw"] = ["10.0.0.2"]
    # No call in between: the next call must not be the one that finds the old address.
    await until(lambda: r.cache.cached("gw"), check=lambda a: a == "10.0.0.2", what="refresh")
    assert r.changes == 1
    await r.aclose()
