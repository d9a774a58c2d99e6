"""Validation of whole checkouts: every kind of error, named by file, document and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.gitops.convert import parse_retry_on
from federation.gitops.validate import validate_directory, validate_files
from federation.schema import json_schema
from federation.schema_types import parse_duration
from mesh.model import (
    AuthorizationRule,
    AuthzOperation,
    AuthzSource,
    ClusterWeight,
    Fault,
    FaultAbort,
    FaultDelay,
    Mirror,
    StringMatch,
    Subset,
    SubsetWeight,
)
from mesh.naming import ServiceKey
from tests.federation.gitops_fixtures import AUTHZ, FEDERATION, FULL_POLICY, files, policy

SCHEMA_FILE = Path(__file__).parents[2] / "docs" / "schema" / "fedgate.schema.json"


def issues_of(**by_name: str) -> list[str]:
    return [str(i) for i in validate_files(files(**by_name)).issues]


def test_a_valid_checkout_becomes_the_runtime_config() -> None:
    result = validate_files(
        files(
            federation_yaml=FEDERATION,
            policies__echo_yaml=policy(),
            policies__shop_yaml=FULL_POLICY,
            authz_yaml=AUTHZ,
        )
    )
    assert result.ok, result.issues
    assert result.documents == {"Federation": 1, "TrafficPolicy": 2, "AuthorizationPolicy": 1}
    assert result.config is not None
    echo, api = result.config.policies  # sorted by service: demo/echo, shop/api
    assert echo.key == ServiceKey("demo", "echo")
    assert echo.cluster_weights == (ClusterWeight("local", 70), ClusterWeight("remote", 30))
    assert api.subsets == (Subset("v1", (("version", "v1"),)), Subset("v2", (("version", "v2"),)))
    assert api.subset_weights == (SubsetWeight("v1", 90), SubsetWeight("v2", 10))
    assert api.retries is not None
    assert api.retries.attempts == 3
    assert api.retries.per_try_timeout == 0.5
    assert api.retries.retry_on == ("5xx", "reset", "retriable-status-codes")
    assert api.retries.retriable_status_codes == (503,)
    assert api.timeout == 2.5
    assert api.connection_pool is not None
    assert api.connection_pool.http2_max_requests == 1000
    assert api.outlier_detection is not None
    assert api.outlier_detection.base_ejection_time == 60.0
    assert api.fault == Fault(FaultDelay(5.0, 1.5), FaultAbort(1.5, 503))
    assert api.mirror == Mirror("west", "v2", 10.0)
    assert api.locality_failover is not None
    assert api.locality_failover.spill_over_threshold == 60.0
    (canary,) = api.routes
    assert canary.matches[0].headers == (("x-canary", StringMatch("exact", "1")),)
    assert canary.matches[1].uri == StringMatch("prefix", "/beta/")
    assert canary.timeout == 10.0
    (authz,) = result.config.authorization
    assert authz.rules == (
        AuthorizationRule(
            (
                AuthzSource(
                    (
                        "spiffe://east.fedgate.local/ns/demo/sa/client",
                        "spiffe://*.fedgate.local/ns/demo/sa/*",
                    )
                ),
            ),
            (AuthzOperation((8080,)),),
        ),
    )
    assert result.config.federation is not None
    clusters = result.config.federation["spec"]["clusters"]
    assert [c["trustDomain"] for c in clusters] == ["east.fedgate.local", "west.fedgate.local"]


def test_federation_defaults_fill_what_a_policy_leaves_unset() -> None:
    federation = FEDERATION.replace(
        "    transport: quic\n",
        "    transport: quic\n"
        "    trafficPolicy:\n      retries: {attempts: 2}\n      timeout: 3s\n",
    )
    result = validate_files(files(federation_yaml=federation, echo_yaml=policy()))
    assert result.config is not None, result.issues
    (echo,) = result.config.policies
    assert echo.retries is not None
    assert echo.retries.attempts == 2
    assert echo.retries.retry_on == ("connect-failure", "reset", "retriable-status-codes")
    assert echo.timeout == 3.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # bad YAML: the file, the document and the line
        (policy() + "  timeout: [1s\n", "echo.yaml:14: document 1: not valid YAML"),
        # unknown field, with a hint
        (
            policy().replace("  host:", "  retries: {attempts: 1, retryon: 5xx}\n  host:"),
            "echo.yaml:7: document 1: spec.retries.retryon: unknown field (did you mean "
            "'retryOn'?)",
        ),
        # unknown cluster
        (
            policy().replace("cluster: remote", "cluster: north"),
            "echo.yaml:11: document 1: spec.clusterWeights[1].cluster: cluster 'north' is not "
            "declared in the Federation (known: east, west)",
        ),
        # weights that do not add up
        (
            policy(70, 40),
            "echo.yaml:8: document 1: spec.clusterWeights: weights add up to 110; they must add "
            "up to 100",
        ),
        # bad duration
        (
            policy() + "  timeout: 1.5 s\n",
            "echo.yaml:13: document 1: spec.timeout: '1.5 s' is not a duration",
        ),
        (
            policy() + "  timeout: 5\n",
            'echo.yaml:13: document 1: spec.timeout: must be a duration string such as "1.5s"',
        ),
        # duplicate key inside one mapping (PyYAML would keep the last silently)
        (
            policy() + "  host: db.demo.svc.clusterset.local\n",
            "echo.yaml:13: document 1: not valid YAML: key 'host' appears twice (first on line 7)",
        ),
        # a number where a number belongs, but as a string: no coercion
        (
            policy().replace("weight: 70", "weight: '70'"),
            "echo.yaml:10: document 1: spec.clusterWeights[0].weight: Input should be a valid "
            "integer",
        ),
        (
            policy().replace("host: echo.demo", "host: echo.shop"),
            "echo.yaml:7: document 1: spec.host: 'echo.shop.svc.clusterset.local' is not in the "
            "document's namespace 'demo'",
        ),
        (
            policy().replace("kind: TrafficPolicy", "kind: VirtualService"),
            "echo.yaml:2: document 1: kind: unknown kind 'VirtualService' (one of Federation, "
            "TrafficPolicy, AuthorizationPolicy)",
        ),
        (
            policy() + "  retries: {attempts: 2, retryOn: '5xx,teapot'}\n",
            "echo.yaml:13: document 1: spec.retries.retryOn: 'teapot' is not a retry condition",
        ),
    ],
    ids=[
        "bad-yaml",
        "unknown-field",
        "unknown-cluster",
        "weights-sum",
        "bad-duration",
        "duration-not-string",
        "duplicate-key",
        "string-for-int",
        "host-namespace",
        "unknown-kind",
        "retry-on",
    ],
)
def test_each_kind_of_error_names_file_document_field(text: str, expected: str) -> None:
    found = issues_of(federation_yaml=FEDERATION, echo_yaml=text)
    assert any(i.startswith(expected) for i in found), found


def test_duplicate_policy_and_duplicate_name_name_both_places() -> None:
    other = policy().replace("name: echo\n", "name: echo-again\n")
    found = issues_of(
        federation_yaml=FEDERATION, a_yaml=policy(), b_yaml=policy() + "---\n" + other
    )
    assert found == [
        "b.yaml:4: document 1: metadata.name: duplicate name: TrafficPolicy demo/echo is already "
        "defined in a.yaml document 1",
        "b.yaml:7: document 1: spec.host: duplicate policy: echo.demo.svc.clusterset.local "
        "already has a TrafficPolicy in a.yaml document 1",
        "b.yaml:20: document 2: spec.host: duplicate policy: echo.demo.svc.clusterset.local "
        "already has a TrafficPolicy in a.yaml document 1",
    ]


def test_every_error_is_reported_not_just_the_first() -> None:
    bad = FULL_POLICY.replace("subset: v2, weight: 100", "subset: v3, weight: 100")
    bad = bad.replace("mirror: {cluster: west, subset: v2}", "mirror: {cluster: mars}")
    found = issues_of(
        federation_yaml=FEDERATION,
        a_yaml=policy(50, 40),
        b_yaml="kind: [\n",
        c_yaml=bad,
        d_yaml=AUTHZ.replace(
            "east.fedgate.local/ns/demo/sa/client", "mars.fedgate.local/ns/x/sa/y"
        ),
        e_yaml="just a string\n---\n" + policy().replace("name: echo\n", "name: e2\n"),
        f_yaml=policy().replace("host:", "fault: {}\n  host:").replace("echo", "f"),
    )
    assert found == [
        "a.yaml:8: document 1: spec.clusterWeights: weights add up to 90; they must add up to 100",
        "b.yaml:2: document 1: not valid YAML: expected the node content, but found '<stream "
        "end>' (while parsing a flow node)",
        "c.yaml:29: document 1: spec.mirror.cluster: cluster 'mars' is not declared in the "
        "Federation (known: east, west)",
        "c.yaml:36: document 1: spec.routes[0].subsetWeights[0].subset: subset 'v3' is not "
        "declared in spec.subsets",
        "d.yaml:10: document 1: spec.rules[0].from[0].source.principals[0]: trust domain "
        "'mars.fedgate.local' is not the federation's nor one of its clusters' (known: "
        "east.fedgate.local, fedgate.local, west.fedgate.local)",
        "e.yaml:1: document 1: must be a mapping, got str",
        "e.yaml:9: document 2: spec.host: duplicate policy: echo.demo.svc.clusterset.local "
        "already has a TrafficPolicy in a.yaml document 1",
        "f.yaml:7: document 1: spec.fault: a fault needs a delay, an abort or both",
    ]


def test_federation_rules() -> None:
    federation = FEDERATION + (
        "    - name: east\n"
        "      trustDomain: west.fedgate.local\n"
        "      roots: [not a certificate]\n"
        "  links:\n"
        "    - {clusters: [east, north], transport: tls}\n"
        "    - {clusters: [north, east], transport: quic}\n"
        "    - {clusters: [west, west], transport: quic}\n"
    )
    found = issues_of(f_yaml=federation, g_yaml=FEDERATION.replace("name: rig", "name: other"))
    assert found == [
        "f.yaml:14: document 1: spec.clusters[2].name: cluster 'east' is declared twice",
        "f.yaml:15: document 1: spec.clusters[2].trustDomain: trust domain 'west.fedgate.local' "
        "is already cluster 'west''s",
        "f.yaml:16: document 1: spec.clusters[2].roots[0]: is not a PEM X.509 certificate",
        "f.yaml:18: document 1: spec.links[0].clusters[1]: cluster 'north' is not declared in "
        "spec.clusters",
        "f.yaml:19: document 1: spec.links[1].clusters: the link north-east is already "
        "spec.links[0]",
        "f.yaml:19: document 1: spec.links[1].clusters[0]: cluster 'north' is not declared in "
        "spec.clusters",
        "f.yaml:20: document 1: spec.links[2].clusters: a link joins two different clusters, got "
        "'west' twice",
        "g.yaml:2: document 1: kind: a second Federation document (the first is in f.yaml "
        "document 1); a repository holds at most one",
    ]


def test_named_clusters_need_a_federation_document_but_local_and_remote_do_not() -> None:
    assert issues_of(echo_yaml=policy()) == []
    found = issues_of(echo_yaml=policy().replace("cluster: remote", "cluster: west"))
    assert found == [
        "echo.yaml:11: document 1: spec.clusterWeights[1].cluster: cluster 'west' is not "
        "declared: the repository has no Federation document (use local or remote, or declare "
        "the clusters)"
    ]
    # A Federation with errors of its own does not make every reference an error too.
    found = issues_of(
        federation_yaml=FEDERATION.replace("domain:", "domian:"),
        echo_yaml=policy().replace("cluster: remote", "cluster: west"),
    )
    assert found == [
        "federation.yaml:6: document 1: spec.domian: unknown field (did you mean 'domain'?)"
    ]


def test_aliases_are_refused() -> None:
    text = policy().replace("weight: 70", "weight: &w 70").replace("weight: 30", "weight: *w")
    found = issues_of(echo_yaml=text)
    assert found == [
        "echo.yaml:12: document 1: not valid YAML: aliases (*w) are not allowed in fedgate "
        "documents"
    ]


def test_directory_walk_skips_hidden_and_non_yaml_and_refuses_symlinks(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "echo.yml").write_text(policy())
    (tmp_path / ".github").mkdir()
    (tmp_path / ".github" / "ci.yaml").write_text("on: push\n")
    (tmp_path / "README.md").write_text("# config\n")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "policies" / "echo.yml")
    (tmp_path / "latin1.yaml").write_bytes(b"kind: caf\xe9\n")
    result = validate_directory(tmp_path)
    assert [str(i) for i in result.issues] == [
        "latin1.yaml: is not UTF-8 text: invalid continuation byte",
        "link.yaml: is a symbolic link; config files must be regular files",
    ]
    assert result.documents == {"TrafficPolicy": 1}


def test_durations_parse_as_istio_does() -> None:
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("200ms") == pytest.approx(0.2)
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("1h") == 3600.0
    for bad in ("", "5", "1.5 s", "-1s", "1d", "0s", "500us"):
        with pytest.raises(ValueError, match=r"duration|minimum"):
            parse_duration(bad)


def test_retry_on_parses_conditions_and_status_codes() -> None:
    assert parse_retry_on("connect-failure, 503,504") == (
        ("connect-failure", "retriable-status-codes"),
        (503, 504),
    )
    with pytest.raises(ValueError, match=r"outside 100\.\.599"):
        parse_retry_on("5xx,600")


def test_published_json_schema_is_up_to_date() -> None:
    published = json.loads(SCHEMA_FILE.read_text())
    assert published == json_schema(), "run: fedgate config schema --out docs/schema/..."


L7_ON_TCP = """\
apiVersion: fedgate.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: redis-get, namespace: demo}
spec:
  host: redis.demo.svc.clusterset.local
  rules:
    - to:
        - operation: {ports: [8080]}
        - operation: {methods: [GET], paths: ["/x/*"]}
"""


def test_http_fields_on_a_tcp_port_are_rejected_naming_file_and_field() -> None:
    redis = ServiceKey("demo", "redis")
    # Offline (no catalog) the port protocols are unknown: nothing to say.
    assert validate_files(files(authz__redis_yaml=L7_ON_TCP)).ok
    ports = {redis: {6379: "TCP", 8080: "HTTP"}}
    result = validate_files(files(authz__redis_yaml=L7_ON_TCP), ports=ports)
    [issue] = result.issues
    assert issue.file == "authz/redis.yaml"
    assert issue.field == "spec.rules[0].to[1].operation.methods"
    assert "port 6379 of redis.demo.svc.clusterset.local, whose protocol is TCP" in issue.reason
    # Naming only the HTTP port makes the same rule valid.
    only_http = L7_ON_TCP.replace("{methods: [GET]", "{ports: [8080], methods: [GET]")
    assert validate_files(files(authz__redis_yaml=only_http), ports=ports).ok


def test_l7_operation_fields_are_validated() -> None:
    bad = L7_ON_TCP.replace('paths: ["/x/*"]', 'paths: ["/a*b"]').replace("[GET]", "[get]")
    fields = {i.field for i in validate_files(files(a_yaml=bad)).issues}
    assert fields == {
        "spec.rules[0].to[1].operation.methods[0]",
        "spec.rules[0].to[1].operation.paths[0]",
    }


def test_a_control_character_is_an_issue_not_an_exception() -> None:
    # Found by bench/fuzz.py: YAML's reader refuses non-printable characters while the loader
    # is made, which used to escape validation as a ReaderError.
    found = issues_of(federation_yaml=FEDERATION, echo_yaml=policy().replace("demo", "de\x01mo"))
    assert found == [
        "echo.yaml:5: document 1: not valid YAML: character #x0001: special characters are not"
        " allowed",
    ], found


def test_an_integer_of_thousands_of_digits_is_an_issue_not_an_exception() -> None:
    # Found by bench/fuzz.py: Python refuses to convert over 4300 digits (a ValueError).
    found = issues_of(federation_yaml=FEDERATION, echo_yaml=f"weight: {'9' * 5000}\n")
    assert len(found) == 1, found
    assert found[0].startswith("echo.yaml: document 1: not valid YAML: Exceeds the limit"), found
