"""The config-directory loader: the GitOps validation over a directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.errors import PolicyFileError
from federation.policy_file import load_policies
from mesh.model import ClusterWeight, TrafficPolicy
from mesh.naming import ServiceKey

ECHO = """\
apiVersion: fedgate.io/v1alpha1
kind: TrafficPolicy
metadata: {name: echo, namespace: demo}
spec:
  host: echo.demo.svc.clusterset.local
  clusterWeights:
    - {cluster: local, weight: 80}
    - {cluster: remote, weight: 20}
"""

DB = """\
apiVersion: fedgate.io/v1alpha1
kind: TrafficPolicy
metadata: {name: db-west-first, namespace: shop}
spec:
  host: db.shop.svc.clusterset.local
  clusterWeights:
    - {cluster: west, weight: 100}
    - {cluster: east, weight: 0}
"""

FEDERATION = """\
apiVersion: fedgate.io/v1alpha1
kind: Federation
metadata: {name: test}
spec:
  clusters: [{name: east}, {name: west}]
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_loads_every_document_of_every_yaml_file(tmp_path: Path) -> None:
    write(tmp_path, "echo.yaml", ECHO)
    write(tmp_path, "sub/more.yml", DB + "---\n" + FEDERATION + "---\n")
    write(tmp_path, "notes.txt", "not a policy")
    write(tmp_path, ".git/config.yaml", "not: config")
    assert load_policies(tmp_path) == (
        TrafficPolicy(
            ServiceKey("demo", "echo"), (ClusterWeight("local", 80), ClusterWeight("remote", 20))
        ),
        TrafficPolicy(
            ServiceKey("shop", "db"), (ClusterWeight("west", 100), ClusterWeight("east", 0))
        ),
    )


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("weight: 20", "weight: -1", "spec.clusterWeights[1].weight"),
        ("weight: 20", "weight: 2.5", "spec.clusterWeights[1].weight"),
        ("weight: 20", "weight: true", "spec.clusterWeights[1].weight"),
        ("weight: 20", "weight: 30", "spec.clusterWeights"),
        ("cluster: remote", "cluster: Bad_Name", "spec.clusterWeights[1].cluster"),
        ("cluster: remote", "cluster: local", "spec.clusterWeights[1].cluster"),
        ("echo.demo.svc.clusterset.local", "echo.other.svc.clusterset.local", "spec.host"),
        ("echo.demo.svc.clusterset.local", "echo.demo", "spec.host"),
        ("namespace: demo", "namespace: 7", "metadata.namespace"),
        ("fedgate.io/v1alpha1", "fedgate.io/v2", "apiVersion"),
        (
            "  clusterWeights:",
            "  retries: {attempts: 3, bogus: 1}\n  clusterWeights:",
            "spec.retries.bogus",
        ),
    ],
)
def test_errors_name_the_file_and_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    path = write(tmp_path, "echo.yaml", ECHO.replace(old, new))
    with pytest.raises(PolicyFileError) as raised:
        load_policies(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{path}:"), message
    assert f": document 1: {field}: " in message, message


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.yaml", "spec: [unclosed")
    with pytest.raises(PolicyFileError, match=str(path)):
        load_policies(tmp_path)


def test_two_policies_for_one_service_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", ECHO)
    write(tmp_path, "b.yaml", ECHO.replace("name: echo", "name: echo-2"))
    with pytest.raises(PolicyFileError, match=r"b\.yaml.*already has a TrafficPolicy in a\.yaml"):
        load_policies(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="not a directory"):
        load_policies(tmp_path / "nope")
