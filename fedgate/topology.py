"""The controller's live topology: `GET /topology` (the page), `GET /topology.json` (its data).

The controller knows the clusters (liveness), their gateways' addresses and the services with
their endpoints (its snapshot). What only the gateways know, the health of each tunnel between
two gateways, its RTT and the calls it carries, is read from each gateway's metrics listener
(`<gateway WAN host>:15020/metrics`, metrics only) when the page asks, at most once per
`min_interval`; two successive scrapes give the rates. `build()` is the pure part: it joins
those inputs into the JSON the page draws.

Link health, per ordered pair (source gateway dials destination):
    either cluster not Live, or either gateway's metrics unreachable -> down
    the source reports fedgate_tunnel_up = 1                        -> up
    the source reports fedgate_tunnel_up = 0 (dialled, not connected) -> down
    the source never dialled the destination (dialling is lazy)      -> idle
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fedgate import rates
from fedgate.errors import FedgateError, ScrapeError
from mesh.model import Snapshot

Json = dict[str, Any]
GATEWAY_METRICS_PORT = 15020
MAX_BODY = 4 * 1024 * 1024
RATE_WINDOW_MAX = 30.0  # seconds: an older previous scrape gives no rate


@dataclass(frozen=True, slots=True)
class GatewayScrape:
    cluster: str
    address: str
    scrape: rates.Scrape | None
    error: str = ""


def _pair_values(
    scrape: rates.Scrape | None, name: str, combine: Callable[[float, float], float]
) -> dict[tuple[str, str], float]:
    """`name`'s samples per (source, destination), the transports combined with `combine`."""
    if scrape is None:
        return {}
    out: dict[tuple[str, str], float] = {}
    for labels, value in scrape.named(name).items():
        d = dict(labels)
        key = (d.get("source_cluster", ""), d.get("destination_cluster", ""))
        out[key] = value if key not in out else combine(out[key], value)
    return out


def _sum(a: float, b: float) -> float:
    return a + b


def _pair_rates(before: rates.Scrape | None, after: rates.Scrape | None) -> dict[str, Any]:
    """Calls per second per (source, destination): from the request metrics when the gateway
    has them, else from the tunnel streams it opened."""
    if before is None or after is None or not 0 < after.at - before.at <= RATE_WINDOW_MAX:
        return {}
    found = rates.counter_rates(before, after, rates.REQUESTS)
    basis = "requests"
    if not found:
        found = rates.counter_rates(before, after, "fedgate_tunnel_streams_total")
        basis = "tunnel streams"
    pairs = rates.by_reporter(found, ("source_cluster", "destination_cluster"))
    services = rates.by_reporter(found, ("destination_service",)) if basis == "requests" else {}
    return {"pairs": pairs, "services": services, "basis": basis}


def build(
    snapshot: Snapshot | None,
    liveness: Mapping[str, str],
    scrapes: Mapping[str, GatewayScrape],
    previous: Mapping[str, rates.Scrape],
    known: Iterable[str] = (),
    meta: Json | None = None,
) -> Json:
    """The page's data. `liveness`: cluster -> Live/Down/Suppressed; `scrapes`: this round's
    scrape per cluster; `previous`: the last earlier successful scrape per cluster."""
    live_infos = {c.name: c for c in snapshot.clusters} if snapshot else {}
    names = sorted(set(liveness) | set(live_infos) | set(scrapes) | set(known))
    clusters: list[Json] = []
    for name in names:
        g = scrapes.get(name)
        info = live_infos.get(name)
        clusters.append(
            {
                "name": name,
                "state": liveness.get(name, "Live" if info else "Unknown"),
                "routed": info is not None,
                "gateway": {
                    "address": g.address if g else "",
                    "up": bool(g and g.scrape is not None),
                    "error": g.error if g else "no gateway address known",
                    "transport": info.gateway.transport if info and info.gateway else "",
                },
            }
        )
    up = {c["name"] for c in clusters if c["gateway"]["up"]}
    live = {c["name"] for c in clusters if c["state"] == "Live"}
    rtt: dict[tuple[str, str], float] = {}
    tunnel_up: dict[tuple[str, str], float] = {}
    gauges: dict[str, dict[tuple[str, str], float]] = {}
    call_rates: dict[tuple[str, ...], float] = {}
    service_rates: dict[tuple[str, ...], float] = {}
    basis = ""
    for name, g in scrapes.items():
        rtt.update(_pair_values(g.scrape, "fedgate_tunnel_rtt_seconds", min))
        tunnel_up.update(_pair_values(g.scrape, "fedgate_tunnel_up", max))
        for metric in ("fedgate_tunnel_open_streams", "fedgate_tunnel_streams_total"):
            gauges.setdefault(metric, {}).update(_pair_values(g.scrape, metric, _sum))
        found = _pair_rates(previous.get(name), g.scrape)
        if found:
            basis = basis or found["basis"]
            for k, v in found["pairs"].items():
                call_rates[k] = max(call_rates.get(k, 0.0), v)
            for k, v in found["services"].items():
                service_rates[k] = service_rates.get(k, 0.0) + v
    links = []
    for src in names:
        for dst in names:
            if src == dst:
                continue
            pair = (src, dst)
            if src not in live or dst not in live:
                health, why = "down", "cluster not live"
            elif src not in up or dst not in up:
                health, why = "down", "gateway metrics unreachable"
            elif pair not in tunnel_up:
                health, why = "idle", "not dialled yet (tunnels open on the first call)"
            elif tunnel_up[pair] >= 1:
                health, why = "up", ""
            else:
                health, why = "down", "no tunnel connection"
            seconds = rtt.get(pair)
            links.append(
                {
                    "source": src,
                    "destination": dst,
                    "health": health,
                    "reason": why,
                    "rtt_ms": round(seconds * 1000, 3) if seconds is not None else None,
                    "open_streams": int(gauges.get("fedgate_tunnel_open_streams", {}).get(pair, 0)),
                    "streams": int(gauges.get("fedgate_tunnel_streams_total", {}).get(pair, 0)),
                    "rps": round(call_rates[pair], 3) if pair in call_rates else None,
                }
            )
    services = []
    for s in snapshot.services if snapshot else ():
        per: dict[str, int] = dict.fromkeys(s.clusters, 0)
        for e in s.endpoints:
            per[e.cluster] = per.get(e.cluster, 0) + 1
        fqdn = f"{s.key.name}.{s.key.namespace}"
        conflicts = [c.message for c in s.conditions if c.type == "Conflict" and c.status]
        rps = service_rates.get((f"{fqdn}.svc.clusterset.local",), service_rates.get((fqdn,)))
        services.append(
            {
                "name": fqdn,
                "vip": s.vip,
                "endpoints": dict(sorted(per.items())),
                "conflict": "; ".join(conflicts),
                "rps": round(rps, 3) if rps is not None else None,
            }
        )
    return {
        **(meta or {}),
        "version": snapshot.version if snapshot else "",
        "rate_basis": basis,
        "clusters": clusters,
        "links": links,
        "services": sorted(services, key=lambda s: s["name"]),
    }


# --- the driver -------------------------------------------------------------------------------


async def http_get(host: str, port: int, path: str, timeout: float) -> str:  # noqa: ASYNC109
    """A minimal HTTP/1.0 GET (the admin servers answer one request per connection)."""
    return (await http_get_headers(host, port, path, timeout))[1]


async def http_get_headers(
    host: str,
    port: int,
    path: str,
    timeout: float,  # noqa: ASYNC109
) -> tuple[dict[str, str], str]:
    """`http_get`, with the response's headers (names lowercased)."""
    where = f"http://{host}:{port}{path}"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                data = await reader.read(MAX_BODY + 65536)
                while chunk := await reader.read(65536):
                    data += chunk
                    if len(data) > MAX_BODY + 65536:
                        raise ScrapeError(f"{where}: body larger than {MAX_BODY} bytes")
            finally:
                writer.close()
    except TimeoutError as e:
        raise ScrapeError(f"{where}: no answer within {timeout:g} s") from e
    except OSError as e:
        raise ScrapeError(f"{where}: {e.strerror or e}") from e
    head, sep, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if not sep or status != [b"200"]:
        raise ScrapeError(f"{where}: answered {head.splitlines()[0][:80]!r}" if head else where)
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers, body.decode("utf-8", "replace")


@dataclass
class Topology:
    """Scrapes the gateways of the current snapshot on demand and builds the page's data."""

    snapshot: Callable[[], Snapshot | None]
    liveness: Callable[[], Mapping[str, str]]
    meta: Callable[[], Json] = dict
    metrics_port: int = GATEWAY_METRICS_PORT
    timeout: float = 0.5
    min_interval: float = 0.5
    clock: Callable[[], float] = time.monotonic
    _addresses: dict[str, str] = field(default_factory=dict)  # last known, kept for down ones
    _previous: dict[str, rates.Scrape] = field(default_factory=dict)
    _last: dict[str, rates.Scrape] = field(default_factory=dict)
    _cached: Json | None = None
    _cached_at: float = -1e9
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def data(self) -> Json:
        async with self._lock:  # concurrent viewers share one scrape round
            if self._cached is not None and self.clock() - self._cached_at < self.min_interval:
                return self._cached
            snap = self.snapshot()
            liveness = self.liveness()
            for c in snap.clusters if snap else ():
                if c.gateway is not None:
                    self._addresses[c.name] = c.gateway.tunnel_host
            # A cluster out of the snapshot stays on the page (as Down) while the controller
            # keeps its liveness record; once that is gone, so is the cluster.
            current = {c.name for c in snap.clusters} if snap else set()
            for gone in set(self._addresses) - current - set(liveness):
                del self._addresses[gone]
                self._previous.pop(gone, None)
                self._last.pop(gone, None)
            names = sorted(self._addresses)
            results = await asyncio.gather(*(self._scrape(n) for n in names))
            scrapes = dict(zip(names, results, strict=True))
            previous = dict(self._previous)
            self._cached = build(
                snap,
                liveness,
                scrapes,
                previous,
                known=self._addresses,
                meta={**self.meta(), "updated": time.time()},
            )
            self._cached_at = self.clock()
            return self._cached

    async def _scrape(self, cluster: str) -> GatewayScrape:
        host = self._addresses[cluster]
        address = f"{host}:{self.metrics_port}"
        try:
            text = await http_get(host, self.metrics_port, "/metrics", self.timeout)
            scrape = rates.parse(text, self.clock())
        except FedgateError as e:
            return GatewayScrape(cluster, address, None, str(e))
        # Rates are taken against a scrape at least a second old, so that a page polled
        # every ~1 s by several viewers still compares scrapes about a second apart.
        last = self._last.get(cluster)
        if last is None or scrape.at - last.at >= 1.0:
            if last is not None:
                self._previous[cluster] = last
            self._last[cluster] = scrape
        return GatewayScrape(cluster, address, scrape)


def page() -> bytes:
    return resources.files("fedgate").joinpath("topology.html").read_bytes()
