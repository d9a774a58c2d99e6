"""`fedgate check`'s Kubernetes checks against the faithful fake API server, driven by the
unmodified `kubernetes` client: SelfSubjectAccessReview per permission, the MCS CRDs, an
unreachable API; and the fake's review and CRD answers have the fixtures' shapes."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fedgate.check_collect import kube_client, kube_facts
from fedgate.check_facts import CRDS, NEEDS, Facts, KubeFacts
from fedgate.checks import FAIL, OK, Result, evaluate
from tests.clusters.kube_rig import api, write_kubeconfig
from tests.helpers import free_port
from tests.kubefake import FakeKubeAPI

__all__ = ["api"]  # fixture: the fake API server
FIXTURES = Path(__file__).resolve().parents[1] / "kubefake" / "fixtures"


@pytest.fixture
def client(api: FakeKubeAPI, tmp_path: Path) -> Iterator[Any]:
    c = kube_client(str(write_kubeconfig(tmp_path / "kubeconfig", api.url)), None)
    yield c
    c.close()


def shape(value: Any) -> Any:
    """Keys and value types, recursively: what a client's decoding depends on."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def call(
    api: FakeKubeAPI, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """A GET, or a POST of `body`, over raw HTTP; the status and the decoded answer."""
    host, port = api.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_reviews_and_crds_have_the_real_shapes(api: FakeKubeAPI) -> None:
    sample = json.loads((FIXTURES / "selfsubjectaccessreview.json").read_text())
    code, got = call(api, "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", sample)
    assert code == 201
    assert shape(got) == shape(sample)
    assert got["status"]["allowed"] is True
    api.deny("patch", "serviceexports", "multicluster.x-k8s.io", "status")
    code, got = call(api, "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", sample)
    assert got["status"] == {"allowed": False}  # RBAC alone never sets `denied`

    crd = json.loads((FIXTURES / "customresourcedefinition.json").read_text())
    code, listed = call(api, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
    assert code == 200
    assert listed["kind"] == "CustomResourceDefinitionList"
    assert [i["metadata"]["name"] for i in listed["items"]] == sorted(CRDS)
    item = {k: v for k, v in crd.items() if k not in ("kind", "apiVersion")}
    assert shape(listed["items"][0]) == shape(item)  # built-in list items: no kind/apiVersion
    code, one = call(api, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRDS[0]}")
    assert code == 200
    assert shape(one) == shape(crd)
    assert one["spec"] == crd["spec"]


def test_a_removed_crd_is_unlisted_and_its_resources_404(api: FakeKubeAPI) -> None:
    api.remove_crd("serviceimports.multicluster.x-k8s.io")
    _, listed = call(api, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
    assert [i["metadata"]["name"] for i in listed["items"]] == [CRDS[0]]
    code, status = call(api, "/apis/multicluster.x-k8s.io/v1alpha1/serviceimports")
    assert (code, status["reason"]) == (404, "NotFound")
    code, status = call(api, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRDS[1]}")
    assert (code, status["reason"]) == (404, "NotFound")


def test_every_needed_permission_is_reviewed_and_both_crds_found(
    api: FakeKubeAPI, client: Any
) -> None:
    facts = kube_facts(client)
    assert facts.error == ""
    assert facts.version == "v1.31.0-kubefake"
    assert [a.need for a in facts.access] == list(NEEDS)
    assert all(a.allowed for a in facts.access)
    assert facts.crds == frozenset(CRDS)
    reviews = [q for q in api.requests if q.path.endswith("/selfsubjectaccessreviews")]
    assert len(reviews) == len(NEEDS)


def test_a_denied_verb_and_a_missing_crd_fail_with_hints(api: FakeKubeAPI, client: Any) -> None:
    api.deny("create", "tokenreviews", "authentication.k8s.io")
    api.deny("watch", "endpointslices", "discovery.k8s.io")
    api.remove_crd("serviceimports.multicluster.x-k8s.io")
    results = [r for r in evaluate_kube(kube_facts(client)) if r.section == "kubernetes"]
    failing = {r.name: r.hint for r in results if r.status == FAIL}
    assert set(failing) == {
        "can create tokenreviews.authentication.k8s.io",
        "can watch endpointslices.discovery.k8s.io",
        "CRD serviceimports.multicluster.x-k8s.io is installed",
    }
    assert all(failing.values())
    assert sum(r.status == OK for r in results) == 1 + len(NEEDS) - 2 + 1


def evaluate_kube(facts: KubeFacts) -> list[Result]:
    return evaluate(Facts(etcd="-", kube=(facts,)), 0.0)


def test_an_unreachable_api_is_one_failure(tmp_path: Path) -> None:
    config = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{free_port()}")
    c = kube_client(str(config), None)
    try:
        facts = kube_facts(c)
    finally:
        c.close()
    assert facts.error
    assert facts.access == ()


def test_the_command_checks_the_api_and_exits_1(api: FakeKubeAPI, tmp_path: Path) -> None:
    """`fedgate check --kubeconfig` end to end, with no etcd: the API lines are there and pass,
    the control plane fails, so the exit status is 1."""
    from fedgate.cli import main

    config = write_kubeconfig(tmp_path / "kubeconfig", api.url)
    etcd = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(
        main, ["check", "--etcd", etcd, "--kubeconfig", str(config), "--timeout", "0.5"]
    )
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[:3] == [
        "kubernetes",
        "----------",
        f"✓ the Kubernetes API at {api.url} is reachable [v1.31.0-kubefake]",
    ]
    assert "✓ can patch serviceexports.multicluster.x-k8s.io/status [allowed]" in lines
    assert f"✗ etcd at {etcd} is reachable" in "\n".join(lines)


def test_one_section_per_context(api: FakeKubeAPI, tmp_path: Path) -> None:
    from fedgate.cli import main

    config = write_kubeconfig(tmp_path / "kubeconfig", api.url)
    etcd = f"127.0.0.1:{free_port()}"
    argv = ["check", "--etcd", etcd, "--kubeconfig", str(config), "--timeout", "0.5"]
    result = CliRunner().invoke(main, [*argv, "--context", "fake", "--context", "nope", "--json"])
    assert result.exit_code == 1, result.output
    results = json.loads(result.output)
    sections = list(dict.fromkeys(r["section"] for r in results))
    assert sections[:3] == ["kubernetes (fake)", "kubernetes (nope)", "control plane"]
    (nope,) = [r for r in results if r["section"] == "kubernetes (nope)"]
    assert nope["status"] == "fail"
    assert "cannot load the credentials" in nope["detail"]
    fake = [r for r in results if r["section"] == "kubernetes (fake)"]
    assert [r["status"] for r in fake] == ["ok"] * (1 + len(NEEDS) + len(CRDS))
