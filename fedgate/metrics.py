"""Control-plane metrics on every process's admin `/metrics` (Prometheus text format).

Everything here is read at scrape time from the state the components already keep (counters,
status, the push statistics), by collectors registered on prometheus_client's default
REGISTRY; the data plane pays nothing per request for them. Request metrics
(`fedgate_requests_total`, ...) are defined elsewhere on the same registry, so
`exposition()` serves both. Names follow Prometheus conventions (base units, `_total` for
counters, `_info` for info metrics); docs/operations.md lists them with their labels.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from ca.authority import root_id

if TYPE_CHECKING:  # annotations only: a sidecar must not load the gateway (aioquic) or controller
    from federation.pushstats import PushStats
    from gateway.gateway import LinkStats

Families = Callable[[], Iterable[Metric]]
PAIR = ("source_cluster", "destination_cluster", "transport")


def exposition(registry: CollectorRegistry = REGISTRY) -> str:
    return generate_latest(registry).decode()


class _Collector(Collector):
    def __init__(self, families: Families) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families()

    def describe(self) -> Iterator[Metric]:
        # Nothing to describe up front: registering must not run `collect` before the
        # process has its state (and two processes' families never share one registry).
        return iter(())


def register(families: Families, registry: CollectorRegistry = REGISTRY) -> Collector:
    collector = _Collector(families)
    registry.register(collector)
    return collector


# --- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertExpiry:
    kind: str  # "svid" (this process's identity) or "root" (a CA root it trusts or publishes)
    identity: str  # the SPIFFE ID (URI SAN) or, without one, the subject
    trust_domain: str
    fingerprint: str  # SHA-256 prefix (ca.authority.root_id): tells rotating roots apart
    not_after: float  # seconds since the epoch


@functools.lru_cache(maxsize=256)
def cert_expiry(pem: bytes, kind: str) -> CertExpiry:
    """The first certificate of `pem`; cached, as the same few certificates are read at
    every scrape."""
    cert = x509.load_pem_x509_certificate(pem)
    identity = cert.subject.rfc4514_string()
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        found = uris.value.get_values_for_type(x509.UniformResourceIdentifier)
        identity = found[0] if found else identity
    except x509.ExtensionNotFound:
        pass
    domain = identity.removeprefix("spiffe://").split("/", 1)[0] if "spiffe://" in identity else ""
    return CertExpiry(kind, identity, domain, root_id(cert), cert.not_valid_after_utc.timestamp())


def roots_of(bundle: Mapping[str, Iterable[str]]) -> list[CertExpiry]:
    """Every root of a `trust domain -> [PEM]` bundle (Snapshot.trust_bundle)."""
    out = []
    for domain, pems in sorted(bundle.items()):
        for pem in pems:
            try:
                entry = cert_expiry(pem.encode(), "root")
            except ValueError:
                # Not a certificate: the proxies refuse such a bundle (NACK); a scrape must
                # not fail because of it.
                continue
            out.append(entry if entry.trust_domain else _with_domain(entry, domain))
    return out


def _with_domain(entry: CertExpiry, domain: str) -> CertExpiry:
    return CertExpiry(entry.kind, entry.identity, domain, entry.fingerprint, entry.not_after)


def certificate_families(certs: Iterable[CertExpiry]) -> Iterator[Metric]:
    g = GaugeMetricFamily(
        "fedgate_certificate_expiry_timestamp_seconds",
        "When a certificate expires (Unix time): this process's SVID, and the CA roots it "
        "publishes or trusts.",
        labels=["kind", "identity", "trust_domain", "fingerprint"],
    )
    seen: set[tuple[str, str, str]] = set()
    for c in certs:
        if (c.kind, c.identity, c.fingerprint) in seen:
            continue
        seen.add((c.kind, c.identity, c.fingerprint))
        g.add_metric([c.kind, c.identity, c.trust_domain, c.fingerprint], c.not_after)
    yield g


def svid_expiry(identity: str, not_after: dt.datetime, pem: bytes) -> CertExpiry:
    entry = cert_expiry(pem, "svid")
    return CertExpiry(
        "svid", identity, entry.trust_domain, entry.fingerprint, not_after.timestamp()
    )


# --- config -----------------------------------------------------------------------------------


def config_version_families(version: str, component: str) -> Iterator[Metric]:
    info = InfoMetricFamily(
        "fedgate_config_version",
        "The config version (snapshot content hash) this process runs or serves.",
        labels=["component"],
    )
    info.add_metric([component], {"version": version})
    yield info


STALE_AFTER = 5.0  # seconds of lag after which a subscriber counts as stale (docs/operations.md)


def push_families(
    push: PushStats,
    subscribers: int,
    now: float | None = None,
    *,
    dropped: int = 0,
    heartbeats: int = 0,
) -> Iterator[Metric]:
    """The controller's side of the config streams (federation.pushstats); `now` on the
    publisher's clock (default: time.monotonic, the publisher's default)."""
    now = time.monotonic() if now is None else now
    kc = ["kind", "cluster"]
    hist = HistogramMetricFamily(
        "fedgate_config_push_latency_seconds",
        "From a config version's publication (or the stream's opening, if later) to its ACK.",
        labels=kc,
    )
    for (kind, cluster), h in sorted(push.latency.items()):
        hist.add_metric([kind, cluster], h.cumulative(), h.total)
    yield hist
    acks = CounterMetricFamily(
        "fedgate_config_acks", "Config versions ACKed by subscribers.", labels=kc
    )
    for group, n in sorted(push.acks.items()):
        acks.add_metric(list(group), n)
    yield acks
    nacks = CounterMetricFamily(
        "fedgate_config_nacks", "Config versions NACKed (refused) by subscribers.", labels=kc
    )
    for group, n in sorted(push.nacks.items()):
        nacks.add_metric(list(group), n)
    yield nacks
    per_node = ["node", "kind", "cluster"]
    last = GaugeMetricFamily(
        "fedgate_config_subscriber_push_latency_seconds",
        "Push latency of the last version each connected subscriber ACKed.",
        labels=per_node,
    )
    version = InfoMetricFamily(
        "fedgate_config_subscriber_version",
        "The config version each connected subscriber last ACKed on its stream.",
        labels=per_node,
    )
    lag = GaugeMetricFamily(
        "fedgate_config_subscriber_lag_seconds",
        "How long each connected subscriber has not run this replica's current config version "
        "(0: up to date). Counted from the publication of the first version it does not run.",
        labels=per_node,
    )
    worst = 0.0
    stale: dict[tuple[str, str], int] = {}
    for node, sub in sorted(push.subscribers.items()):
        if sub.latency is not None:
            last.add_metric([node, sub.kind, sub.cluster], sub.latency)
        if sub.version:
            version.add_metric([node, sub.kind, sub.cluster], {"version": sub.version})
        seconds = sub.lag(now)
        lag.add_metric([node, sub.kind, sub.cluster], seconds)
        worst = max(worst, seconds)
        group = (sub.kind, sub.cluster)
        stale[group] = stale.get(group, 0) + (seconds > STALE_AFTER)
    yield last
    yield version
    yield lag
    yield GaugeMetricFamily(
        "fedgate_config_subscriber_max_lag_seconds",
        "The largest fedgate_config_subscriber_lag_seconds on this replica.",
        value=worst,
    )
    behind = GaugeMetricFamily(
        "fedgate_config_subscribers_stale",
        f"Connected subscribers that have trailed the current version for over {STALE_AFTER:g} s.",
        labels=kc,
    )
    for group, n in sorted(stale.items()):
        behind.add_metric(list(group), n)
    yield behind
    yield GaugeMetricFamily(
        "fedgate_config_subscribers", "Open config streams on this replica.", value=subscribers
    )
    yield CounterMetricFamily(
        "fedgate_config_streams_dropped",
        "Config streams closed because the proxy did not take a response in time.",
        value=dropped,
    )
    yield CounterMetricFamily(
        "fedgate_config_heartbeats", "Heartbeats sent on idle config streams.", value=heartbeats
    )


def proxy_config_families(
    nacks: int, reconnects: int, failovers: int, *, lag_seconds: float = 0.0, stalls: int = 0
) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "fedgate_config_lag_seconds",
        "How long the controller's current config version has been one this proxy neither "
        "runs nor refused (0: up to date); past a few seconds the proxy resyncs on its own.",
        value=lag_seconds,
    )
    yield CounterMetricFamily(
        "fedgate_config_stream_stalls",
        "Config streams this proxy dropped and resynced because they trailed or went silent.",
        value=stalls,
    )
    yield CounterMetricFamily(
        "fedgate_config_nacks_sent", "Config versions this proxy refused (NACK).", value=nacks
    )
    yield CounterMetricFamily(
        "fedgate_config_stream_reconnects",
        "Config stream reconnections (to the same or another controller replica).",
        value=reconnects,
    )
    yield CounterMetricFamily(
        "fedgate_config_stream_failovers",
        "Config stream moves to another controller replica.",
        value=failovers,
    )


def authz_families(denials: Mapping[tuple[str, str], int]) -> Iterator[Metric]:
    """The destination sidecar's AuthorizationPolicy refusals, by service and reason."""
    c = CounterMetricFamily(
        "fedgate_authz_denied",
        "Calls (HTTP requests, gRPC calls, TCP streams) the destination sidecar refused by "
        "AuthorizationPolicy; `reason` names the policy or says no ALLOW policy matched.",
        labels=["service", "reason"],
    )
    for (service, reason), n in sorted(denials.items()):
        c.add_metric([service, reason], n)
    yield c


def controller_families(status: Mapping[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "fedgate_controller_leader",
        "1 if this replica is the elected leader (it alone writes).",
        value=1.0 if status.get("leader") else 0.0,
    )
    yield CounterMetricFamily(
        "fedgate_controller_syncs", "Catalog syncs (merge + generate).", value=status["syncs"]
    )
    yield CounterMetricFamily(
        "fedgate_controller_sync_failures", "Syncs that failed.", value=status["syncFailures"]
    )
    held = status.get("held")
    yield GaugeMetricFamily(
        "fedgate_controller_config_held",
        "1 while the collapse guard holds the last good config instead of publishing one that "
        "drops too many clusters or endpoints at once (docs/controller.md).",
        value=1.0 if held else 0.0,
    )
    live = GaugeMetricFamily(
        "fedgate_cluster_live",
        "1 if the cluster is Live (routed), 0 if Detached (agent lease gone, still routed on "
        "its last catalog), Down or Suppressed by flap damping.",
        labels=["cluster", "state"],
    )
    for name, record in sorted(status.get("liveness", {}).items()):
        live.add_metric([name, record["state"]], 1.0 if record["state"] == "Live" else 0.0)
    yield live


# --- GitOps -----------------------------------------------------------------------------------


def gitops_families(status: Mapping[str, Any] | None) -> Iterator[Metric]:
    """From `GitOpsSync.status()`; nothing when the replica follows no repository."""
    if status is None:
        return
    info = InfoMetricFamily(
        "fedgate_gitops_applied_commit",
        "The config repository commit applied to etcd (as this replica last read it).",
        labels=["branch"],
    )
    info.add_metric([status["branch"]], {"sha": status["appliedCommit"] or "none"})
    yield info
    rounds = status["rounds"]
    yield CounterMetricFamily(
        "fedgate_gitops_rejections",
        "Commits refused by validation (the applied config was kept).",
        value=rounds.get("rejected", 0),
    )
    by_result = CounterMetricFamily(
        "fedgate_gitops_sync_rounds", "GitOps sync rounds by outcome.", labels=["result"]
    )
    for result, n in sorted(rounds.items()):
        by_result.add_metric([result], n)
    yield by_result


# --- gateway tunnels --------------------------------------------------------------------------


def tunnel_families(cluster: str, links: Iterable[LinkStats]) -> Iterator[Metric]:
    """Per gateway pair, from the source (dialling) gateway: `source_cluster` is this one."""
    up = GaugeMetricFamily(
        "fedgate_tunnel_up", "1 if a usable tunnel connection to the peer is open.", labels=PAIR
    )
    rtt = GaugeMetricFamily(
        "fedgate_tunnel_rtt_seconds",
        "Round trip of the health probes, smoothed (best connection).",
        labels=PAIR,
    )
    streams = GaugeMetricFamily(
        "fedgate_tunnel_open_streams", "Streams (calls) open on the tunnel.", labels=PAIR
    )
    conns = GaugeMetricFamily(
        "fedgate_tunnel_connections", "Tunnel connections open to the peer.", labels=PAIR
    )
    probes = CounterMetricFamily(
        "fedgate_tunnel_probes",
        "Keepalive probes sent on the connections open now.",
        labels=PAIR,
    )
    lost = CounterMetricFamily(
        "fedgate_tunnel_probes_unanswered",
        "Probes of the open connections not answered before the next one was sent.",
        labels=PAIR,
    )
    hs = CounterMetricFamily(
        "fedgate_tunnel_handshakes",
        "Tunnel handshakes to the peer by result (ok, failed).",
        labels=[*PAIR, "result"],
    )
    opened = CounterMetricFamily(
        "fedgate_tunnel_streams", "Calls (streams) opened on the tunnel to the peer.", labels=PAIR
    )
    losses = CounterMetricFamily(
        "fedgate_tunnel_connections_lost", "Established tunnel connections lost.", labels=PAIR
    )
    healthy = GaugeMetricFamily(
        "fedgate_tunnel_peer_healthy",
        "1 if the peer is reachable (a connection passes its probes), 0 if unreachable (calls "
        "refused at once); absent while unknown.",
        labels=PAIR,
    )
    healthy_conns = GaugeMetricFamily(
        "fedgate_tunnel_healthy_connections",
        "Tunnel connections to the peer passing their health probes.",
        labels=PAIR,
    )
    loss = GaugeMetricFamily(
        "fedgate_tunnel_probe_loss_ratio",
        "Share of the recent health probes lost (worst connection).",
        labels=PAIR,
    )
    for link in links:
        labels = [cluster, link.peer, link.transport]
        if link.health != "unknown":
            healthy.add_metric(labels, 1.0 if link.health == "healthy" else 0.0)
        healthy_conns.add_metric(labels, link.healthy_connections)
        loss.add_metric(labels, link.loss_ratio)
        up.add_metric(labels, 1.0 if link.connected else 0.0)
        if link.rtt is not None:
            rtt.add_metric(labels, link.rtt)
        streams.add_metric(labels, link.open_streams)
        conns.add_metric(labels, link.connections)
        probes.add_metric(labels, link.probes)
        # The latest probe may simply be in flight; only older ones count as lost.
        lost.add_metric(labels, max(0, link.probes - link.probes_answered - link.connections))
        hs.add_metric([*labels, "ok"], link.handshakes)
        hs.add_metric([*labels, "failed"], link.handshake_failures)
        losses.add_metric(labels, link.losses)
        opened.add_metric(labels, link.streams)
    yield from (up, rtt, streams, conns, probes, lost, hs, losses, opened)
    yield from (healthy, healthy_conns, loss)


def _asyncio_tasks() -> Iterator[Metric]:
    # Scraped from the admin server's handler, i.e. on the process's event loop: a count that
    # only grows over a soak is a task leak (bench/soak.py reads it at start and end).
    try:
        n = len(asyncio.all_tasks())
    except RuntimeError:  # scraped off the loop (a test's registry): nothing to report
        return
    yield GaugeMetricFamily("fedgate_asyncio_tasks", "asyncio tasks not yet done.", value=n)


register(_asyncio_tasks)
