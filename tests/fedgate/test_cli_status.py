"""`fedgate status` rendering: clusters with their gateways, gateway links with RTT."""

from __future__ import annotations

import json

from fedgate.admin import AdminState, serve
from fedgate.cli_status import render, replica_streams

BASE = {
    "revision": 42,
    "leader": {"id": "controller", "grpc": "g:1", "admin": "a:2", "since": 100.0},
    "config": {"version": "v1"},
    "commit": "abc",
    "clusters": {
        "east": {"lease": "alive", "routed": True, "liveness": {"state": "Live", "since": 90.0}},
        "west": {"lease": "expired", "routed": False, "liveness": {"state": "Down", "losses": 1}},
    },
    "services": [
        {
            "name": "echo",
            "namespace": "demo",
            "vip": "10.255.0.1",
            "ports": [{"name": "http", "port": 8080, "protocol": "HTTP"}],
            "endpoints": {"east": 1},
            "conditions": [
                {"type": "Conflict", "status": True, "reason": "PortConflict", "message": "m"}
            ],
        }
    ],
}


def test_gateways_and_links_are_shown_with_rtt() -> None:
    data = {
        **BASE,
        "gateways": {
            "clusters": {
                "east": {"up": True, "address": "172.30.0.10:15020"},
                "west": {"up": False, "address": "172.30.0.11:15020"},
            },
            "links": [
                {"source": "east", "destination": "west", "health": "down",
                 "rtt_ms": None, "open_streams": 0, "reason": "cluster not live"},
                {"source": "west", "destination": "east", "health": "up",
                 "rtt_ms": 0.4321, "open_streams": 3, "reason": ""},
            ],
        },
    }  # fmt: skip
    text = render(data, now=100.0)
    lines = text.splitlines()
    east = next(x for x in lines if x.startswith("east "))
    assert east.endswith("up 172.30.0.10:15020")
    assert next(x for x in lines if x.startswith("west ")).endswith("DOWN 172.30.0.11:15020")
    link = next(x for x in lines if x.startswith("west -> east"))
    assert link.split()[3:6] == ["up", "0.432", "ms"]
    assert "cluster not live" in next(x for x in lines if x.startswith("east -> west"))
    assert "Conflict (PortConflict): m" in text
    assert "commit abc" in text


def test_unknown_gateways_say_why() -> None:
    text = render({**BASE, "gateways": {"error": "cannot read the leader's topology: refused"}})
    assert "gateways  unknown: cannot read the leader's topology: refused" in text


def test_a_service_without_a_vip_and_the_policies_of_each_service_are_shown() -> None:
    without = {**BASE["services"][0], "name": "late", "vip": ""}  # type: ignore[dict-item]
    policy = {"namespace": "demo", "service": "echo", "name": "west-only", "action": "ALLOW"}
    data = {
        **BASE,
        "services": [*BASE["services"], without],  # type: ignore[list-item]
        "authorization": [policy],
        "gateways": {"error": "x"},
    }
    lines = render(data).splitlines()
    late = lines.index(next(x for x in lines if x.startswith("late.demo")))
    assert lines[late].split()[1] == "NONE"
    assert "no VIP" in lines[late + 1]
    echo = lines.index(next(x for x in lines if x.startswith("echo.demo")))
    assert lines[echo + 1].strip() == "AuthorizationPolicy: demo/west-only (ALLOW)"


def test_a_rejected_commit_is_shown_under_the_applied_one() -> None:
    rejection = {"sha": "b" * 40, "rejectedAt": "2026-01-02T00:00Z", "total": 2, "issues": []}
    lines = render({**BASE, "rejection": rejection, "gateways": {"error": "x"}}).splitlines()
    assert lines[0].startswith("config    version v1  commit abc")
    assert lines[1] == (
        f"rejected  {'b' * 40} at 2026-01-02T00:00Z, 2 issue(s): `fedgate config status` lists them"
    )
    assert not any(x.startswith("rejected") for x in render({**BASE, "gateways": {}}).splitlines())


def test_a_held_config_and_a_detached_cluster_are_shown() -> None:
    held = {"reason": "would drop 2 of 2 clusters (east, west)", "since": 90.0, "version": "v1"}
    clusters = {
        **BASE["clusters"],  # type: ignore[dict-item]
        "west": {"lease": "expired", "routed": True, "liveness": {"state": "Detached"}},
    }
    data = {**BASE, "config": {"version": "v1", "held": held}, "clusters": clusters}
    lines = render({**data, "gateways": {"error": "x"}}, now=100.0).splitlines()
    assert lines[1].startswith("HELD      the last good config is served since 10s ago: ")
    assert "would drop 2 of 2 clusters (east, west)" in lines[1]
    west = next(x for x in lines if x.startswith("west"))
    assert west.split()[:4] == ["west", "expired", "yes", "Detached"]
    assert not any(x.startswith("HELD") for x in render({**BASE, "gateways": {}}).splitlines())


def stream_row(node: str, version: str, lag: float, nacked: str = "") -> dict[str, object]:
    kind = "gateway" if node.startswith("gw") else "sidecar"
    return {"node": node, "kind": kind, "cluster": "east", "version": version,
            "sent": nacked or version, "nacked": nacked, "lag_seconds": lag}  # fmt: skip


def test_every_proxys_config_lag_is_shown_and_a_stale_one_is_flagged() -> None:
    streams = [
        {"admin": "10.0.0.1:15014", "replica": "ctl-0", "leader": True, "version": "v9",
         "streams": [stream_row("gw.east", "v9", 0.0)]},
        {"admin": "10.0.0.1:15114", "replica": "ctl-1", "leader": False, "version": "v9",
         "streams": [stream_row("echo-1.east", "v1", 42.0),
                     stream_row("echo-2.east", "v8", 1.5, nacked="v9")]},
        {"admin": "10.0.0.1:15214", "error": "cannot read the replica's streams: refused"},
    ]  # fmt: skip
    text = render({**BASE, "gateways": {"error": "-"}, "streams": streams}, now=100.0)
    lines = text.splitlines()
    assert "ctl-1 (follower)  version v9  2 streams  1 stale  max lag 42.0s" in text
    assert "10.0.0.1:15214  unknown: cannot read the replica's streams: refused" in text
    rows = [x for x in lines if x.startswith(("echo-", "gw."))]
    assert [r.split()[0] for r in rows] == ["echo-1.east", "echo-2.east", "gw.east"]  # worst 1st
    assert rows[0].split()[4:7] == ["v1", "STALE", "42.0s"]
    assert rows[1].endswith("NACKed v9")
    assert rows[2].split()[4:7] == ["v9", "ok", "0.0s"]


async def test_streams_are_read_from_every_replica_admin() -> None:
    state = AdminState()

    async def streams_json(query: str) -> tuple[int, bytes, str]:
        body = {"replica": "ctl-0", "leader": True, "version": "v1", "streams": []}
        return 200, json.dumps(body).encode(), "application/json"

    state.pages["streams.json"] = streams_json
    server = await serve(state, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        up, bad = await replica_streams([f"127.0.0.1:{port}", "nowhere"])
    finally:
        server.close()
        await server.wait_closed()
    assert up == {"admin": f"127.0.0.1:{port}", "replica": "ctl-0", "leader": True,
                  "version": "v1", "streams": []}  # fmt: skip
    assert bad == {"admin": "nowhere", "error": "not host:port"}
