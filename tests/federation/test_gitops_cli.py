"""`fedgate config validate | diff | status | schema` as an operator runs them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner

from federation.etcd import etcd_client
from federation.gitops.store import CommitRecord, ConfigStore, Rejection
from federation.gitops.validate import validate_directory
from fedgate.cli import main
from tests.etcd_fixture import EtcdServer, reset_etcd
from tests.federation.gitops_fixtures import AUTHZ, FEDERATION, FULL_POLICY, policy


def write_repo(root: Path, **by_name: str) -> Path:
    for name, text in by_name.items():
        path = root / name.replace("__", "/").replace("_yaml", ".yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_validate_prints_every_issue_and_exits_non_zero(tmp_path: Path) -> None:
    repo = write_repo(
        tmp_path,
        federation_yaml=FEDERATION,
        policies__echo_yaml=policy(60, 30),
        policies__api_yaml=FULL_POLICY.replace("timeout: 2.5s", "timeout: soon"),
        policies__dup_yaml=policy().replace("name: echo\n", "name: other\n"),
        broken_yaml="kind: [\n",
    )
    result = CliRunner().invoke(main, ["config", "validate", str(repo)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines == [
        "broken.yaml:2: document 1: not valid YAML: expected the node content, but found "
        "'<stream end>' (while parsing a flow node)",
        "policies/api.yaml:17: document 1: spec.timeout: 'soon' is not a duration: use a number "
        'and a unit (h, m, s, ms, us, ns), e.g. "1.5s", "200ms" or "1m30s"',
        "policies/echo.yaml:7: document 1: spec.host: duplicate policy: "
        "echo.demo.svc.clusterset.local already has a TrafficPolicy in policies/dup.yaml "
        "document 1",
        "policies/echo.yaml:8: document 1: spec.clusterWeights: weights add up to 90; they must "
        "add up to 100",
    ]
    assert "4 issue(s) in 3 file(s)" in result.stderr


def test_validate_accepts_a_good_repository(tmp_path: Path) -> None:
    repo = write_repo(tmp_path, federation_yaml=FEDERATION, echo_yaml=policy(), authz_yaml=AUTHZ)
    result = CliRunner().invoke(main, ["config", "validate", str(repo)])
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "valid: 1 AuthorizationPolicy, 1 Federation, 1 TrafficPolicy in 3 file(s)\n"
    )
    missing = CliRunner().invoke(main, ["config", "validate", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "no such file or directory" in missing.stderr


def test_diff_and_status_against_etcd(tmp_path: Path, etcd_server: EtcdServer) -> None:
    applied = write_repo(tmp_path / "applied", federation_yaml=FEDERATION, echo_yaml=policy())
    config = validate_directory(applied).config
    assert config is not None

    async def seed() -> None:
        async with etcd_client([etcd_server.endpoint]) as client:
            await reset_etcd(client)
            store = ConfigStore(client)
            await store.apply(config, CommitRecord("a" * 40, "main", "seed", "2025-01-01T00:00Z"))
            issue = {"file": "x.yaml", "document": 1, "line": 3, "field": "spec", "reason": "bad"}
            await store.record_rejection(Rejection("b" * 40, "2025-01-02T00:00Z", (issue,), 1))

    asyncio.run(seed())
    endpoint = ["--etcd", etcd_server.endpoint]
    runner = CliRunner()

    same = runner.invoke(main, ["config", "diff", str(applied), *endpoint])
    assert same.exit_code == 0, same.output
    assert same.stdout.splitlines() == [
        f"applied commit {'a' * 40} 'seed' at 2025-01-01T00:00Z",
        "no changes",
    ]

    proposed = write_repo(
        tmp_path / "proposed",
        federation_yaml=FEDERATION,
        echo_yaml=policy(50, 50),
        authz_yaml=AUTHZ,
    )
    changed = runner.invoke(main, ["config", "diff", str(proposed), *endpoint])
    assert changed.exit_code == 1, changed.output
    out = changed.stdout
    assert "+ /fedgate/config/authorization/demo/echo-callers" in out
    assert "~ /fedgate/config/policies/demo/echo" in out
    assert '-      "weight": 70' in out
    assert '+      "weight": 50' in out
    assert out.rstrip().endswith("1 added, 1 changed, 0 removed")

    status = runner.invoke(main, ["config", "status", *endpoint])
    assert status.exit_code == 0, status.output
    assert status.stdout.splitlines() == [
        f"applied: {'a' * 40} 'seed' on main at 2025-01-01T00:00Z",
        "managed keys: 2",
        f"rejected: {'b' * 40} at 2025-01-02T00:00Z, 1 issue(s):",
        "  x.yaml:3: document 1: spec: bad",
    ]


def test_schema_command_prints_the_published_schema() -> None:
    result = CliRunner().invoke(main, ["config", "schema"])
    assert result.exit_code == 0
    published = Path(__file__).parents[2] / "docs" / "schema" / "fedgate.schema.json"
    assert json.loads(result.stdout) == json.loads(published.read_text())
