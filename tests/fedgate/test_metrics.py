"""The control-plane metric families, exposed by prometheus_client and parsed back."""

from __future__ import annotations

import asyncio
import datetime as dt
import re

import pytest
from prometheus_client import CollectorRegistry

from ca.authority import CertificateAuthority, cert_to_pem
from federation.pushstats import PushStats
from fedgate import metrics, rates
from gateway.gateway import LinkStats
from mesh.naming import SpiffeId

NOW = dt.datetime(2026, 11, 26, 3, 0, tzinfo=dt.UTC)


def scrape(families: metrics.Families) -> rates.Scrape:
    registry = CollectorRegistry()
    metrics.register(families, registry)
    return rates.parse(metrics.exposition(registry), 0.0)


def test_certificate_expiry_of_the_svid_and_every_root() -> None:
    east = CertificateAuthority.create("east.fedgate.local", NOW)
    west = CertificateAuthority.create("west.fedgate.local", NOW)
    rotated = CertificateAuthority.create("west.fedgate.local", NOW)
    svid = east.issue(SpiffeId("east.fedgate.local", "demo", "client"), NOW)
    bundle = {
        "east.fedgate.local": (cert_to_pem(east.root).decode(),),
        "west.fedgate.local": (
            cert_to_pem(west.root).decode(),
            cert_to_pem(rotated.root).decode(),
        ),
    }
    s = scrape(
        lambda: metrics.certificate_families(
            [
                metrics.svid_expiry(svid.spiffe_id.uri, svid.not_after, svid.cert_pem),
                *metrics.roots_of(bundle),
                *metrics.roots_of(bundle),  # the same root twice is one series
                *metrics.roots_of({"bad.fedgate.local": ("not a certificate",)}),  # skipped
            ]
        )
    )
    expiry = s.named("fedgate_certificate_expiry_timestamp_seconds")
    assert len(expiry) == 4
    by_kind = {(dict(k)["kind"], dict(k)["identity"]): v for k, v in expiry.items()}
    uri = "spiffe://east.fedgate.local/ns/demo/sa/client"
    assert by_kind[("svid", uri)] == svid.not_after.timestamp()
    roots = [dict(k) for k in expiry if dict(k)["kind"] == "root"]
    assert sorted(r["trust_domain"] for r in roots) == [
        "east.fedgate.local",
        "west.fedgate.local",
        "west.fedgate.local",
    ]
    assert len({r["fingerprint"] for r in roots}) == 3  # rotating roots stay apart
    assert all(v > NOW.timestamp() for v in expiry.values())


def test_push_and_config_families() -> None:
    push = PushStats()
    sub = push.opened("echo-1.east", "sidecar", "east")
    push.acked(sub, "v2", 10.0, 0.0, 10.3)
    push.nacked(sub)
    s = scrape(
        lambda: [
            *metrics.config_version_families("v2", "controller"),
            *metrics.push_families(push, subscribers=1),
        ]
    )
    group = {"kind": "sidecar", "cluster": "east"}
    assert s.value("fedgate_config_version_info", component="controller", version="v2") == 1
    assert s.value("fedgate_config_push_latency_seconds_count", **group) == 1
    assert s.value("fedgate_config_push_latency_seconds_bucket", **group, le="0.5") == 1
    assert s.value("fedgate_config_push_latency_seconds_bucket", **group, le="0.25") == 0
    assert s.value("fedgate_config_acks_total", **group) == 1
    assert s.value("fedgate_config_nacks_total", **group) == 1
    node = {"node": "echo-1.east", **group}
    assert s.value("fedgate_config_subscriber_push_latency_seconds", **node) == pytest.approx(0.3)
    assert s.value("fedgate_config_subscriber_version_info", **node, version="v2") == 1
    assert s.value("fedgate_config_subscribers") == 1


def test_subscriber_lag_families() -> None:
    push = PushStats()
    fresh = push.opened("gw.east", "gateway", "east", version="v2")
    stuck = push.opened("echo-1.east", "sidecar", "east", version="v1")
    for sub in (fresh, stuck):
        sub.offered("v2", 100.0)
    s = scrape(lambda: metrics.push_families(push, 2, 112.5, dropped=1, heartbeats=7))
    east = {"kind": "sidecar", "cluster": "east"}
    assert s.value("fedgate_config_subscriber_lag_seconds", node="echo-1.east", **east) == 12.5
    assert s.value("fedgate_config_subscriber_lag_seconds", node="gw.east", kind="gateway",
                   cluster="east") == 0.0  # fmt: skip
    assert s.value("fedgate_config_subscriber_max_lag_seconds") == 12.5
    assert s.value("fedgate_config_subscribers_stale", **east) == 1
    assert s.value("fedgate_config_subscribers_stale", kind="gateway", cluster="east") == 0
    assert s.value("fedgate_config_streams_dropped_total") == 1
    assert s.value("fedgate_config_heartbeats_total") == 7
    proxy = scrape(lambda: metrics.proxy_config_families(0, 3, 1, lag_seconds=4.5, stalls=2))
    assert proxy.value("fedgate_config_lag_seconds") == 4.5
    assert proxy.value("fedgate_config_stream_stalls_total") == 2


def test_gitops_and_controller_families() -> None:
    status = {
        "branch": "main",
        "appliedCommit": "abc123",
        "rounds": {"applied": 2, "rejected": 3, "up-to-date": 9},
    }
    controller = {
        "leader": True,
        "syncs": 5,
        "syncFailures": 1,
        "liveness": {"east": {"state": "Live"}, "west": {"state": "Down"}},
    }
    s = scrape(lambda: [*metrics.gitops_families(status), *metrics.controller_families(controller)])
    assert s.value("fedgate_gitops_applied_commit_info", branch="main", sha="abc123") == 1
    assert s.value("fedgate_gitops_rejections_total") == 3
    assert s.value("fedgate_gitops_sync_rounds_total", result="up-to-date") == 9
    assert s.value("fedgate_controller_leader") == 1
    assert s.value("fedgate_cluster_live", cluster="west", state="Down") == 0
    assert s.value("fedgate_cluster_live", cluster="east", state="Live") == 1
    assert not scrape(lambda: metrics.gitops_families(None)).samples


def test_tunnel_families_per_gateway_pair() -> None:
    links = [
        LinkStats("west", "tls", True, 2, 0.0031, 4, 120, 10, 8, 3, 1, 1, 2, 0.05, "healthy"),
        LinkStats("north", "quic", False, 0, None, 0, 5, 0, 0, 1, 4, 1, 0, 1.0, "unreachable"),
        LinkStats("south", "quic", False, 0, None, 0, 0, 0, 0, 0, 0, 0),
    ]
    s = scrape(lambda: metrics.tunnel_families("east", links))
    west = {"source_cluster": "east", "destination_cluster": "west", "transport": "tls"}
    north = {"source_cluster": "east", "destination_cluster": "north", "transport": "quic"}
    assert s.value("fedgate_tunnel_up", **west) == 1
    assert s.value("fedgate_tunnel_up", **north) == 0
    assert s.value("fedgate_tunnel_rtt_seconds", **west) == 0.0031
    assert s.value("fedgate_tunnel_rtt_seconds", **north) is None  # no probe answered yet
    assert s.value("fedgate_tunnel_open_streams", **west) == 4
    assert s.value("fedgate_tunnel_streams_total", **west) == 120
    # 10 probes, 8 answered, up to one in flight per connection: 0 lost beyond those
    assert s.value("fedgate_tunnel_probes_unanswered_total", **west) == 0
    assert s.value("fedgate_tunnel_handshakes_total", **north, result="failed") == 4
    assert s.value("fedgate_tunnel_connections_lost_total", **west) == 1
    # health: what the egress routes on (`gateway.pool`)
    south = {**north, "destination_cluster": "south"}
    assert s.value("fedgate_tunnel_peer_healthy", **west) == 1
    assert s.value("fedgate_tunnel_peer_healthy", **north) == 0
    assert s.value("fedgate_tunnel_peer_healthy", **south) is None  # never dialled: unknown
    assert s.value("fedgate_tunnel_healthy_connections", **west) == 2
    assert s.value("fedgate_tunnel_probe_loss_ratio", **west) == 0.05
    assert s.value("fedgate_tunnel_probe_loss_ratio", **north) == 1.0


def test_asyncio_tasks_gauge_counts_the_loops_tasks() -> None:
    # bench/soak.py reads it at start and end: a count that only grows is a task leak.
    def scraped() -> int:
        found = re.search(r"^fedgate_asyncio_tasks (\S+)$", metrics.exposition(), re.M)
        assert found is not None
        return int(float(found.group(1)))

    async def main() -> tuple[int, int]:
        before = scraped()
        waiters = [asyncio.create_task(asyncio.sleep(30)) for _ in range(5)]
        after = scraped()
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        return before, after

    before, after = asyncio.run(main())
    assert after == before + 5
    assert "fedgate_asyncio_tasks" not in metrics.exposition()  # off the loop: not reported
