"""kind-configs/ and `fedgate kind up|down`: the configs' address plan, and the plans the
command would run (Docker and kind cannot run here, so nothing pretends to run them)."""

from __future__ import annotations

import ipaddress
import itertools
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from fedgate import cli, kindplan
from fedgate.manifests.demo import demo
from tests.fedgate.cliparse import parse

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "kind-configs"


def configs() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        out[path.stem] = config
    return out


def test_three_kind_clusters_with_the_intended_address_plan() -> None:
    found = configs()
    assert set(found) == set(kindplan.CLUSTERS) == {"east", "west", "north"}
    for name, config in found.items():
        assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
        assert config["kind"] == "Cluster"
        assert config["name"] == name
    ports = [c["networking"]["apiServerPort"] for c in found.values()]
    assert len(set(ports)) == len(ports), ports
    nets = {
        (name, field): ipaddress.ip_network(c["networking"][field])
        for name, c in found.items()
        for field in ("podSubnet", "serviceSubnet")
    }
    overlaps = {
        frozenset((a, b))
        for (a, na), (b, nb) in itertools.combinations(nets.items(), 2)
        if na.overlaps(nb)
    }
    # Exactly one overlap, on purpose: west's and north's pod subnets (gateways route by name).
    assert overlaps == {frozenset({("west", "podSubnet"), ("north", "podSubnet")})}


def plan() -> list[kindplan.Step]:
    options = kindplan.KindOptions(REPO, Path("/tmp/state"), "fedgate:test", "fedgate")
    return kindplan.up_plan(options)


def test_up_plan_creates_loads_installs_joins_and_calls() -> None:
    steps = plan()
    argvs = [shlex.split(s.command.split(" | ")[0]) for s in steps]
    created = [a[a.index("--config") + 1] for a in argvs if a[:3] == ["kind", "create", "cluster"]]
    assert created == [str(CONFIGS / f"{c}.yaml") for c in ("east", "west", "north")]
    assert all(Path(p).exists() for p in created)
    build = argvs.index(["docker", "build", "-t", "fedgate:test", str(REPO)])
    loads = [i for i, a in enumerate(argvs) if a[:3] == ["kind", "load", "docker-image"]]
    assert len(loads) == 3
    assert build < min(loads)
    installs = [i for i, s in enumerate(steps) if s.what.endswith("install fedgate")]
    assert [steps[i].what.split(":")[0] for i in installs] == ["east", "west", "north"]
    assert max(loads) < installs[0]
    east = steps[installs[0]].command
    assert "--role=management" in east
    assert "--clusters=east,west,north" in east
    for i in installs[1:]:
        assert "--etcd=" in steps[i].command
        assert "--controller=" in steps[i].command
        assert "kubectl --context kind-" in steps[i].command
    # Each cluster's Secrets exist before its install; the etcd users before east's.
    for cluster, i in zip(("east", "west", "north"), installs, strict=True):
        secrets = [
            j
            for j, s in enumerate(steps)
            if s.what.startswith(f"{cluster}: ") and "secret" in s.what
        ]
        assert secrets
        assert max(secrets) < i
    provision = next(i for i, s in enumerate(steps) if s.what == "east: etcd users and roles")
    assert installs[0] < provision < installs[1]
    # Injected pods mount fedgate-bootstrap from their own namespace: created before them.
    for cluster in ("east", "west", "north"):
        whats = [s.what for s in steps]
        roots = whats.index(f"{cluster}: bootstrap roots in demo")
        assert roots < whats.index(f"{cluster}: demo workload")
        assert "-n demo create configmap fedgate-bootstrap" in steps[roots].command
    # The webhook's caBundle is the cluster's own root; kube-dns is its service subnet's .10.
    assert "--ca-bundle=/tmp/state/ca/west/root.pem" in steps[installs[1]].command
    assert "--cluster-dns=10.142.0.10" in steps[installs[1]].command
    calls = [s for s in steps if s.what.startswith("demo call")]
    assert len(calls) == kindplan.DEMO_CALLS
    assert all(kindplan.DEMO_URL in s.command for s in calls)
    last_demo = max(i for i, s in enumerate(steps) if s.what.endswith("demo ready"))
    assert last_demo < steps.index(calls[0])


def test_every_fedgate_command_in_the_plan_parses() -> None:
    """The plan's `fedgate ...` invocations are valid command lines of this CLI."""
    seen = set()
    for step in plan():
        command = step.command
        for cluster in kindplan.CLUSTERS:  # a node's address, known once the cluster exists
            command = command.replace(kindplan.node_ip(cluster), "172.18.0.2")
        for part in command.replace(" || ", " | ").split(" | "):
            argv = shlex.split(part)
            if argv[0] != "fedgate":
                continue
            seen.add(parse(argv[1:]).command.name or "")
    assert {"init", "manifests", "demo"} <= seen
    inits = [s.command for s in plan() if " ca init " in s.command]
    domains = {shlex.split(c)[shlex.split(c).index("--trust-domain") + 1] for c in inits}
    # The controllers' identity lives in the federation's domain (mesh.naming).
    assert domains == {
        "east.fedgate.local",
        "west.fedgate.local",
        "north.fedgate.local",
        "fedgate.local",
    }


def test_demo_manifests_validate_and_export_echo() -> None:
    objects = demo("west", serve=True, call=False) + demo("east", serve=False, call=True)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("ServiceExport", "echo") in kinds
    assert ("Deployment", "client") in kinds
    ns = next(o for o in objects if o["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["fedgate.io/inject"] == "enabled"
    for o in objects:
        if o["apiVersion"].startswith("multicluster"):
            continue  # checked against the CRD schema in test_manifests
        kubernetes_validate.validate(o, "1.30", strict=True)
        for c in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            # The sidecar's UID is exempt from capture: the app must not run as it.
            assert c["securityContext"]["runAsUser"] != 1337


def test_down_plan_deletes_every_cluster_and_the_state() -> None:
    options = kindplan.KindOptions(REPO, Path("/tmp/state"), "fedgate:test", "fedgate")
    commands = [s.command for s in kindplan.down_plan(options)]
    assert commands == [
        "kind delete cluster --name east",
        "kind delete cluster --name west",
        "kind delete cluster --name north",
        "rm -rf /tmp/state",
    ]


def test_missing_tools_fail_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kindplan.missing_tools(lambda tool: None if tool in ("kind", "docker") else "/x") == [
        "docker",
        "kind",
    ]
    monkeypatch.setenv("PATH", "/nonexistent")
    result = CliRunner().invoke(cli.main, ["kind", "up"])
    assert result.exit_code == 1
    assert "fedgate kind needs docker, kind, kubectl, openssl on PATH" in result.output
    dry = CliRunner().invoke(cli.main, ["kind", "down", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "kind delete cluster --name north" in dry.output


CA_DIR_FILES = {"root.pem", "root.key", "trust-domain"}  # a fresh `fedgate ca init` directory


def created(cluster: str) -> dict[tuple[str, str], set[str]]:
    """(kind, name) -> keys, of the Secrets and ConfigMaps the plan creates in `cluster`."""
    out: dict[tuple[str, str], set[str]] = {}
    for step in plan():
        argv = shlex.split(step.command.split(" | ")[0])
        if argv[:3] != ["kubectl", "--context", kindplan.context(cluster)] or "create" not in argv:
            continue
        rest = argv[argv.index("create") + 1 :]
        if rest[0] == "secret":
            kind, name = "Secret", rest[2]
        elif rest[0] == "configmap":
            kind, name = "ConfigMap", rest[1]
        else:
            continue
        keys = set()
        for arg in rest:
            if arg.startswith("--from-file="):
                key, sep, _ = arg.removeprefix("--from-file=").partition("=")
                # A directory: one key per file (the etcd users: one per user).
                keys |= {key} if sep else {f"<each file of {key}>"}
        out[(kind, name)] = keys
    return out


def needed(cluster: str) -> dict[tuple[str, str], set[str]]:
    """(kind, name) -> keys the rendered install of `cluster` mounts."""
    from fedgate.manifests.render import render
    from fedgate.manifests.settings import ManifestSettings

    management = cluster == kindplan.MANAGEMENT
    settings = ManifestSettings(
        cluster=cluster,
        gateway_address="172.18.0.2:31443",
        role="management" if management else "member",
        etcd="" if management else "172.18.0.3:32379",
        controller="" if management else "172.18.0.3:31012",
        gateway_service="NodePort",
        clusters=kindplan.CLUSTERS if management else (),
    )
    out: dict[tuple[str, str], set[str]] = {}
    for o in render(settings):
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        args = " ".join(a for c in spec.get("containers", []) for a in c.get("args", []))
        mounts = {
            m["name"]: m["mountPath"]
            for c in spec.get("containers", [])
            for m in c.get("volumeMounts", [])
        }
        for volume in spec.get("volumes", []):
            sources = volume.get("projected", {}).get("sources", [])
            if "secret" in volume:
                sources = [{"secret": {"name": volume["secret"]["secretName"], **volume["secret"]}}]
            for source in sources:
                for kind, field in (("Secret", "secret"), ("ConfigMap", "configMap")):
                    if field not in source:
                        continue
                    ref = source[field]
                    keys = {i["key"] for i in ref.get("items", [])}
                    if not keys:  # the whole object: the files the container reads in it
                        path = mounts[volume["name"]]
                        keys = {a.split(path + "/", 1)[1] for a in args.split() if path + "/" in a}
                        if f"--ca-dir={path}" in args.split():
                            keys = CA_DIR_FILES
                    out.setdefault((kind, ref["name"]), set()).update(keys)
    return out


@pytest.mark.parametrize("cluster", kindplan.CLUSTERS)
def test_the_plan_creates_every_secret_and_key_the_install_mounts(cluster: str) -> None:
    have, want = created(cluster), needed(cluster)
    assert want, "the install mounts nothing?"
    for ref, keys in want.items():
        assert ref in have, f"{cluster}: {ref} is mounted but never created"
        if ref == ("Secret", "fedgate-etcd-users"):
            # One file per etcd user, whose names are the keys the pods read.
            assert keys <= set(kindplan.ETCD_USERS), keys
            continue
        assert keys <= have[ref], f"{cluster}: {ref} lacks {keys - have[ref]}"
