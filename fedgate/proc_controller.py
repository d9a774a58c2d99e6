"""The controller process: a federation controller replica, wired and run until signalled.

Its etcd ports, leader election, GitOps sync while leader, config-stream server, admin and
topology page; the other processes are in `fedgate.processes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import REGISTRY
from prometheus_client.core import Metric

from ca.authority import CertificateAuthority
from ca.bundle import TrustBundle
from fedgate import admin, logs, metrics
from fedgate.wiring import (
    authorize_peer,
    controller_svid,
    parse_hostport,
    run_with_loop,
    snapshot_bundle,
    until_signalled,
)
from mesh import codec
from mesh.tasks import TaskSet

if TYPE_CHECKING:
    from federation.gitops.sync import GitOpsSync, SyncSettings
    from federation.leader import LeaderElection
    from fedgate.etcdopts import EtcdClientOptions

from fedgate.processes import controller_credentials

_log = structlog.get_logger("fedgate")


def controller(
    etcd_endpoints: list[str],
    listen: str,
    admin_addr: str,
    ca_dir: Path,
    config_dir: Path | None,
    replica: str = "",
    leader_ttl: int = 5,
    gitops: SyncSettings | None = None,
    gateway_metrics_port: int = 15020,
    *,
    etcd: EtcdClientOptions | None = None,
    detach_grace: float = 300.0,
    agent_lease_ttl: int = 10,
) -> None:
    logs.configure("controller")
    structlog.contextvars.bind_contextvars(replica=replica or listen)
    run_with_loop(
        _controller(
            etcd_endpoints,
            listen,
            admin_addr,
            ca_dir,
            config_dir,
            replica,
            leader_ttl,
            gitops,
            gateway_metrics_port,
            etcd,
            detach_grace,
            agent_lease_ttl,
        )
    )


async def follow_repo_while_leader(
    election: LeaderElection | None, sync: GitOpsSync, check_interval: float = 0.25
) -> None:
    """Only the leader applies commits: start the sync on election, cancel it on loss.

    Every apply is also fenced on the leader key, so a replica that lost leadership between
    two checks cannot write; this loop just avoids useless fetches on followers.
    """
    while True:
        # Polled: the election belongs to the controller and has no waitable event to share.
        while election is not None and not election.is_leader:  # noqa: ASYNC110
            await asyncio.sleep(check_interval)
        task = asyncio.create_task(sync.run(), name="controller:gitops")
        try:
            while not task.done() and (election is None or election.is_leader):  # noqa: ASYNC110
                await asyncio.sleep(check_interval)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if task.done() and not task.cancelled() and task.exception() is not None:
            _log.error("gitops sync died, restarting", error=repr(task.exception()))
            await asyncio.sleep(1.0)


async def _controller(
    etcd_endpoints: list[str],
    listen: str,
    admin_addr: str,
    ca_dir: Path,
    config_dir: Path | None,
    replica: str,
    leader_ttl: int,
    gitops: SyncSettings | None,
    gateway_metrics_port: int = 15020,
    etcd: EtcdClientOptions | None = None,
    detach_grace: float = 300.0,
    agent_lease_ttl: int = 10,
) -> None:
    from federation.collapse import CollapseSettings
    from federation.controller import Controller, ControllerSettings
    from federation.controller_etcd import etcd_ports
    from federation.etcd import open_client
    from federation.gitops.checks import port_protocols
    from federation.gitops.store import ConfigStore
    from federation.gitops.sync import GitOpsSync
    from federation.liveness import DampingSettings
    from federation.policy_file import load_policies
    from federation.server import ConfigDiscoveryServicer, SnapshotPublisher, serve
    from fedgate import topology  # the controller's page only: no other kind loads it

    ca = CertificateAuthority.load(ca_dir)
    svid = controller_svid(ca)
    # The config directory only seeds /fedgate/config/ until GitOps applies a commit.
    seed = load_policies(config_dir) if config_dir is not None else None
    client = await open_client(etcd_endpoints, **(etcd.connect_kwargs() if etcd else {}))
    publisher = SnapshotPublisher()
    settings = ControllerSettings(
        replica=replica or listen,
        grpc_address=listen,
        admin_address=admin_addr,
        leader_ttl=leader_ttl,
        freeze_gc=True,
        damping=DampingSettings(detach_grace=detach_grace),
        collapse=CollapseSettings(min_session=agent_lease_ttl),
    )
    feed, writer = etcd_ports(client, settings)
    election = writer.election  # the GitOps sync applies commits under the same fence
    ctl = Controller(feed, writer, publisher, settings=settings, seed_policies=seed)

    def bundle() -> TrustBundle:
        return snapshot_bundle(ctl.current())  # roots and deny list

    servicer = ConfigDiscoveryServicer(
        publisher, authorize=authorize_peer(bundle), replica=settings.replica
    )
    sync: GitOpsSync | None = None
    if gitops is not None:
        fence: Callable[[], Sequence[Any]] = election.fence if election is not None else tuple
        sync = GitOpsSync.from_settings(
            gitops, ConfigStore(client), fence=fence, ports=lambda: port_protocols(ctl.current())
        )
    server = await serve(servicer, listen, controller_credentials(svid, ca.root_pem, ctl.current))
    state = admin.AdminState(
        ready=lambda: ctl.ready,
        config=lambda: {
            "identity": svid.svid.spiffe_id.uri,
            "identityNotAfter": svid.svid.not_after.isoformat(),
            "identityPem": svid.svid.cert_pem.decode(),  # `fedgate ca inspect --admin`
            "subscribers": publisher.subscribers,
            "controller": ctl.status(),
            "version": s.version if (s := ctl.current()) else "",
            "gitops": sync.status() if sync is not None else None,
            "snapshot": codec.snapshot_to_json(s) if s else None,
        },
    )
    if sync is not None:
        the_sync = sync

        async def trigger() -> dict[str, Any]:
            # The webhook: a push notification makes the leader fetch now, not at the next poll.
            if election is not None and not election.is_leader:
                return {"result": "not-leader", "leader": ctl.status().get("leader")}
            outcome = await asyncio.wait_for(the_sync.trigger(), 30)
            return {"result": outcome.result, "sha": outcome.sha, "detail": outcome.detail}

        state.actions["sync"] = trigger

    def families() -> Iterator[Metric]:
        snap = ctl.current()
        status = ctl.status()
        yield from metrics.config_version_families(snap.version if snap else "", "controller")
        yield from metrics.push_families(
            servicer.push,
            publisher.subscribers,
            publisher.clock(),
            dropped=servicer.dropped,
            heartbeats=servicer.heartbeats,
        )
        yield from metrics.controller_families(status)
        yield from metrics.gitops_families(sync.status() if sync is not None else None)
        own = svid.svid
        yield from metrics.certificate_families(
            [
                metrics.svid_expiry(own.spiffe_id.uri, own.not_after, own.cert_pem),
                metrics.cert_expiry(ca.root_pem, "root"),
                *metrics.roots_of(snap.trust_bundle if snap else {}),
            ]
        )

    collector = metrics.register(families)
    view = topology.Topology(
        snapshot=ctl.current,
        liveness=lambda: {n: r["state"] for n, r in ctl.status()["liveness"].items()},
        meta=lambda: {"replica": settings.replica, "leader": ctl.is_leader},
        metrics_port=gateway_metrics_port,
    )

    async def topology_json(query: str) -> tuple[int, bytes, str]:
        return 200, json.dumps(await view.data()).encode(), "application/json"

    async def topology_page(query: str) -> tuple[int, bytes, str]:
        return 200, topology.page(), "text/html; charset=utf-8"

    async def streams_json(query: str) -> tuple[int, bytes, str]:
        # Every config stream on this replica with its proxy's version and lag (`fedgate
        # status` reads it from every replica).
        snap = ctl.current()
        body = {
            "replica": settings.replica,
            "leader": ctl.is_leader,
            "version": snap.version if snap else "",
            "streams": servicer.streams(),
        }
        return 200, json.dumps(body).encode(), "application/json"

    state.pages["topology"] = topology_page
    state.pages["topology.json"] = topology_json
    state.pages["streams.json"] = streams_json
    host, port = parse_hostport(admin_addr)
    admin_server = await admin.serve(state, host, port)
    tasks = TaskSet("controller")
    tasks.spawn(ctl.run(), "sync")
    if sync is not None:
        tasks.spawn(follow_repo_while_leader(election, sync), "gitops")
    try:
        await until_signalled()
    finally:
        REGISTRY.unregister(collector)
        await tasks.aclose()
        await server.stop()
        admin_server.close()
        await client.close()
