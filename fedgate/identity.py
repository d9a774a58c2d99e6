"""Wiring of a cluster's CA inside its agent: directory, rotation, deny list, Sign server.

`AgentCA` holds the CA directory (`ca.cadir`) and re-reads it when its files change (polled
every second) or on SIGHUP, so `fedgate ca rotate` takes effect without a restart; it evaluates
the rotation plan against the clock on every tick, so a retiring root leaves the published set
on time. Whenever the published roots change, the agent republishes its ClusterInfo, and the
controller pushes the new bundle to every proxy (one push).

The Sign service reads `view()` per request (the active root issues) and `denied()` (the deny
list, followed from etcd by fedgate/processes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from ca.cadir import CaDirectory
from ca.service import CaView
from ca.verify import utcnow

_log = structlog.get_logger("fedgate.ca")

POLL_INTERVAL = 1.0


class AgentCA:
    def __init__(self, directory: Path, now: Callable[[], dt.datetime] = utcnow) -> None:
        self._dir = CaDirectory(directory)
        self._now = now
        self._denied: frozenset[str] = frozenset()
        self._wake = asyncio.Event()

    @property
    def trust_domain(self) -> str:
        return self._dir.state.trust_domain

    def view(self) -> CaView:
        st = self._dir.state
        return CaView(st.issuer, st.published(self._now()), st.plan.max_svid_ttl)

    def published_roots(self) -> tuple[str, ...]:
        return self._dir.state.published_pem(self._now())

    def denied(self) -> frozenset[str]:
        return self._denied

    def set_denied(self, entries: frozenset[str]) -> None:
        self._denied = entries

    def status(self) -> dict[str, object]:
        st = self._dir.state
        now = self._now()
        return {
            "trustDomain": st.trust_domain,
            "activeRoot": st.plan.active.id,
            "maxSvidTtlSeconds": int(st.plan.max_svid_ttl.total_seconds()),
            "roots": [
                {
                    "id": r.id,
                    "state": r.state,
                    "published": r.published_at(now),
                    "retireAt": r.retire_at.isoformat() if r.retire_at else None,
                }
                for r in st.plan.roots
            ],
            "denied": sorted(self._denied),
        }

    async def follow(
        self,
        publish: Callable[[tuple[str, ...]], Awaitable[None]],
        interval: float = POLL_INTERVAL,
    ) -> None:
        """Reload on change (or SIGHUP) and `publish` the roots whenever they change."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._wake.set)
        published = self.published_roots()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            hup = self._wake.is_set()
            self._wake.clear()
            if hup or self._dir.changed():
                before = self._dir.state.plan.active.id
                error = self._dir.reload()
                if error is not None:
                    _log.warning("CA directory not reloaded, keeping the last", error=str(error))
                else:
                    plan = self._dir.state.plan
                    _log.info(
                        "CA directory reloaded",
                        active_root=plan.active.id,
                        switched=plan.active.id != before,
                        roots=[f"{r.id}:{r.state}" for r in plan.roots],
                    )
            roots = self.published_roots()
            if roots != published:
                _log.info("publishing CA roots", roots=len(roots))
                await publish(roots)
                published = roots
