"""`fedgate manifests`: every rendered object validates against Kubernetes 1.30's schemas (and
the newest kubernetes-validate ships), custom resources against the vendored MCS CRDs, and the
containers' command lines parse with the real `fedgate` CLI."""

from __future__ import annotations

import base64
import copy
import functools
import itertools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from clusters.kube import mcs
from fedgate import check_facts, cli, inject_config
from fedgate.manifests import rbac as rbac_mod
from fedgate.manifests.render import render, to_yaml
from fedgate.manifests.settings import ManifestError, ManifestSettings
from mesh.model import Condition, MergedService, ServicePort
from mesh.naming import ServiceKey
from tests.fedgate.cliparse import parse

FIXTURES = Path(__file__).parents[1] / "kubefake" / "fixtures"
VERSIONS = ("1.30", kubernetes_validate.utils.major_minor(kubernetes_validate.latest_version()))
ROLES = ("member", "management")
SERVICE_TYPES = ("LoadBalancer", "NodePort")
TRANSPORTS = ("tls", "quic", "passthrough")


def settings(role: str = "member", service: str = "LoadBalancer", **kw: Any) -> ManifestSettings:
    base: dict[str, Any] = {
        "cluster": "east",
        "gateway_address": "203.0.113.10:15443",
        "role": role,
        "gateway_service": service,
    }
    if role == "member":
        base |= {"etcd": "203.0.113.1:2379", "controller": "203.0.113.1:15012"}
    else:
        base["clusters"] = ("west", "north")
    return ManifestSettings(**(base | kw))


def rendered(role: str, service: str, transport: str = "tls") -> list[dict[str, Any]]:
    return copy.deepcopy(_rendered(role, service, transport))


@functools.cache
def _rendered(role: str, service: str, transport: str) -> list[dict[str, Any]]:
    # Through YAML and back: what `kubectl apply` would read.
    text = to_yaml(render(settings(role, service, transport=transport)))
    return list(yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def test_every_object_validates_strictly() -> None:
    """Each role x each gateway Service type x each transport; an object common to several
    renders is validated once."""
    unique: dict[str, tuple[str, dict[str, Any]]] = {}
    for role, service, transport in itertools.product(ROLES, SERVICE_TYPES, TRANSPORTS):
        for obj in rendered(role, service, transport):
            unique.setdefault(json.dumps(obj, sort_keys=True), (f"{role}/{service}", obj))
    kinds = {obj["kind"] for _, obj in unique.values()}
    assert {"CustomResourceDefinition", "Deployment", "StatefulSet", "Job", "Service"} <= kinds
    for version, (where, obj) in itertools.product(VERSIONS, unique.values()):
        try:
            checked = kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            name = f"{obj['kind']}/{obj['metadata']['name']}"
            pytest.fail(f"{where}: {name} ({version}): {path}: {e.message}")
        assert checked == version


def test_a_broken_object_is_caught() -> None:
    """The validation is live: an unknown field and a wrong type are rejected."""
    deployment = next(o for o in rendered("member", "LoadBalancer") if o["kind"] == "Deployment")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30", strict=True)
    deployment["spec"]["replicas"] = 2
    deployment["spec"]["template"]["spec"]["containers"][0]["argz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30", strict=True)


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def crd_schema(kind: str) -> dict[str, Any]:
    crds = by_kind(rendered("member", "LoadBalancer"), "CustomResourceDefinition")
    crd = next(c for c in crds.values() if c["spec"]["names"]["kind"] == kind)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert version["served"]
    assert version["storage"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def test_crds_are_upstreams_mcs_api() -> None:
    crds = by_kind(rendered("member", "LoadBalancer"), "CustomResourceDefinition")
    assert set(crds) == {
        "serviceexports.multicluster.x-k8s.io",
        "serviceimports.multicluster.x-k8s.io",
    }
    for crd in crds.values():
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["spec"]["group"] == "multicluster.x-k8s.io"
        assert crd["spec"]["scope"] == "Namespaced"
        assert crd["metadata"]["labels"]["multicluster.x-k8s.io/release-version"] == "v0.4.1"
        assert [v["name"] for v in crd["spec"]["versions"]] == ["v1alpha1"]
    imports = crd_schema("ServiceImport")["properties"]
    assert imports["spec"]["required"] == ["ports", "type"]
    assert imports["spec"]["properties"]["type"]["enum"] == ["ClusterSetIP", "Headless"]
    assert "clusters" in imports["status"]["properties"]


def merged() -> MergedService:
    ports = (ServicePort("http", 8080, "HTTP"), ServicePort("grpc", 9090, "GRPC"))
    return MergedService(
        ServiceKey("shop", "payments"),
        "10.255.0.7",
        ports,
        ("east", "west"),
        (),
        (Condition("Conflict", True, "PortConflict", "port 'http' differs"),),
    )


def custom_resources() -> list[dict[str, Any]]:
    """What the agent writes (clusters/kube/mcs.py) and the fake API server's samples."""
    service = merged()
    export = json.loads((FIXTURES / "serviceexport.json").read_text())
    written = [
        mcs.service_import(service),
        mcs.import_status(service),
        mcs.export_status(export, service, "2026-12-06T10:00:00Z"),
        mcs.export_status(export, "no Service shop/payments", "2026-12-06T10:00:00Z"),
    ]
    samples = [json.loads((FIXTURES / f"{n}.json").read_text()) for n in ("serviceimport",)]
    return [*written, export, *samples]


def test_what_the_agent_writes_fits_the_crd_schemas() -> None:
    for resource in custom_resources():
        jsonschema.Draft202012Validator(crd_schema(resource["kind"])).validate(resource)
    bad = mcs.service_import(merged())
    bad["spec"]["type"] = "LoadBalancer"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(crd_schema("ServiceImport")).validate(bad)


def containers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            for c in o["spec"]["template"]["spec"]["containers"]:
                out[o["metadata"]["name"]] = c
    return out


@pytest.mark.parametrize(("role", "transport"), list(itertools.product(ROLES, TRANSPORTS)))
def test_container_args_parse_with_the_real_cli(role: str, transport: str) -> None:
    """Every fedgate container's args are a valid `fedgate` command line (options exist,
    required ones are given, choices are allowed)."""
    parsed = []
    for name, container in containers(rendered(role, "LoadBalancer", transport)).items():
        if container["image"] != settings().image:
            continue  # etcd
        ctx = parse(container["args"], name)  # raises on any bad or missing option
        parsed.append(ctx.info_name)
        assert ctx.params.get("cluster", "east") == "east"
    expected = {"fedgate-agent", "fedgate-gateway"}
    if role == "management":
        expected |= {"fedgate-controller", "fedgate-etcd-provision"}
    assert set(parsed) == expected


def pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    }


@pytest.mark.parametrize(("role", "service"), list(itertools.product(ROLES, SERVICE_TYPES)))
def test_services_probes_and_budgets_point_at_real_ports(role: str, service: str) -> None:
    objects = rendered(role, service)
    templates = pods(objects)
    for svc in by_kind(objects, "Service").values():
        targets = [
            t
            for t in templates.values()
            if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, svc["metadata"]["name"]
        offered = {
            (p["containerPort"], p["protocol"])
            for c in targets[0]["spec"]["containers"]
            for p in c["ports"]
        }
        for p in svc["spec"]["ports"]:
            assert (p["targetPort"], p["protocol"]) in offered, (svc["metadata"]["name"], p)
            assert ("nodePort" in p) == (svc["spec"]["type"] == "NodePort" and p["port"] != 15020)
    for name, template in templates.items():
        for c in template["spec"]["containers"]:
            ports = {p["containerPort"] for p in c["ports"]}
            probes = ["livenessProbe", "readinessProbe"]
            # fedgate's proxies wait for an identity before opening their admin port.
            probes += ["startupProbe"] if c["image"] == settings().image else []
            for probe in probes:
                assert c[probe]["httpGet"]["port"] in ports, (name, probe)
    for budget in by_kind(objects, "PodDisruptionBudget").values():
        (target,) = [
            o
            for o in objects
            if o["kind"] in ("Deployment", "StatefulSet")
            and o["spec"]["selector"] == budget["spec"]["selector"]
        ]
        assert budget["spec"]["minAvailable"] < target["spec"]["replicas"]


def test_gateway_service_carries_tcp_and_udp_tunnels() -> None:
    for service_type in SERVICE_TYPES:
        svc = by_kind(rendered("member", service_type), "Service")["fedgate-gateway"]
        assert svc["spec"]["type"] == service_type
        tunnels = {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]}
        assert {(15443, "TCP"), (15443, "UDP")} <= tunnels
        assert 15008 not in {p["port"] for p in svc["spec"]["ports"]}  # egress stays inside
    gw = by_kind(rendered("member", "LoadBalancer"), "Deployment")["fedgate-gateway"]
    assert gw["spec"]["replicas"] == 2
    assert "podAntiAffinity" in gw["spec"]["template"]["spec"]["affinity"]


def test_management_runs_controller_and_a_three_member_tls_etcd() -> None:
    member_kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered("member", "NodePort")}
    objects = rendered("management", "NodePort")
    assert ("StatefulSet", "fedgate-etcd") not in member_kinds
    etcd = by_kind(objects, "StatefulSet")["fedgate-etcd"]
    assert etcd["spec"]["replicas"] == 3
    args = etcd["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peer-client-cert-auth=true" in args
    assert all(
        u.split("=", 1)[1].startswith("https://")
        for u in args
        if "-urls=" in u and "metrics" not in u
    )
    initial = next(a for a in args if a.startswith("--initial-cluster="))
    assert initial.count("https://") == 3
    assert by_kind(objects, "Deployment")["fedgate-controller"]["spec"]["replicas"] == 2
    job = containers(objects)["fedgate-etcd-provision"]
    assert "--clusters=east,west,north" in job["args"]
    agent = containers(objects)["fedgate-agent"]["args"]
    assert "--etcd-user=agent-east" in agent  # its own etcd role (federation/etcd_auth.py)


def test_agent_rbac_is_exactly_what_check_asks_for() -> None:
    """The ClusterRole grants what `fedgate check` verifies, plus check's own two needs."""
    role = by_kind(rendered("member", "LoadBalancer"), "ClusterRole")["fedgate-agent"]
    granted = {
        (verb, group, res)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for res in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {
        (n.verb, n.group, n.resource + (f"/{n.subresource}" if n.subresource else ""))
        for n in check_facts.NEEDS
    }
    extra = {
        ("create", "authorization.k8s.io", "selfsubjectaccessreviews"),
        ("list", "apiextensions.k8s.io", "customresourcedefinitions"),
    }
    assert granted == needed | extra
    assert all("*" not in json.dumps(rule) for rule in rbac_mod.AGENT_RULES)
    bindings = by_kind(rendered("management", "LoadBalancer"), "ClusterRoleBinding")
    assert [s["name"] for b in bindings.values() for s in b["subjects"]] == ["fedgate-agent"]


def test_only_the_agent_mounts_an_api_token() -> None:
    objects = rendered("management", "LoadBalancer")
    mounted = {
        name for name, t in pods(objects).items() if t["spec"]["automountServiceAccountToken"]
    }
    assert mounted == {"fedgate-agent"}
    for template in pods(objects).values():
        for c in template["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"gateway_service": "ClusterIP"}, "--gateway-service"),
        ({"gateway_address": "nohost"}, "--gateway-address"),
        ({"etcd": ""}, "--etcd"),
        ({"cluster": "East_1"}, "cluster name"),
        ({"transport": "udp"}, "--transport"),
    ],
)
def test_bad_settings_are_refused_with_the_option_named(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        settings(**kw)


def test_cli_renders_yaml() -> None:
    result = CliRunner().invoke(
        cli.main,
        [
            "manifests",
            "--cluster=west",
            "--gateway-address=198.51.100.7:31443",
            "--gateway-service=NodePort",
            "--etcd=198.51.100.1:32379",
            "--controller=198.51.100.1:31012",
            "--image=fedgate:test",
        ],
    )
    assert result.exit_code == 0, result.output
    objects = list(yaml.safe_load_all(result.output))
    assert {c["image"] for c in containers(objects).values()} == {"fedgate:test"}
    bad = CliRunner().invoke(cli.main, ["manifests", "--cluster=west", "--gateway-address=x:1"])
    assert bad.exit_code != 0
    assert "--etcd" in bad.output


@pytest.mark.parametrize("name", ["east-management.yaml", "west-member.yaml"])
def test_the_examples_in_deploy_are_current(name: str) -> None:
    """deploy/examples/ holds what the commands in their headers print, byte for byte."""
    path = Path(__file__).parents[2] / "deploy" / "examples" / name
    header, body = [], []
    for line in path.read_text().splitlines(keepends=True):
        (header if line.startswith("#") and not body else body).append(line)
    command = header[-1].lstrip("# ").split(" > ")[0].split()
    assert command[0] == "fedgate"
    result = CliRunner().invoke(cli.main, command[1:])
    assert result.exit_code == 0, result.output
    assert result.output == "".join(body), f"regenerate: {' '.join(command)} > {path}"


def test_the_injection_webhook_is_wired_to_the_agent(tmp_path: Path) -> None:
    """The MutatingWebhookConfiguration (the injector's own function) calls the agent through
    the Service its certificate names, and the agent reads the injector settings rendered for
    this cluster."""
    bundle = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    objects = list(
        yaml.safe_load_all(to_yaml(render(settings(ca_bundle=bundle, cluster_dns="10.142.0.10"))))
    )
    (config,) = by_kind(objects, "MutatingWebhookConfiguration").values()
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["namespaceSelector"] == {"matchLabels": {"fedgate.io/inject": "enabled"}}
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == bundle
    target = hook["clientConfig"]["service"]
    svc = by_kind(objects, "Service")[target["name"]]
    assert target["namespace"] == svc["metadata"]["namespace"] == "fedgate-system"
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == target["port"]]
    agent = containers(objects)["fedgate-agent"]
    flags = dict(a.split("=", 1) for a in agent["args"][1:])
    assert flags["--webhook-service"] == f"{target['name']}.{target['namespace']}"
    assert flags["--webhook-listen"].endswith(f":{svc_port['targetPort']}")
    # The settings file the agent reads is the ConfigMap mounted where --inject-config points.
    path = Path(flags["--inject-config"])
    (mount,) = [m for m in agent["volumeMounts"] if m["mountPath"] == str(path.parent)]
    deployment = by_kind(objects, "Deployment")["fedgate-agent"]
    (volume,) = [
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    data = by_kind(objects, "ConfigMap")[volume["configMap"]["name"]]["data"][path.name]
    (tmp_path / path.name).write_text(data)
    inject = inject_config.load(tmp_path / path.name)
    assert (inject.cluster, inject.controller_address) == ("east", "203.0.113.1:15012")
    assert inject.cluster_dns == "10.142.0.10"
    assert inject.image == settings().image
    # Without a bundle, caBundle is left to the installer.
    (bare,) = by_kind(rendered("member", "LoadBalancer"), "MutatingWebhookConfiguration").values()
    assert "caBundle" not in bare["webhooks"][0]["clientConfig"]


def test_the_podmonitors_select_the_control_plane_and_its_admin_ports() -> None:
    """deploy/monitoring's PodMonitor scrapes a port named `admin` on pods labelled as the
    manifests label them: each fedgate Deployment's pods match, and serve /metrics there."""
    path = Path(__file__).parents[2] / "deploy" / "monitoring" / "podmonitors.yaml"
    monitors = {m["metadata"]["name"]: m for m in yaml.safe_load_all(path.read_text()) if m}
    monitor = monitors["fedgate-control-plane"]
    (expression,) = monitor["spec"]["selector"]["matchExpressions"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for name, template in pods(rendered("management", "LoadBalancer")).items():
        container = template["spec"]["containers"][0]
        if container["image"] != settings().image:
            continue  # etcd: its own metrics port, not fedgate's
        value = template["metadata"]["labels"][expression["key"]]
        assert value in expression["values"], name
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert endpoint["port"] in named, name
        assert named[endpoint["port"]] == container["livenessProbe"]["httpGet"]["port"]
