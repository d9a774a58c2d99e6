"""The topology data: the pure join (`build`) and the driver scraping real metrics listeners."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from federation.generate import generate
from federation.merge import merge
from fedgate import admin, metrics, rates, topology
from gateway.gateway import LinkStats
from mesh.model import GatewayAddress, Snapshot
from tests.federation.fed_factories import export, info
from tests.helpers import free_port


def snapshot(*clusters: str, hosts: dict[str, str] | None = None) -> Snapshot:
    infos = [
        replace(
            info(c),
            gateway=GatewayAddress(
                (hosts or {}).get(c, "127.0.0.1"), 15443, "10.0.0.1", 15008, "tls"
            ),
        )
        for c in clusters
    ]
    exports = [export(c, addresses=(f"10.{i}.0.1",)) for i, c in enumerate(clusters)]
    exports.append(export(clusters[0], name="solo", addresses=("10.9.0.1",)))
    return generate(infos, merge(infos, exports, {}), [])


def link(
    peer: str, connected: bool = True, rtt: float | None = 0.002, streams: int = 7
) -> LinkStats:
    return LinkStats(peer, "tls", connected, 1 if connected else 0, rtt, 1, streams, 3, 2, 1, 0, 0)


def gateway_text(cluster: str, *links: LinkStats) -> str:
    registry = CollectorRegistry()
    metrics.register(lambda: metrics.tunnel_families(cluster, links), registry)
    return metrics.exposition(registry)


def scrape(cluster: str, text: str | None, at: float = 10.0) -> topology.GatewayScrape:
    if text is None:
        return topology.GatewayScrape(cluster, f"{cluster}:15020", None, "connection refused")
    return topology.GatewayScrape(cluster, f"{cluster}:15020", rates.parse(text, at))


def by_pair(data: dict[str, object]) -> dict[str, dict[str, object]]:
    return {f"{x['source']}->{x['destination']}": x for x in data["links"]}  # type: ignore[attr-defined]


def test_links_up_idle_and_services_with_endpoints_per_cluster() -> None:
    snap = snapshot("east", "west", "north")
    scrapes = {
        "east": scrape("east", gateway_text("east", link("west"))),
        "west": scrape("west", gateway_text("west", link("east", connected=False))),
        "north": scrape("north", gateway_text("north")),
    }
    live = {"east": "Live", "west": "Live", "north": "Live"}
    data = topology.build(snap, live, scrapes, {})
    assert [c["name"] for c in data["clusters"]] == ["east", "north", "west"]
    assert all(c["gateway"]["up"] for c in data["clusters"])
    links = by_pair(data)
    assert len(links) == 6  # every ordered pair
    assert links["east->west"]["health"] == "up"
    assert links["east->west"]["rtt_ms"] == 2.0
    assert links["east->west"]["streams"] == 7
    assert links["west->east"]["health"] == "down"  # dialled, no connection now
    assert links["north->east"]["health"] == "idle"  # never dialled
    services = {s["name"]: s for s in data["services"]}
    assert services["echo.demo"]["endpoints"] == {"east": 1, "north": 1, "west": 1}
    assert services["solo.demo"]["endpoints"] == {"east": 1}


def test_a_down_cluster_and_an_unreachable_gateway_take_their_links_down() -> None:
    snap = snapshot("east", "west")  # west still in the snapshot, its gateway gone
    scrapes = {
        "east": scrape("east", gateway_text("east", link("west"))),
        "west": scrape("west", None),
    }
    data = topology.build(snap, {"east": "Live", "west": "Live"}, scrapes, {})
    west = next(c for c in data["clusters"] if c["name"] == "west")
    assert west["gateway"] == {
        "address": "west:15020",
        "up": False,
        "error": "connection refused",
        "transport": "tls",
    }
    assert {k: v["health"] for k, v in by_pair(data).items()} == {
        "east->west": "down",
        "west->east": "down",
    }
    # The cluster's lease expired: out of the snapshot, still shown (known), as Down.
    gone = topology.build(
        snapshot("east"), {"east": "Live", "west": "Down"}, scrapes, {}, known=["west"]
    )
    states = {c["name"]: (c["state"], c["routed"]) for c in gone["clusters"]}
    assert states == {"east": ("Live", True), "west": ("Down", False)}
    assert by_pair(gone)["east->west"]["reason"] == "cluster not live"


def test_link_rates_from_tunnel_streams_or_request_metrics() -> None:
    snap = snapshot("east", "west")
    before = {"east": rates.parse(gateway_text("east", link("west", streams=10)), 10.0)}
    now = {
        "east": scrape("east", gateway_text("east", link("west", streams=30)), at=12.0),
        "west": scrape("west", gateway_text("west")),
    }
    data = topology.build(snap, {"east": "Live", "west": "Live"}, now, before)
    assert by_pair(data)["east->west"]["rps"] == 10.0
    assert data["rate_basis"] == "tunnel streams"
    requests = (
        "# TYPE fedgate_requests_total counter\n"
        'fedgate_requests_total{source_cluster="east",destination_cluster="west",'
        'destination_service="echo.demo.svc.clusterset.local",response_code="200",'
        'reporter="gateway"} %d\n'
    )
    before = {"east": rates.parse(requests % 100, 10.0)}
    now["east"] = scrape("east", requests % 150, at=12.0)
    data = topology.build(snap, {"east": "Live", "west": "Live"}, now, before)
    assert data["rate_basis"] == "requests"
    assert by_pair(data)["east->west"]["rps"] == 25.0
    assert {s["name"]: s["rps"] for s in data["services"]}["echo.demo"] == 25.0


async def test_the_driver_scrapes_each_gateway_and_serves_page_and_json() -> None:
    port = free_port()
    registry = CollectorRegistry()
    metrics.register(lambda: metrics.tunnel_families("east", [link("west")]), registry)
    gw = admin.AdminState(
        ready=lambda: True, metrics=lambda: metrics.exposition(registry), metrics_only=True
    )
    east_gateway = await admin.serve(gw, "127.0.0.2", port)
    snaps = [snapshot("east", "west", hosts={"east": "127.0.0.2", "west": "127.0.0.3"})]
    live = {"east": "Live", "west": "Live"}
    view = topology.Topology(
        snapshot=lambda: snaps[-1],
        liveness=lambda: live,
        meta=lambda: {"replica": "r1"},
        metrics_port=port,
        min_interval=0.0,
    )
    ctl = admin.AdminState(ready=lambda: True)

    async def data(query: str) -> tuple[int, bytes, str]:
        return 200, json.dumps(await view.data()).encode(), "application/json"

    async def page(query: str) -> tuple[int, bytes, str]:
        return 200, topology.page(), "text/html"

    ctl.pages.update({"topology.json": data, "topology": page})
    ctl_port = free_port()
    controller = await admin.serve(ctl, "127.0.0.1", ctl_port)
    try:
        got = json.loads(await topology.http_get("127.0.0.1", ctl_port, "/topology.json", 5))
        assert got["replica"] == "r1"
        gateways = {c["name"]: c["gateway"] for c in got["clusters"]}
        assert gateways["east"]["up"] is True
        assert gateways["west"]["up"] is False
        assert "127.0.0.3" in gateways["west"]["error"]
        assert by_pair(got)["east->west"]["health"] == "down"  # west's gateway is unreachable
        html = await topology.http_get("127.0.0.1", ctl_port, "/topology", 5)
        assert 'id="map"' in html
        assert "fetch(" in html
        # West leaves the snapshot: still shown while its liveness record says Down...
        snaps.append(snapshot("east", hosts={"east": "127.0.0.2"}))
        live["west"] = "Down"
        states = {c["name"]: c["state"] for c in (await view.data())["clusters"]}
        assert states == {"east": "Live", "west": "Down"}
        # ... and gone from the page once the controller forgot it.
        del live["west"]
        assert [c["name"] for c in (await view.data())["clusters"]] == ["east"]
        # The metrics-only listener does not leak the running config.
        with pytest.raises(topology.ScrapeError, match="404"):
            await topology.http_get("127.0.0.2", port, "/config", 5)
    finally:
        for server in (east_gateway, controller):
            server.close()
            await server.wait_closed()


async def test_a_silent_gateway_times_out_with_a_clear_error() -> None:
    release = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(topology.ScrapeError, match=r"no answer within 0\.2 s"):
            await topology.http_get("127.0.0.1", port, "/metrics", 0.2)
    finally:
        release.set()
        server.close()
        await server.wait_closed()
