"""`fedgate inject` on golden manifests: what it writes, that it validates, and what it refuses.

The golden files under fixtures/golden/ are the CLI's output for the fixtures of the same name,
read and checked by hand when they were made; a change to the injected pod shows up here as a
diff to review (regenerate with `fedgate inject --config fixtures/inject.yaml FILE`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from clusters.inject.objects import InjectRefusedError, inject_object
from clusters.inject.spec import INJECTED_ANNOTATION, InjectSettings
from tests.clusters.inject.conftest import (
    FIXTURES,
    GOLDEN,
    INJECTED,
    objects,
    run_inject,
    validate,
)


def _pod_specs(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return obj["spec"]
    return obj["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", [*INJECTED, "opted-out-pod"])
def test_output_is_the_golden_file(name: str) -> None:
    code, out, err = run_inject(str(FIXTURES / f"{name}.yaml"))
    assert code == 0, err
    assert out == (GOLDEN / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", INJECTED)
def test_injected_objects_validate_against_kubernetes_1_30(name: str) -> None:
    injected = [o for o in objects((GOLDEN / f"{name}.yaml").read_text()) if o["kind"] != "Service"]
    assert injected
    for obj in injected:
        validate(obj)
        spec = _pod_specs(obj)
        init = [c["name"] for c in spec["initContainers"]]
        assert init[:2] == ["fedgate-init", "fedgate-proxy"]
        assert spec["volumes"][-1]["name"] == "fedgate-identity"


def test_existing_init_containers_run_after_the_sidecar_and_keep_their_comments() -> None:
    _, out, _ = run_inject(str(FIXTURES / "deployment-with-init.yaml"))
    (deployment,) = objects(out)
    init = deployment["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["fedgate-init", "fedgate-proxy", "migrate"]
    assert "- name: migrate  # schema migrations, before the app\n" in out
    assert out.startswith("# A Deployment that already has an init container")
    assert '"registry.example/payments-migrate:1.4"' in out  # quoting kept


def test_the_sidecar_runs_unprivileged_and_only_the_init_container_has_net_admin() -> None:
    _, out, _ = run_inject(str(FIXTURES / "statefulset.yaml"))
    (sts,) = objects(out)
    spec = sts["spec"]["template"]["spec"]
    init, proxy = spec["initContainers"][:2]
    assert init["securityContext"]["capabilities"] == {
        "add": ["NET_ADMIN", "NET_RAW"],
        "drop": ["ALL"],
    }
    sc = proxy["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (1337, 1337, True)
    assert sc["readOnlyRootFilesystem"]
    assert not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert proxy["restartPolicy"] == "Always"  # a native sidecar: Jobs still complete
    assert proxy["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": 15020,
        "scheme": "HTTP",
    }
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert proxy["resources"]["requests"]
    assert proxy["resources"]["limits"]
    token = spec["volumes"][-1]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "fedgate"
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"} in spec[
        "securityContext"
    ]["sysctls"]


def test_dns_sends_clusterset_names_to_the_sidecar_first() -> None:
    _, out, _ = run_inject(str(FIXTURES / "list.yaml"))
    _, daemonset, job = objects(out)
    ds = daemonset["spec"]["template"]["spec"]
    assert ds["dnsPolicy"] == "None"
    assert ds["dnsConfig"]["nameservers"] == ["127.0.0.1", "10.96.0.10"]
    assert ds["dnsConfig"]["searches"][0] == "demo.svc.cluster.local"
    # A pod that chose its own resolvers keeps them, behind the sidecar.
    assert job["spec"]["template"]["spec"]["dnsConfig"] == {
        "nameservers": ["127.0.0.1", "10.96.0.10"],
        "searches": ["demo.svc.cluster.local"],
    }


@pytest.mark.parametrize(
    ("name", "report"),
    [
        (
            "opted-out-pod",
            "<stdin>: Pod shop/debug: skipped: annotated fedgate.io/inject: disabled",
        ),
        ("already-injected-pod", "<stdin>: Pod demo/client: unchanged: already injected"),
    ],
)
def test_pods_left_alone_come_out_byte_for_byte(name: str, report: str) -> None:
    text = (FIXTURES / f"{name}.yaml").read_text()
    code, out, err = run_inject(stdin=text)  # stdin, no file argument
    assert code == 0, err
    assert out == text
    assert err.splitlines() == [report]


@pytest.mark.parametrize("name", INJECTED)
def test_injecting_twice_is_injecting_once(name: str) -> None:
    golden = (GOLDEN / f"{name}.yaml").read_text()
    code, out, err = run_inject("-", stdin=golden)
    assert code == 0, err
    assert out == golden
    assert "unchanged: already injected" in err


def test_a_host_network_pod_is_refused_naming_the_object() -> None:
    code, out, err = run_inject(str(FIXTURES / "hostnetwork-pod.yaml"))
    assert code == 1
    assert out == ""  # nothing half-injected reaches `kubectl apply`
    assert "Pod monitoring/node-exporter" in err
    assert "hostNetwork" in err


def test_a_host_network_pod_in_a_list_refuses_the_whole_input() -> None:
    text = (FIXTURES / "deployment-with-init.yaml").read_text()
    text += "---\n" + (FIXTURES / "hostnetwork-pod.yaml").read_text()
    code, out, err = run_inject(stdin=text)
    assert (code, out) == (1, "")
    assert "Pod monitoring/node-exporter" in err


def test_a_pod_already_holding_our_container_name_is_refused(settings: InjectSettings) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "odd"},
        "spec": {"containers": [{"name": "fedgate-proxy", "image": "x"}]},
    }
    with pytest.raises(InjectRefusedError, match=r"Pod team/odd: cannot inject: .*fedgate-proxy"):
        inject_object(pod, "team", settings)


def test_the_workload_annotation_opts_out_too(settings: InjectSettings) -> None:
    (deployment,) = objects((FIXTURES / "deployment-with-init.yaml").read_text())
    deployment["metadata"]["annotations"] = {"fedgate.io/inject": "disabled"}
    outcome = inject_object(deployment, "default", settings)
    assert not outcome.changed
    assert outcome.obj == deployment
    assert INJECTED_ANNOTATION not in str(outcome.obj)


def test_the_namespace_flag_names_the_dns_search_path() -> None:
    text = (
        "kind: Pod\napiVersion: v1\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i}]}"
    )
    code, out, err = run_inject("--namespace", "team", stdin=text)
    assert code == 0, err
    (pod,) = objects(out)
    assert pod["spec"]["dnsConfig"]["searches"][0] == "team.svc.cluster.local"
    validate(pod)


def test_missing_settings_are_a_usage_error() -> None:
    from click.testing import CliRunner

    from fedgate.cli import main

    result = CliRunner().invoke(main, ["inject", "--cluster", "east"], input="")
    assert result.exit_code == 2
    assert "controller_address not given" in result.stderr


def test_the_injected_command_lines_are_fedgates_own() -> None:
    """Every flag the containers are started with exists and the required ones are there."""
    import click

    from fedgate.cli import main

    (deployment,) = objects((GOLDEN / "deployment-with-init.yaml").read_text())
    init, proxy = deployment["spec"]["template"]["spec"]["initContainers"][:2]
    env = {"$(POD_NAME)": "payments-7d9f", "$(POD_NAMESPACE)": "shop"}  # the kubelet expands
    parsed = {}
    for container in (init, proxy):
        assert container["command"] == ["fedgate"]
        args = [env.get(a, a) for a in container["args"]]
        group = main
        while isinstance(group, click.Group):  # fedgate capture install / fedgate sidecar
            sub = group.get_command(click.Context(group), args[0])
            assert sub is not None, args[0]
            group, args = sub, args[1:]
        parsed[container["name"]] = group.make_context(group.name or "", args).params
    assert parsed["fedgate-init"]["accept_ports"] == (15020,)
    sidecar = parsed["fedgate-proxy"]
    assert sidecar["no_capture"] is True
    assert sidecar["metrics_listen"] == "0.0.0.0:15020"
    assert (sidecar["pod"], sidecar["namespace"]) == ("payments-7d9f", "shop")
    assert sidecar["identity_dir"].as_posix() == "/var/run/fedgate/identity"
    assert sidecar["controller_address"] == "controller.fedgate.example:15012"


def test_the_identity_volume_has_the_files_the_sidecar_bootstraps_from(tmp_path: Path) -> None:
    """Materialise the projected volume as the kubelet would; `Bootstrap.load` reads it."""
    from ca.authority import CertificateAuthority
    from ca.bootstrap import Bootstrap
    from ca.verify import utcnow

    (deployment,) = objects((GOLDEN / "deployment-with-init.yaml").read_text())
    spec = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "fedgate-identity"]
    token_source, configmap_source = volume["projected"]["sources"]
    ca = CertificateAuthority.create("east.fedgate.test", utcnow())
    configmap = {  # what the fedgate-bootstrap ConfigMap holds
        "ca.pem": ca.root_pem.decode(),
        "control.pem": ca.root_pem.decode(),
        "trust-domain": "east.fedgate.test",
    }
    assert configmap_source["configMap"]["name"] == "fedgate-bootstrap"
    (tmp_path / token_source["serviceAccountToken"]["path"]).write_text("a.jwt.token")
    for item in configmap_source["configMap"]["items"]:
        (tmp_path / item["path"]).write_text(configmap[item["key"]])
    proxy = spec["initContainers"][1]
    (mount,) = proxy["volumeMounts"]
    assert (mount["name"], mount["readOnly"]) == ("fedgate-identity", True)
    assert proxy["args"][proxy["args"].index("--identity-dir") + 1] == mount["mountPath"]
    boot = Bootstrap.load(tmp_path)
    assert boot.token == "a.jwt.token"
    assert boot.trust_domain == "east.fedgate.test"


def test_an_otlp_endpoint_in_the_settings_reaches_the_sidecar(settings: InjectSettings) -> None:
    from dataclasses import replace

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}
    traced = replace(settings, otlp_endpoint="http://otel-collector.observability:4317")
    proxy = inject_object(pod, "demo", traced).obj["spec"]["initContainers"][1]
    assert proxy["args"][-2:] == ["--otlp-endpoint", "http://otel-collector.observability:4317"]
    plain = inject_object(pod, "demo", settings).obj["spec"]["initContainers"][1]
    assert "--otlp-endpoint" not in plain["args"]


def test_several_documents_in_one_stream_stray_separators_dropped() -> None:
    deployment = (FIXTURES / "deployment-with-init.yaml").read_text()
    opted_out = (FIXTURES / "opted-out-pod.yaml").read_text()
    code, out, err = run_inject(stdin=f"---\n{deployment}---\n---\n{opted_out}")
    assert code == 0, err
    kinds = [o["kind"] for o in objects(out)]
    assert kinds == ["Deployment", "Pod"]
    assert "null" not in out
    assert out.endswith(opted_out)  # the opted-out pod, byte for byte


def test_a_cronjob_and_a_replicaset_are_injected_and_validate(settings: InjectSettings) -> None:
    pod_spec = {"restartPolicy": "OnFailure", "containers": [{"name": "c", "image": "i"}]}
    cronjob = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "nightly", "namespace": "ops"},
        "spec": {
            "schedule": "0 3 * * *",
            "jobTemplate": {"spec": {"template": {"spec": pod_spec}}},
        },
    }
    replicaset = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": "rs", "namespace": "ops"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
        },
    }
    for obj, path in ((cronjob, ("jobTemplate", "spec", "template")), (replicaset, ("template",))):
        out = inject_object(obj, "default", settings).obj
        validate(out)
        template = out["spec"]
        for key in path:
            template = template[key]
        assert template["spec"]["initContainers"][1]["name"] == "fedgate-proxy"
        assert template["spec"]["dnsConfig"]["searches"][0] == "ops.svc.cluster.local"
