"""Many proxies on real config streams while the controller churns out versions (issue 15).

One round: two controller replicas (each its own `SnapshotPublisher` and gRPC server, as
replicas are: same versions, published at slightly different moments) and `proxies`
`ConfigClient`s, each given both replicas and starting at a random one. Then `versions`
updates drawn from a small pool (so versions come back: A, B, A), published on each replica
with random gaps (none at all half of the time, so streams coalesce), while:
- a third of the proxies are slow consumers (they pause after some snapshots),
- a tenth refuse one of the pool's versions (NACK, then delta-base mismatches and resyncs),
- a tenth connect only in the middle of the churn,
- one replica restarts in the middle (its proxies fail over to the other and back).
Finally both replicas publish one new version, and the round waits until every proxy runs it
and both replicas see every stream up to date (lag 0).

`tests/federation/test_fed_converge.py` runs small rounds; `bench/config_convergence.py`
large ones, printing figures. No clock is faked: this is the real stream code under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from federation.api.client import ConfigClient
from federation.generate import generate
from federation.merge import merge
from federation.server import ConfigDiscoveryServicer, ConfigServer, SnapshotPublisher, serve
from mesh.model import Snapshot
from tests.federation.fed_factories import export, info

SERVICES = 6
# grpc.aio's tasks that outlive calls to a restarted server (tests/federation/test_fed_converge)
GRPC_STATUS_TASK = "_AioCall._handle_status_once_received"


def churn_snapshot(i: int, root: str = "ROOT-east") -> Snapshot:
    """Version `i` of a small federation: service 0 changes every time, the others cycle."""
    clusters = [info("east", roots=(root,))]
    exports = [
        export(
            "east",
            name=f"svc{j}",
            addresses=(f"10.{j}.{i % 250}.{i // 250 % 250}" if j == 0 else f"10.{j}.0.{i % 5}",),
        )
        for j in range(SERVICES)
    ]
    return generate(clusters, merge(clusters, exports, {}), [])


async def _until(condition: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@dataclass(slots=True)
class RoundResult:
    proxies: int
    versions: int
    converged: int  # proxies running the final version at the end
    seconds: float  # from the final publication until every proxy ran it (or the bound)
    acks: int = 0
    nacks: int = 0
    resyncs: int = 0
    stalls: int = 0  # proxy-side stall resyncs (should stay 0: nothing here stalls)
    failovers: int = 0
    superseded: int = 0
    lagging: list[str] = field(default_factory=list)  # streams still lagging on a replica
    behind: list[str] = field(default_factory=list)  # proxies not on the final version
    died: list[str] = field(default_factory=list)  # proxies whose config stream task ended


@dataclass(slots=True)
class _Replica:
    publisher: SnapshotPublisher
    servicer: ConfigDiscoveryServicer
    server: ConfigServer
    port: int

    @classmethod
    async def start(cls, port: int = 0) -> _Replica:
        publisher = SnapshotPublisher()
        servicer = ConfigDiscoveryServicer(publisher, heartbeat=0.5)
        server = await serve(servicer, f"127.0.0.1:{port}", None)
        return cls(publisher, servicer, server, server.port)


async def run_round(
    proxies: int = 100,
    versions: int = 300,
    *,
    seed: int = 0,
    within: float = 20.0,
    log: Callable[[str], None] | None = None,
) -> RoundResult:
    rng = random.Random(seed)
    before = asyncio.all_tasks()
    pool = [churn_snapshot(1000 * seed + i) for i in range(40)]
    refused = pool[3].version
    replicas = [await _Replica.start(), await _Replica.start()]
    retired: list[_Replica] = []  # the restarted replica's first life (its counters)
    for r in replicas:
        r.publisher.update(pool[0])
    clients: list[ConfigClient] = []
    tasks: list[asyncio.Task[None]] = []

    def refuse(snapshot: Snapshot) -> None:
        if snapshot.version == refused:
            raise ValueError("this proxy cannot apply it")

    async def follow(c: ConfigClient, slow: bool) -> None:
        async with contextlib.aclosing(c.snapshots()) as stream:  # closes its channel
            async for _ in stream:
                if slow and rng.random() < 0.3:
                    await asyncio.sleep(rng.random() * 0.05)

    def add(k: int) -> None:
        c = ConfigClient(
            [f"127.0.0.1:{r.port}" for r in replicas],
            node_id=f"proxy-{k}",
            cluster="east",
            kind="gateway" if k % 10 == 0 else "sidecar",
            insecure=True,
            validate=refuse if k % 10 == 1 else None,
            backoff_initial=0.05,
            backoff_max=0.5,
            rng=random.Random(seed * 100_000 + k),
        )
        clients.append(c)
        tasks.append(asyncio.create_task(follow(c, k % 3 == 0), name=f"churn:proxy-{k}"))

    late = {k for k in range(proxies) if k % 10 == 2}
    for k in range(proxies):
        if k not in late:
            add(k)
    result = RoundResult(proxies, versions, 0, 0.0)
    try:
        for v in range(versions):
            snapshot = pool[3] if v == versions // 4 else rng.choice(pool)  # 3: refused
            for r in replicas:
                r.publisher.update(snapshot)
                if rng.random() < 0.3:
                    await asyncio.sleep(0)  # the replicas publish it at different moments
            if v == versions // 4:  # let some refusing proxy see it (bounded): NACKs happen
                await _until(lambda: any(r.servicer.nacks for r in replicas), 10.0)
            if v == versions // 2:
                for k in sorted(late):
                    add(k)
                # One replica restarts on its port: its streams fail over to the other.
                old = replicas[1]
                retired.append(old)
                await old.server.stop(0.2)
                replicas[1] = await _Replica.start(old.port)
                replicas[1].publisher.update(snapshot)
            if rng.random() < 0.5:
                await asyncio.sleep(rng.random() * 0.004)
            else:
                await asyncio.sleep(0)
        final = churn_snapshot(1000 * seed + 999)
        started = time.monotonic()
        for r in replicas:
            r.publisher.update(final)
        deadline = started + within
        while time.monotonic() < deadline:
            behind = [c for c in clients if c.latest is None or c.latest.version != final.version]
            lagging = [
                s["node"]
                for r in replicas
                for s in r.servicer.streams()
                if s["lag_seconds"] or s["version"] != final.version
            ]
            if not behind and not lagging:
                break
            await asyncio.sleep(0.02)
        result.seconds = time.monotonic() - started
        result.behind = sorted(c.node.id for c in clients if c.latest != final)
        result.died = [f"{t.get_name()}: {t.exception()!r}" for t in tasks if t.done()]
        result.converged = proxies - len(result.behind)
        result.lagging = lagging
        for r in replicas + retired:
            result.acks += r.servicer.acks
            result.nacks += r.servicer.nacks
            result.resyncs += r.servicer.resyncs
            result.superseded += r.publisher.superseded
        result.stalls = sum(c.stalls for c in clients)
        result.failovers = sum(c.failovers for c in clients)
        if log is not None:
            log(
                f"seed {seed}: {result.converged}/{proxies} on the final version in "
                f"{result.seconds:.2f} s after {versions} versions; acks {result.acks} "
                f"nacks {result.nacks} resyncs {result.resyncs} stalls {result.stalls} "
                f"failovers {result.failovers} superseded {result.superseded}"
            )
        return result
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        for r in replicas:
            await r.server.stop(None)
        # grpc's own bookkeeping of 100 closed calls takes a few loop turns: bounded wait.
        current = asyncio.current_task()
        rest = [
            t
            for t in asyncio.all_tasks() - before
            if t is not current and not t.done() and t.get_coro().__qualname__ != GRPC_STATUS_TASK
        ]
        if rest:
            await asyncio.wait(rest, timeout=5.0)
