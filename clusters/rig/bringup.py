"""Bringing a whole rig up: which processes make a federation, in which namespace, with what.

`lifecycle` builds namespaces and runs commands; this module knows the cast: a real etcd and the
controller in the control netns; per cluster its CA roots, agent and gateway; per pod a join
token, a sidecar and a workload. Processes are `fedgate ...` subcommands started by argv (this
package never imports the components it starts), so every rig process is exactly what an
operator would run. It does not decide anything about routing: it writes exports and policies.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ca.authority import CertificateAuthority
from ca.bootstrap import Bootstrap
from ca.verify import utcnow
from clusters import source
from clusters.rig import cmd, lifecycle, procs, topology
from clusters.rig.errors import RigError
from mesh.model import ServicePort
from mesh.naming import DEFAULT_FEDERATION_DOMAIN, SYSTEM_NAMESPACE, trust_domain_for

DEMO_NAMESPACE = "demo"
ECHO_PORT = 8080
LEASE_TTL = 5
READY_TIMEOUT = 60.0

DEFAULT_POLICY = """\
apiVersion: fedgate.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: echo
  namespace: demo
spec:
  host: echo.demo.svc.clusterset.local
  clusterWeights:
    - cluster: local
      weight: 70
    - cluster: remote
      weight: 30
"""


@dataclass(frozen=True, slots=True)
class RigCommand:
    """How to start processes: the `fedgate` command and the etcd binary."""

    fedgate: tuple[str, ...]
    etcd: str


Progress = Callable[[str], None]


def ca_dir(rigdir: Path, name: str) -> Path:
    return rigdir / "ca" / name


def identity_dir(rigdir: Path, cluster: str, pod: str) -> Path:
    return rigdir / "identities" / cluster / pod


def config_dir(rigdir: Path) -> Path:
    return rigdir / "config"


def _addr(hp: tuple[str, int]) -> str:
    return f"{hp[0]}:{hp[1]}"


def _issue_bootstrap(
    rigdir: Path, cluster: str, who: str, namespace: str, service_account: str
) -> Path:
    """A join token granting (namespace, service account), written where only `who` reads it."""
    token = secrets.token_urlsafe(24)
    source.add_token(source.tokens_path(rigdir, cluster), token, namespace, service_account)
    directory = identity_dir(rigdir, cluster, who)
    Bootstrap(
        token=token,
        cluster_root_pem=(ca_dir(rigdir, cluster) / "root.pem").read_bytes(),
        control_root_pem=(ca_dir(rigdir, "control") / "root.pem").read_bytes(),
        trust_domain=trust_domain_for(cluster),
    ).write(directory)
    return directory


def _wait(netns: str, url: str, rigdir: Path, name: str) -> None:
    record = lifecycle.load(rigdir).process(name)
    procs.wait_http_ok(
        netns,
        url,
        READY_TIMEOUT,
        log_path=lifecycle.log_path(rigdir, name),
        pid=record.pid if record else None,
    )


def up(
    rigdir: Path,
    clusters: int,
    command: RigCommand,
    prefix: str = topology.DEFAULT_PREFIX,
    progress: Progress = print,
) -> None:
    """Build the rig and start the whole federation on it; returns once calls can flow."""
    started = time.monotonic()
    state = lifecycle.up(rigdir, clusters, prefix)
    progress(f"namespaces ready for {', '.join(c.name for c in state.clusters)}")
    try:
        _start_control_plane(rigdir, command, state.prefix)
        for c in state.clusters:
            _start_cluster(rigdir, command, state.prefix, c.name, c.index)
        for c in state.clusters:
            add_pod(rigdir, command, c.name, "client", DEMO_NAMESPACE, "client", None, None)
            add_pod(
                rigdir,
                command,
                c.name,
                "echo-1",
                DEMO_NAMESPACE,
                "echo",
                [
                    *command.fedgate,
                    "echo",
                    "--cluster",
                    c.name,
                    "--pod",
                    "echo-1",
                    "--port",
                    str(ECHO_PORT),
                ],
                (f"echo.{DEMO_NAMESPACE}", ServicePort("http", ECHO_PORT, "HTTP")),
                wait=False,
            )
        for c in state.clusters:
            for pod in ("client", "echo-1"):
                wait_pod_ready(rigdir, c.name, pod)
            _wait(
                topology.cluster(state.prefix, c.index).netns,
                f"http://127.0.0.1:{topology.GATEWAY_ADMIN_PORT}/readyz",
                rigdir,
                f"{c.name}-gateway",
            )
        for c in state.clusters:
            _export_ready_pod(rigdir, c.name, "echo-1")
        wait_routes(rigdir, "echo", DEMO_NAMESPACE, len(state.clusters))
    except BaseException:
        progress("rig up failed; logs are in " + str(lifecycle.logs_dir(rigdir)))
        raise
    progress(f"rig up in {time.monotonic() - started:.1f} s")


def _start_control_plane(rigdir: Path, command: RigCommand, prefix: str) -> None:
    ctl = topology.control(prefix)
    now = utcnow()
    CertificateAuthority.create(DEFAULT_FEDERATION_DOMAIN, now).save(ca_dir(rigdir, "control"))
    config_dir(rigdir).mkdir(parents=True, exist_ok=True)
    (config_dir(rigdir) / "echo.yaml").write_text(DEFAULT_POLICY)
    etcd_data = rigdir / "etcd"
    lifecycle.start_process(
        rigdir,
        "etcd",
        ctl.netns,
        [
            command.etcd,
            "--name",
            "fedgate",
            "--data-dir",
            str(etcd_data),
            "--listen-client-urls",
            f"http://{ctl.ip}:{topology.ETCD_PORT}",
            "--advertise-client-urls",
            f"http://{ctl.ip}:{topology.ETCD_PORT}",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "fedgate=http://127.0.0.1:2380",
            "--log-level",
            "warn",
        ],
    )
    record = lifecycle.load(rigdir).process("etcd")
    procs.wait_tcp(
        ctl.netns,
        ctl.ip,
        topology.ETCD_PORT,
        READY_TIMEOUT,
        log_path=lifecycle.log_path(rigdir, "etcd"),
        pid=record.pid if record else None,
    )
    lifecycle.start_process(
        rigdir,
        "controller",
        ctl.netns,
        [
            *command.fedgate,
            "controller",
            "--etcd",
            f"{ctl.ip}:{topology.ETCD_PORT}",
            "--listen",
            f"{ctl.ip}:{topology.CONTROLLER_GRPC_PORT}",
            "--admin",
            f"{ctl.ip}:{topology.CONTROLLER_ADMIN_PORT}",
            "--ca-dir",
            str(ca_dir(rigdir, "control")),
            "--config-dir",
            str(config_dir(rigdir)),
        ],
    )


def _start_cluster(rigdir: Path, command: RigCommand, prefix: str, name: str, index: int) -> None:
    plan = topology.cluster(prefix, index)
    ctl = topology.control(prefix)
    td = trust_domain_for(name)
    CertificateAuthority.create(td, utcnow()).save(ca_dir(rigdir, name))
    lifecycle.start_process(
        rigdir,
        f"{name}-agent",
        plan.netns,
        [
            *command.fedgate,
            "agent",
            "--cluster",
            name,
            "--etcd",
            f"{ctl.ip}:{topology.ETCD_PORT}",
            "--ca-dir",
            str(ca_dir(rigdir, name)),
            "--ca-listen",
            _addr(plan.agent_ca_address),
            "--exports",
            str(source.exports_path(rigdir, name)),
            "--tokens",
            str(source.tokens_path(rigdir, name)),
            "--gateway-tunnel",
            _addr(plan.tunnel_address),
            "--gateway-egress",
            _addr(plan.egress_address),
            "--admin",
            _addr(plan.agent_admin_address),
            "--lease-ttl",
            str(LEASE_TTL),
        ],
    )
    ident = _issue_bootstrap(rigdir, name, "gateway", SYSTEM_NAMESPACE, "gateway")
    lifecycle.start_process(
        rigdir,
        f"{name}-gateway",
        plan.netns,
        [
            *command.fedgate,
            "gateway",
            "--cluster",
            name,
            "--identity-dir",
            str(ident),
            "--ca",
            _addr(plan.agent_ca_address),
            "--controller",
            f"{ctl.ip}:{topology.CONTROLLER_GRPC_PORT}",
            "--tunnel-listen",
            _addr(plan.tunnel_address),
            "--egress-listen",
            _addr(plan.egress_address),
            "--admin",
            _addr(plan.gateway_admin_address),
        ],
    )


def add_pod(
    rigdir: Path,
    command: RigCommand,
    cluster: str,
    pod: str,
    namespace: str,
    service_account: str,
    workload: Sequence[str] | None,
    export: tuple[str, ServicePort] | None,
    wait: bool = True,
) -> None:
    """A pod with its sidecar and optionally a workload; exported once it is ready."""
    state = lifecycle.load(rigdir)
    record = lifecycle.add_pod(rigdir, cluster, pod, namespace, service_account)
    ident = _issue_bootstrap(rigdir, cluster, pod, namespace, service_account)
    plan = next(c for c in state.clusters if c.name == cluster)
    cplan = topology.cluster(state.prefix, plan.index)
    ctl = topology.control(state.prefix)
    lifecycle.start_process(
        rigdir,
        f"{cluster}-{pod}-sidecar",
        record.netns,
        [
            *command.fedgate,
            "sidecar",
            "--cluster",
            cluster,
            "--pod",
            pod,
            "--namespace",
            namespace,
            "--identity-dir",
            str(ident),
            "--ca",
            _addr(cplan.agent_ca_address),
            "--controller",
            f"{ctl.ip}:{topology.CONTROLLER_GRPC_PORT}",
            "--admin",
            f"127.0.0.1:{topology.SIDECAR_ADMIN_PORT}",
        ],
    )
    if workload:
        lifecycle.start_process(rigdir, f"{cluster}-{pod}", record.netns, list(workload))
    if export is not None:
        service, port = export
        svc, _, ns = service.partition(".")
        path = source.exports_path(rigdir, cluster)
        source.add_export(path, ns, svc, [port])
        _pending_exports(rigdir).write_text(
            json.dumps({**_read_pending(rigdir), f"{cluster}/{pod}": [ns, svc, port.port]})
        )
    if wait:
        wait_pod_ready(rigdir, cluster, pod)
        if export is not None:
            _export_ready_pod(rigdir, cluster, pod)


def _pending_exports(rigdir: Path) -> Path:
    return rigdir / "pending-exports.json"


def _read_pending(rigdir: Path) -> dict[str, list[object]]:
    try:
        data: dict[str, list[object]] = json.loads(_pending_exports(rigdir).read_text())
    except FileNotFoundError:
        return {}
    return data


def wait_pod_ready(rigdir: Path, cluster: str, pod: str) -> None:
    """Sidecar ready (identity + config) and, for exported pods, the workload port open."""
    record = lifecycle.load(rigdir).pod(cluster, pod)
    if record is None:
        raise RigError(f"no pod {cluster}/{pod}")
    _wait(
        record.netns,
        f"http://127.0.0.1:{topology.SIDECAR_ADMIN_PORT}/readyz",
        rigdir,
        f"{cluster}-{pod}-sidecar",
    )
    pending = _read_pending(rigdir).get(f"{cluster}/{pod}")
    if pending is not None:
        wl = lifecycle.load(rigdir).process(f"{cluster}-{pod}")
        procs.wait_tcp(
            record.netns,
            "127.0.0.1",
            int(str(pending[2])),
            READY_TIMEOUT,
            log_path=lifecycle.log_path(rigdir, f"{cluster}-{pod}"),
            pid=wl.pid if wl else None,
        )


def _export_ready_pod(rigdir: Path, cluster: str, pod: str) -> None:
    """Publish the pod as an endpoint only once it is ready, as Kubernetes EndpointSlices do."""
    pending = _read_pending(rigdir)
    entry = pending.pop(f"{cluster}/{pod}", None)
    if entry is None:
        return
    record = lifecycle.load(rigdir).pod(cluster, pod)
    assert record is not None
    ns, svc = str(entry[0]), str(entry[1])
    source.add_endpoint(
        source.exports_path(rigdir, cluster), ns, svc, pod, record.ip, record.service_account
    )
    _pending_exports(rigdir).write_text(json.dumps(pending))


def sidecar_config(rigdir: Path, cluster: str, pod: str) -> dict[str, object]:
    """The running config a pod's sidecar reports on its admin port."""
    record = lifecycle.load(rigdir).pod(cluster, pod)
    if record is None:
        raise RigError(f"no pod {cluster}/{pod}")
    out = cmd.run_in(
        record.netns,
        [
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "2",
            f"http://127.0.0.1:{topology.SIDECAR_ADMIN_PORT}/config",
        ],
    )
    data: dict[str, object] = json.loads(out)
    return data


def endpoints_seen(config: dict[str, object], name: str, namespace: str) -> list[dict[str, str]]:
    snap = config.get("snapshot")
    if not isinstance(snap, dict):
        return []
    for svc in snap.get("services", []):
        if svc.get("name") == name and svc.get("namespace") == namespace:
            return list(svc.get("endpoints", []))
    return []


def wait_routes(
    rigdir: Path, name: str, namespace: str, expected: int, timeout: float = READY_TIMEOUT
) -> None:
    """Wait until every client sidecar routes `name.namespace` to `expected` endpoints."""
    state = lifecycle.load(rigdir)
    deadline = time.monotonic() + timeout
    for c in state.clusters:
        while True:
            seen = len(endpoints_seen(sidecar_config(rigdir, c.name, "client"), name, namespace))
            if seen == expected:
                break
            if time.monotonic() > deadline:
                raise RigError(
                    f"{c.name}/client sees {seen} endpoints of {name}.{namespace}, "
                    f"expected {expected} within {timeout:.0f} s"
                )
            time.sleep(0.2)
