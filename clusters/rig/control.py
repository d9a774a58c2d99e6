"""The rig's control plane: 1 or 3 etcd members and N controller replicas, in the control netns.

    etcd member i        client  <ctl ip>:2379 + 100*i     peer 127.0.0.1:2380 + 100*i
    controller replica i gRPC    <ctl ip>:15012 + 100*i    admin <ctl ip>:15014 + 100*i

Member 0 and replica 0 keep the single-member addresses (`topology.ETCD_PORT`, ...), so tools
that know only those still work. The layout is written to `<rigdir>/control.json` so later
commands (add a pod, `fedgate status`, tests killing a member) find every endpoint; agents get
every etcd endpoint and proxies every controller address (comma-separated), and fail over.

A 3-member etcd runs with a 50 ms heartbeat and a 500 ms election timeout (defaults: 100 ms /
1 s), so losing the raft leader costs the rig about a second, not several. This module starts
processes through `lifecycle`; what they do is decided elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clusters.rig import lifecycle, procs, topology
from clusters.rig import state as rigstate

READY_TIMEOUT = 60.0
PORT_STEP = 100
LAYOUT_FILE = "control.json"


@dataclass(frozen=True, slots=True)
class EtcdMember:
    name: str
    process: str  # the rig's process name ("etcd", "etcd-1", ...)
    host: str
    client_port: int
    peer_port: int

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass(frozen=True, slots=True)
class Replica:
    process: str  # "controller", "controller-1", ...
    grpc: str
    admin: str


@dataclass(frozen=True, slots=True)
class ControlLayout:
    netns: str
    etcd: tuple[EtcdMember, ...]
    controllers: tuple[Replica, ...]

    @property
    def etcd_endpoints(self) -> list[str]:
        return [m.endpoint for m in self.etcd]

    @property
    def etcd_arg(self) -> str:
        return ",".join(self.etcd_endpoints)

    @property
    def controllers_arg(self) -> str:
        return ",".join(r.grpc for r in self.controllers)


def layout(prefix: str, etcd_members: int = 1, controllers: int = 1) -> ControlLayout:
    if etcd_members not in (1, 3):
        raise ValueError(f"the rig runs 1 or 3 etcd members, not {etcd_members}")
    if not 1 <= controllers <= 5:
        raise ValueError(f"the rig runs 1 to 5 controller replicas, not {controllers}")
    ctl = topology.control(prefix)
    members = tuple(
        EtcdMember(
            name=f"fedgate-{i}",
            process="etcd" if i == 0 else f"etcd-{i}",
            host=ctl.ip,
            client_port=topology.ETCD_PORT + PORT_STEP * i,
            peer_port=topology.ETCD_PORT + 1 + PORT_STEP * i,
        )
        for i in range(etcd_members)
    )
    replicas = tuple(
        Replica(
            process="controller" if i == 0 else f"controller-{i}",
            grpc=f"{ctl.ip}:{topology.CONTROLLER_GRPC_PORT + PORT_STEP * i}",
            admin=f"{ctl.ip}:{topology.CONTROLLER_ADMIN_PORT + PORT_STEP * i}",
        )
        for i in range(controllers)
    )
    return ControlLayout(ctl.netns, members, replicas)


def _path(rigdir: Path) -> Path:
    return rigdir / LAYOUT_FILE


def save(rigdir: Path, plan: ControlLayout) -> None:
    _path(rigdir).write_text(
        json.dumps({"etcd_members": len(plan.etcd), "controllers": len(plan.controllers)}) + "\n"
    )


def load(rigdir: Path, prefix: str) -> ControlLayout:
    """The layout the rig at `rigdir` was brought up with (one member, one replica if unknown)."""
    try:
        data = json.loads(_path(rigdir).read_text())
        return layout(prefix, int(data["etcd_members"]), int(data["controllers"]))
    except (OSError, ValueError, KeyError, TypeError):
        return layout(prefix)


def etcd_argv(etcd: str, rigdir: Path, plan: ControlLayout, member: EtcdMember) -> list[str]:
    cluster = ",".join(f"{m.name}={m.peer_url}" for m in plan.etcd)
    argv = [
        etcd,
        "--name",
        member.name,
        "--data-dir",
        str(lifecycle.etcd_data_dir(rigdir, member.process)),
        "--listen-client-urls",
        f"http://{member.endpoint}",
        "--advertise-client-urls",
        f"http://{member.endpoint}",
        "--listen-peer-urls",
        member.peer_url,
        "--initial-advertise-peer-urls",
        member.peer_url,
        "--initial-cluster",
        cluster,
        "--initial-cluster-state",
        "new",
        "--log-level",
        "warn",
    ]
    if len(plan.etcd) > 1:
        argv += ["--heartbeat-interval", "50", "--election-timeout", "500"]
    return argv


def controller_argv(
    fedgate: Sequence[str],
    plan: ControlLayout,
    replica: Replica,
    ca_dir: Path,
    config_dir: Path,
    config_repo: Path | None = None,
    config_poll: float = 0.5,
) -> list[str]:
    # Every replica follows the repository; only the elected leader applies commits, from its
    # own private clone.
    gitops = (
        [
            "--config-repo",
            str(config_repo),
            "--config-branch",
            "main",
            "--config-poll",
            str(config_poll),
            "--config-workdir",
            str(config_dir.parent / "gitops" / replica.process),
        ]
        if config_repo is not None
        else []
    )
    return [
        *fedgate,
        "controller",
        "--etcd",
        plan.etcd_arg,
        "--listen",
        replica.grpc,
        "--admin",
        replica.admin,
        "--replica",
        replica.process,
        "--leader-ttl",
        "3",
        "--ca-dir",
        str(ca_dir),
        "--config-dir",
        str(config_dir),
        *gitops,
    ]


def start(
    rigdir: Path,
    etcd: str,
    fedgate: Sequence[str],
    plan: ControlLayout,
    ca_dir: Path,
    config_dir: Path,
    config_repo: Path | None = None,
) -> None:
    """Start every etcd member (and wait for their client ports), then every replica."""
    save(rigdir, plan)
    for member in plan.etcd:
        lifecycle.start_process(
            rigdir, member.process, plan.netns, etcd_argv(etcd, rigdir, plan, member)
        )
    for member in plan.etcd:
        wait_tcp(rigdir, plan.netns, member.process, member.host, member.client_port)
    for replica in plan.controllers:
        lifecycle.start_process(
            rigdir,
            replica.process,
            plan.netns,
            controller_argv(fedgate, plan, replica, ca_dir, config_dir, config_repo),
        )


def wait_tcp(rigdir: Path, netns: str, process: str, host: str, port: int) -> None:
    record = lifecycle.load(rigdir).process(process)
    procs.wait_tcp(
        netns,
        host,
        port,
        READY_TIMEOUT,
        log_path=lifecycle.log_path(rigdir, process),
        pid=record.pid if record else None,
    )


def restart(rigdir: Path, process: str) -> None:
    """Start a recorded rig process again with its argv (stopping it first if it still runs)."""
    record = lifecycle.load(rigdir).process(process)
    if record is None:
        raise ValueError(f"no process {process!r} in the rig")
    procs.stop(record.pid, state_file=rigstate.state_file(rigdir))
    lifecycle.start_process(rigdir, process, record.netns, list(record.argv))
