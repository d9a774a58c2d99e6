"""`fedgate status`: the federation as etcd holds it, for operators.

Reads (never writes) etcd: the leader record, the config status the leader wrote (version,
commit), the last GitOps commit rejected (while no later one is applied), every cluster's
leased `info` key (present = its agent's lease is alive) and liveness record (Live /
Detached: lease gone, still routed on its last catalog / Down / Suppressed by flap damping),
whether the leader holds the last good config instead of a collapsed one (`HELD`), and every
service's status (VIP, ports, endpoints per cluster, MCS conditions with the conflict
message). With `--rig-dir` and no `--etcd` it runs itself inside the rig's control
namespace, where etcd listens.

Gateways and the links between them (health, RTT) are not in etcd: they come from the
leader's topology data (`GET /topology.json` on the admin address its record names), which
reads each gateway's metrics; when that is unreachable the rest is still shown.

Config streams: every proxy's config version and lag come from each controller replica's
`GET /streams.json` (the leader's admin address from its record, plus `--controller-admin`
for the others; inside the rig, every replica of the rig). A proxy that trails its replica's
current version by more than `STALE_AFTER` seconds is flagged STALE; it resyncs on its own
after a few seconds (docs/controller.md, "Stalled streams"), so one that stays STALE is a bug
to report. An unreachable replica is named, with why.

Each service's AuthorizationPolicies (the applied config under /fedgate/config/) are listed
under it; `fedgate authz check` decides a call against them.

`collect()` returns plain data (also printed by `--json`), `render()` the table; neither
decides anything.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from clusters.rig import topology
from fedgate.etcdopts import env_connect_kwargs

if TYPE_CHECKING:
    from clusters.rig.control import ControlLayout

Json = dict[str, Any]


STALE_AFTER = 5.0  # seconds; as fedgate.metrics.STALE_AFTER


async def collect(endpoints: list[str], controller_admins: list[str] | None = None) -> Json:
    from federation import keys
    from federation.etcd import open_client
    from federation.fedconfig import commit_sha, config_from_entries
    from federation.gitops.store import REJECTION_KEY
    from federation.store import load_prefix
    from mesh.codec import authorization_to_json

    client = await open_client(endpoints, **env_connect_kwargs())
    try:
        loaded = await load_prefix(client, keys.ROOT)
    finally:
        await client.close()
    values = {e.key: e.value for e in loaded.events if e.value is not None}

    def obj(raw: bytes | None) -> Json:
        if raw is None:
            return {}
        try:
            value = json.loads(raw)
        except ValueError:
            return {"error": "malformed"}
        return value if isinstance(value, dict) else {"error": "malformed"}

    clusters: dict[str, Json] = {}
    for key in values:
        if key.startswith(keys.CLUSTERS_PREFIX) and key.endswith("/info"):
            name = key[len(keys.CLUSTERS_PREFIX) : -len("/info")]
            clusters.setdefault(name, {})["lease"] = "alive"
        elif key.startswith(keys.CLUSTER_STATUS_PREFIX):
            name = key[len(keys.CLUSTER_STATUS_PREFIX) :]
            clusters.setdefault(name, {})["liveness"] = obj(values[key])
    config = obj(values.get(keys.CONFIG_STATUS_KEY))
    routed = set(config.get("clusters", []))
    for name, c in clusters.items():
        c.setdefault("lease", "expired")
        c["routed"] = name in routed
    services = [
        obj(v) for k, v in sorted(values.items()) if k.startswith(keys.SERVICE_STATUS_PREFIX)
    ]
    leader = obj(values.get(keys.LEADER_KEY))
    applied, _ = config_from_entries(
        {k: v for k, v in values.items() if k.startswith(keys.CONFIG_PREFIX)}
    )
    admins = [str(leader.get("admin", ""))] if leader.get("admin") else []
    admins += [a for a in controller_admins or [] if a and a not in admins]
    return {
        "revision": loaded.revision,
        "gateways": await _gateways(str(leader.get("admin", ""))),
        "streams": await replica_streams(admins),
        "leader": leader,
        "config": config,
        "commit": commit_sha(values.get(keys.COMMIT_KEY, b"")),
        "rejection": obj(values.get(REJECTION_KEY)),
        "clusters": dict(sorted(clusters.items())),
        "services": services,
        "authorization": [authorization_to_json(a) for a in applied.authorization],
    }


async def _gateways(admin: str) -> Json:
    """Gateways and links from the leader's topology data, or why there are none."""
    from fedgate.errors import FedgateError
    from fedgate.topology import http_get

    host, sep, port = admin.rpartition(":")
    if not sep or not port.isdigit():
        return {"error": "no leader admin address"}
    try:
        data = json.loads(await http_get(host, int(port), "/topology.json", 2.0))
    except (FedgateError, ValueError) as e:
        return {"error": f"cannot read the leader's topology: {e}"}
    return {
        "clusters": {c["name"]: c["gateway"] for c in data.get("clusters", [])},
        "links": data.get("links", []),
    }


async def replica_streams(admins: list[str]) -> list[Json]:
    """Each replica's config streams (or why they are unknown), from its admin address."""
    from fedgate.errors import FedgateError
    from fedgate.topology import http_get

    async def one(admin: str) -> Json:
        host, sep, port = admin.rpartition(":")
        if not sep or not port.isdigit():
            return {"admin": admin, "error": "not host:port"}
        try:
            data = json.loads(await http_get(host, int(port), "/streams.json", 2.0))
        except (FedgateError, ValueError) as e:
            return {"admin": admin, "error": f"cannot read the replica's streams: {e}"}
        if not isinstance(data, dict):
            return {"admin": admin, "error": "malformed /streams.json"}
        return {"admin": admin, **data}

    return list(await asyncio.gather(*(one(a) for a in admins)))


def _render_streams(replicas: list[Json]) -> list[str]:
    out: list[str] = []
    rows: list[tuple[float, str]] = []
    for r in replicas:
        name = r.get("replica") or r["admin"]
        if "error" in r:
            out.append(f"replica   {name}  unknown: {r['error']}")
            continue
        streams = r.get("streams", [])
        stale = [s for s in streams if s.get("lag_seconds", 0) > STALE_AFTER]
        worst = max((s.get("lag_seconds", 0) for s in streams), default=0.0)
        role = "leader" if r.get("leader") else "follower"
        out.append(
            f"replica   {name} ({role})  version {r.get('version') or '-'}  "
            f"{len(streams)} streams  {len(stale)} stale  max lag {worst:.1f}s"
        )
        for s in streams:
            lag = float(s.get("lag_seconds", 0))
            state = "ok" if lag == 0 else ("STALE" if lag > STALE_AFTER else "behind")
            note = f"NACKed {s['nacked']}" if s.get("nacked") else ""
            rows.append(
                (
                    -lag,
                    f"{s['node']:<28}{s['kind']:<9}{s['cluster']:<10}{name:<18}"
                    f"{s.get('version') or '-':<18}{state:<7}{lag:>7.1f}s  {note}".rstrip(),
                )
            )
    if rows:
        out.append("")
        out.append(
            f"{'PROXY':<28}{'KIND':<9}{'CLUSTER':<10}{'REPLICA':<18}{'VERSION':<18}"
            f"{'STATE':<7}{'LAG':>8}"
        )
        out.extend(row for _, row in sorted(rows, key=lambda r: r[0]))
    return out


def _ago(t: object, now: float) -> str:
    if not isinstance(t, int | float) or not t:
        return "-"
    seconds = max(0.0, now - float(t))
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def render(data: Json, now: float | None = None) -> str:
    now = time.time() if now is None else now
    out: list[str] = []
    config, leader = data["config"], data["leader"]
    commit = data["commit"] or "(no GitOps commit: seeded config)"
    out.append(
        f"config    version {config.get('version') or '-'}  commit {commit}  "
        f"etcd revision {data['revision']}"
    )
    held = config.get("held") or {}
    if held:
        out.append(
            f"HELD      the last good config is served since {_ago(held.get('since'), now)}: "
            f"{held.get('reason', '?')} (stale is better than empty: docs/controller.md)"
        )
    rejection = data.get("rejection") or {}
    if rejection.get("sha"):
        out.append(
            f"rejected  {rejection['sha']} at {rejection.get('rejectedAt', '?')}, "
            f"{rejection.get('total', 0)} issue(s): `fedgate config status` lists them"
        )
    if leader.get("id"):
        out.append(
            f"leader    {leader['id']}  grpc {leader.get('grpc') or '-'}  "
            f"admin {leader.get('admin') or '-'}  since {_ago(leader.get('since'), now)}"
        )
    else:
        out.append("leader    NONE (no controller replica holds the election)")
    out.append("")
    gateways = data.get("gateways", {})
    gw_of = gateways.get("clusters", {})
    out.append(
        f"{'CLUSTER':<14}{'LEASE':<9}{'ROUTED':<8}{'STATE':<12}{'LOSSES':<8}{'SINCE':<10}GATEWAY"
    )
    for name, c in data["clusters"].items():
        live = c.get("liveness", {})
        gw = gw_of.get(name)
        gateway = "-" if gw is None else f"{'up' if gw.get('up') else 'DOWN'} {gw.get('address')}"
        out.append(
            f"{name:<14}{c['lease']:<9}{'yes' if c['routed'] else 'no':<8}"
            f"{live.get('state', '-'):<12}{live.get('losses', 0)!s:<8}"
            f"{_ago(live.get('since'), now):<10}{gateway}"
        )
    out.append("")
    if "error" in gateways:
        out.append(f"gateways  unknown: {gateways['error']}")
    else:
        out.append(f"{'GATEWAY LINK':<28}{'HEALTH':<8}{'RTT':<12}{'OPEN STREAMS':<14}REASON")
        for link in gateways.get("links", []):
            rtt = "-" if link.get("rtt_ms") is None else f"{link['rtt_ms']:.3f} ms"
            pair = f"{link['source']} -> {link['destination']}"
            out.append(
                f"{pair:<28}{link['health']:<8}{rtt:<12}{link.get('open_streams', 0)!s:<14}"
                f"{link.get('reason', '')}"
            )
    out.append("")
    if data.get("streams"):
        out.extend(_render_streams(data["streams"]))
        out.append("")
    out.append(f"{'SERVICE':<28}{'VIP':<14}{'PORTS':<24}{'ENDPOINTS':<24}CONDITIONS")
    for s in data["services"]:
        name = f"{s.get('name')}.{s.get('namespace')}"
        ports = ",".join(f"{p['name'] or '-'}:{p['port']}/{p['protocol']}" for p in s["ports"])
        endpoints = " ".join(f"{c}={n}" for c, n in sorted(s.get("endpoints", {}).items()))
        conditions = s.get("conditions", [])
        kinds = ",".join(c["type"] for c in conditions if c.get("status"))
        out.append(
            f"{name:<28}{s.get('vip') or 'NONE':<14}{ports:<24}{endpoints or '-':<24}{kinds}"
        )
        if not s.get("vip"):
            out.append("    no VIP: the name does not resolve until the leader allocates one")
        policies = [
            f"{a['namespace']}/{a['name']} ({a['action']})"
            for a in data.get("authorization", [])
            if (a["service"], a["namespace"]) == (s.get("name"), s.get("namespace"))
        ]
        if policies:
            out.append(f"    AuthorizationPolicy: {', '.join(policies)}")
        for c in conditions:
            if c.get("message"):
                out.append(f"    {c['type']} ({c.get('reason', '')}): {c['message']}")
    return "\n".join(out)


F = TypeVar("F", bound=Callable[..., Any])


def etcd_or_rig(f: F) -> F:
    """The `--etcd` and `--rig-dir` options of a command that reads etcd (`rerun_in_rig`)."""
    f = click.option(
        "--rig-dir",
        type=click.Path(path_type=Path),
        default=topology.DEFAULT_RIG_DIR,
        show_default=True,
        help="Without --etcd: read the etcd of the rig at this directory.",
    )(f)
    return click.option("--etcd", "etcd_endpoints", default="", help="host:port[,host:port...]")(f)


@click.command("status")
@etcd_or_rig
@click.option(
    "--controller-admin",
    "controller_admins",
    default="",
    help="host:port[,...]: admin addresses of controller replicas besides the leader, whose "
    "config streams (every proxy's version and lag) to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the collected data as JSON.")
def status(etcd_endpoints: str, rig_dir: Path, controller_admins: str, as_json: bool) -> None:
    """Show clusters (liveness), services (endpoints, MCS conditions), the config version and
    every proxy's config lag."""
    if not etcd_endpoints:
        sys.exit(_in_rig(rig_dir, as_json))
    admins = [a.strip() for a in controller_admins.split(",") if a.strip()]
    try:
        data = asyncio.run(collect(etcd_endpoints.split(","), admins))
    except Exception as e:  # an operator tool: one clear line, not a traceback
        raise click.ClickException(f"cannot read etcd at {etcd_endpoints}: {e}") from e
    click.echo(json.dumps(data, indent=2) if as_json else render(data))


def _in_rig(rig_dir: Path, as_json: bool) -> int:
    def admins(layout: ControlLayout) -> list[str]:
        return ["--controller-admin", ",".join(r.admin for r in layout.controllers)]

    return rerun_in_rig(rig_dir, ["status", *(["--json"] if as_json else [])], admins)


def rerun_in_rig(
    rig_dir: Path, args: list[str], extra: Callable[[ControlLayout], list[str]] | None = None
) -> int:
    """Run `fedgate <args> --etcd <the rig's etcd>` inside the rig's control namespace;
    `extra` adds arguments taken from the rig's control-plane layout."""
    from clusters.rig import control, lifecycle
    from clusters.rig.errors import RigError

    try:
        state = lifecycle.load(rig_dir)
    except RigError as e:
        raise click.ClickException(f"{e}; or pass --etcd") from e
    layout = control.load(rig_dir, state.prefix)
    endpoints = layout.etcd_endpoints
    more = extra(layout) if extra is not None else []
    argv = [sys.executable, "-m", "fedgate", *args, *more, "--etcd", ",".join(endpoints)]
    netns = topology.control(state.prefix).netns
    return subprocess.call(["ip", "netns", "exec", netns, *argv])
