"""`fedgate rig status|exec|run`: thin presentation over clusters/rig."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import click

from clusters import source
from clusters.rig import bringup, lifecycle, procs, restart, supervisor, topology
from clusters.rig.errors import RigError
from clusters.rig.restart import RestartPolicy
from mesh.errors import MeshError
from mesh.model import PROTOCOLS, ServicePort
from mesh.naming import ServiceKey


def _pod(rig_dir: Path, target: str) -> tuple[str, str]:
    cluster, sep, pod = target.partition("/")
    if not sep or not cluster or not pod:
        raise click.ClickException(f"{target!r} is not <cluster>/<pod>")
    return cluster, pod


def up(
    rig_dir: Path,
    command: object,
    count: int,
    transport: str,
    otlp_endpoint: str,
    restarts: tuple[str, float],
    pod_cidr_overlap: bool,
    prefix: str,
) -> None:
    assert isinstance(command, bringup.RigCommand)
    if pod_cidr_overlap and count < 3:
        raise click.ClickException("--pod-cidr-overlap needs --clusters 3 or more (north)")
    try:
        bringup.up(
            rig_dir,
            count,
            replace(command, otlp_endpoint=otlp_endpoint),
            prefix,
            transport=transport,
            restart_policy=RestartPolicy(restarts[0], backoff_max=restarts[1]),
            pod_cidr_overlap=pod_cidr_overlap,
        )
    except (RigError, ValueError) as e:  # ValueError: topology limits (prefix, counts)
        raise click.ClickException(str(e)) from e


def status(rig_dir: Path) -> None:
    try:
        state = lifecycle.load(rig_dir)
    except RigError as e:
        raise click.ClickException(str(e)) from e
    ctl = topology.control(state.prefix)
    click.echo(
        f"control plane  netns {ctl.netns}  etcd {ctl.ip}:{topology.ETCD_PORT}  "
        f"controller {ctl.ip}:{topology.CONTROLLER_GRPC_PORT}"
    )
    for c in state.clusters:
        plan = state.plan(c.name)
        click.echo(
            f"\ncluster {c.name}  netns {plan.netns}  pods {plan.pod_subnet}  "
            f"gateway tunnel {plan.wan_ip}:{topology.TUNNEL_PORT}/udp  "
            f"egress {plan.pod_gateway}:{topology.EGRESS_PORT}"
        )
        for p in state.pods:
            if p.cluster == c.name:
                click.echo(f"  pod {p.name:<16} {p.ip:<12} ns={p.namespace} sa={p.service_account}")
        for x in source.read_exports(source.exports_path(rig_dir, c.name)):
            ports = ",".join(f"{p.port}/{p.protocol}" for p in x.ports)
            eps = ",".join(e.address for e in x.endpoints) or "(no ready endpoints)"
            click.echo(f"  service {x.name}.{x.namespace}.svc.clusterset.local:{ports}  -> {eps}")
    policy = restart.load(rig_dir)
    sup = supervisor.running(rig_dir)
    watch = f"supervisor pid {sup}" if sup else "no supervisor running"
    click.echo(f"\nprocesses (restart policy {policy.policy}, {watch}):")
    for pr in state.processes:
        alive = "up" if procs.owned(pr) else "DOWN"
        click.echo(
            f"  {pr.name:<24} pid {pr.pid:<7} {alive:<5} restarts={pr.restarts:<3} {pr.netns}"
        )


def exec_in(rig_dir: Path, target: str, argv: list[str]) -> int:
    cluster, pod = _pod(rig_dir, target)
    try:
        record = lifecycle.load(rig_dir).pod(cluster, pod)
    except RigError as e:
        raise click.ClickException(str(e)) from e
    if record is None:
        raise click.ClickException(f"no pod {pod!r} in cluster {cluster!r}")
    return subprocess.call(["ip", "netns", "exec", record.netns, *argv])


def parse_export(text: str) -> tuple[str, ServicePort]:
    """`<svc>.<ns>:<port>[/<protocol>]`"""
    name, sep, rest = text.partition(":")
    port_text, _, protocol = rest.partition("/")
    try:
        key = ServiceKey.parse_short(name)
        if not sep or not port_text.isdigit():
            raise ValueError("expected <svc>.<ns>:<port>[/<protocol>]")
        proto = (protocol or "TCP").upper()
        if proto not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        port = ServicePort(proto.lower(), int(port_text), proto)
    except (MeshError, ValueError) as e:
        raise click.ClickException(f"--export {text!r}: {e}") from e
    return f"{key.name}.{key.namespace}", port


def run_pod(
    rig_dir: Path,
    command: bringup.RigCommand,
    target: str,
    export: str | None,
    service_account: str,
    argv: list[str],
) -> None:
    cluster, pod = _pod(rig_dir, target)
    exp = parse_export(export) if export else None
    namespace = exp[0].split(".")[1] if exp else "default"
    try:
        bringup.add_pod(rig_dir, command, cluster, pod, namespace, service_account, argv, exp)
    except RigError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"pod {cluster}/{pod} running" + (f", exported as {export}" if export else ""))
