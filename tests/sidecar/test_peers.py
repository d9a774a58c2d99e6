"""PeerHealth and the health check routing uses, with a hand-driven clock."""

from __future__ import annotations

from sidecar.traffic.attempt import health_check
from sidecar.traffic.balance import remote_host
from sidecar.traffic.peers import PeerHealth


def test_a_cluster_marked_down_is_unhealthy_until_its_time_is_up() -> None:
    peers = PeerHealth(down_seconds=5.0)
    peers.mark_down("west", now=100.0)
    assert not peers.healthy(remote_host("west"), 104.9)
    assert peers.down(104.9) == ["west"]
    assert peers.healthy(remote_host("north"), 104.9)
    assert peers.healthy("10.1.0.7", 104.9)  # local endpoints are not its business
    assert peers.healthy(remote_host("west"), 105.0)
    assert peers.down(105.0) == []


def test_status_lists_the_clusters_still_avoided_while_others_expire() -> None:
    peers = PeerHealth(down_seconds=5.0)
    peers.mark_down("west", now=100.0)
    peers.mark_down("north", now=102.0)
    peers.mark_down("south", now=100.5)
    assert peers.down(105.5) == ["north"]  # west and south expired while being listed
    assert peers.down(110.0) == []


def test_a_repeated_refusal_extends_the_verdict() -> None:
    peers = PeerHealth(down_seconds=5.0)
    peers.mark_down("west", now=100.0)
    peers.mark_down("west", now=103.0)
    assert not peers.healthy(remote_host("west"), 107.0)
    assert peers.marked == 2


def test_the_health_check_combines_the_gateways_word_with_outlier_detection() -> None:
    peers = PeerHealth()
    assert health_check(None, 1.0)(remote_host("west"))
    peers.mark_down("west", now=1.0)
    healthy = health_check(None, 2.0, peers)
    assert not healthy(remote_host("west"))
    assert healthy(remote_host("east"))


def test_with_the_gateways_feed_only_its_reports_decide() -> None:
    peers = PeerHealth(down_seconds=5.0)
    peers.report(frozenset({"west"}))  # the gateway's probes found west down
    assert not peers.healthy(remote_host("west"), 100.0)
    assert not peers.healthy(remote_host("west"), 1000.0)  # no timer brings it back
    peers.mark_down("north", now=100.0)  # refused before the gateway's report said so
    assert not peers.healthy(remote_host("north"), 200.0)  # still: the feed decides
    assert peers.down(200.0) == ["north", "west"]
    peers.report(frozenset())  # the probes pass again: both are back, no call needed
    assert peers.healthy(remote_host("west"), 200.0)
    assert peers.healthy(remote_host("north"), 200.0)
    assert peers.reports == 2


def test_a_lost_feed_leaves_what_it_listed_to_the_refusal_rule() -> None:
    peers = PeerHealth(down_seconds=5.0)
    peers.report(frozenset({"west"}))
    peers.feed_lost(now=100.0)
    assert not peers.feed
    assert not peers.healthy(remote_host("west"), 104.9)
    assert peers.healthy(remote_host("west"), 105.0)
