"""What the traffic-policy e2e modules share: a labelled workload on the rig, and committing a
TrafficPolicy to the GitOps repository the way an operator would, waiting until the east
client's sidecar runs it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from clusters import source
from clusters.rig import bringup, config_repo, control, lifecycle
from federation.gitops.load import SourceFile
from federation.gitops.validate import validate_files
from mesh.codec import policy_to_json
from mesh.model import ServicePort
from tests.e2e.conftest import revive_agents, rig_command

APPLY_WITHIN = 30.0
SUBSETS = """
subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""
Pod = tuple[str, str, str]  # cluster, pod, version label


def pod_netns(rig: Path, cluster: str, pod: str) -> str:
    record = lifecycle.load(rig).pod(cluster, pod)
    assert record is not None
    return record.netns


def run_in_pod(rig: Path, cluster: str, pod: str, argv: list[str], timeout: float) -> str:
    res = subprocess.run(
        ["ip", "netns", "exec", pod_netns(rig, cluster, pod), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def start_workload(
    rig: Path,
    name: str,
    pods: Sequence[Pod],
    workload: Callable[[str, str], list[str]],
    ports: Sequence[ServicePort],
) -> None:
    """`name.demo` served by `workload(cluster, pod)` in `pods`, exported with each pod's
    `version` label; returns once the east client and every pod's sidecar route to it."""
    revive_agents(rig)  # other modules of the session kill agents
    for cluster, pod, _ in pods:
        argv = workload(cluster, pod)
        bringup.add_pod(rig, rig_command(), cluster, pod, "demo", name, argv, None)
    for cluster in sorted({c for c, _, _ in pods}):
        source.add_export(source.exports_path(rig, cluster), "demo", name, list(ports))
    for cluster, pod, version in pods:
        record = lifecycle.load(rig).pod(cluster, pod)
        assert record is not None
        for port in ports:
            control.wait_tcp(rig, record.netns, f"{cluster}-{pod}", "127.0.0.1", port.port)
        path = source.exports_path(rig, cluster)
        labels = {"version": version}
        source.add_endpoint(path, "demo", name, pod, record.ip, name, labels=labels)
    bringup.wait_routes(rig, name, "demo", len(pods))
    # The destination sidecars refuse services they do not know yet: wait for theirs too.
    for cluster, pod, _ in pods:
        deadline = time.monotonic() + APPLY_WITHIN
        while not bringup.endpoints_seen(bringup.sidecar_config(rig, cluster, pod), name, "demo"):
            assert time.monotonic() < deadline, f"{cluster}/{pod}'s sidecar never learnt {name}"
            time.sleep(0.1)


def policy_file(name: str) -> str:
    return f"policies/{name}.yaml"


def apply_policy(rig: Path, name: str, spec: str) -> None:
    """Commit a TrafficPolicy for `name.demo`; return once east/client runs it."""
    host = f"{name}.demo.svc.clusterset.local"
    doc = (
        "apiVersion: fedgate.io/v1alpha1\nkind: TrafficPolicy\n"
        f"metadata: {{name: {name}, namespace: demo}}\nspec:\n  host: {host}\n"
        + "".join(f"  {line}\n" for line in spec.strip("\n").splitlines())
    )
    repo = config_repo.repo_dir(rig)
    federation = (repo / config_repo.FEDERATION_FILE).read_bytes()
    result = validate_files(
        [SourceFile("federation.yaml", federation), SourceFile(policy_file(name), doc.encode())]
    )
    assert result.ok, result.issues
    assert result.config is not None
    [expected] = [policy_to_json(p) for p in result.config.policies]
    config_repo.commit(repo, {policy_file(name): doc}, f"{name}: traffic policy")
    deadline = time.monotonic() + APPLY_WITHIN
    while True:
        snap = bringup.sidecar_config(rig, "east", "client").get("snapshot")
        policies = snap.get("policies", []) if isinstance(snap, dict) else []
        if expected in policies:
            return
        assert time.monotonic() < deadline, f"policy not applied: {policies}"
        time.sleep(0.1)


def remove_policy(rig: Path, name: str) -> None:
    config_repo.commit(config_repo.repo_dir(rig), {policy_file(name): None}, f"{name}: removed")
