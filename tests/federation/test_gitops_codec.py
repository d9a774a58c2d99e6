"""The runtime form of the GitOps documents: JSON codecs (etcd, snapshot) and authorization."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from federation.gitops.validate import validate_files
from mesh import codec
from mesh.authz import authorized
from mesh.errors import CodecError
from mesh.model import (
    AuthorizationPolicy,
    AuthorizationRule,
    AuthzOperation,
    AuthzSource,
    Snapshot,
    principal_matches,
)
from mesh.naming import ServiceKey
from tests.federation.gitops_fixtures import AUTHZ, FEDERATION, FULL_POLICY, files, policy

ECHO = ServiceKey("demo", "echo")
CLIENT = "spiffe://east.fedgate.local/ns/demo/sa/client"


def test_every_policy_field_survives_the_json_codec_and_the_snapshot() -> None:
    result = validate_files(
        files(federation_yaml=FEDERATION, a_yaml=FULL_POLICY, b_yaml=policy(), c_yaml=AUTHZ)
    )
    assert result.config is not None, result.issues
    for p in result.config.policies:
        raw = codec.dumps(codec.policy_to_json(p))
        assert codec.decode(raw, codec.policy_from_json, "policy") == p
    (authz,) = result.config.authorization
    assert codec.authorization_from_json(codec.authorization_to_json(authz)) == authz
    snap = Snapshot(
        "v1", (), (), policies=result.config.policies, authorization=result.config.authorization
    )
    raw = codec.dumps(codec.snapshot_to_json(snap))
    assert codec.decode(raw, codec.snapshot_from_json, "snapshot") == snap


def test_a_weights_only_policy_keeps_its_old_json() -> None:
    result = validate_files(files(a_yaml=policy()))
    assert result.config is not None
    assert codec.policy_to_json(result.config.policies[0]) == {
        "namespace": "demo",
        "name": "echo",
        "clusterWeights": [
            {"cluster": "local", "weight": 70},
            {"cluster": "remote", "weight": 30},
        ],
    }
    # ... and a snapshot without authorization policies has no `authorization` field.
    assert "authorization" not in codec.snapshot_to_json(Snapshot("v", (), ()))


def test_principal_patterns_match_within_one_segment() -> None:
    assert principal_matches("*", CLIENT)
    assert principal_matches(CLIENT, CLIENT)
    assert principal_matches("spiffe://*.fedgate.local/ns/demo/sa/*", CLIENT)
    assert principal_matches("spiffe://east.fedgate.local/ns/*/sa/client", CLIENT)
    assert not principal_matches("spiffe://*.fedgate.local/ns/prod/sa/*", CLIENT)
    # `*` never crosses a `/`, and dots are literal.
    assert not principal_matches("spiffe://*/sa/client", CLIENT)
    assert not principal_matches("spiffe://east.fedgate.local/ns/demo/sa/c.ient", CLIENT)


def test_authorization_follows_istio_semantics() -> None:
    allow = AuthorizationPolicy(
        "callers",
        ECHO,
        "ALLOW",
        (
            AuthorizationRule(
                (AuthzSource(("spiffe://*.fedgate.local/ns/demo/sa/*",)),),
                (AuthzOperation((8080,)),),
            ),
        ),
    )
    deny = AuthorizationPolicy(
        "no-west",
        ECHO,
        "DENY",
        (AuthorizationRule((AuthzSource(("spiffe://west.fedgate.local/ns/demo/sa/*",)),)),),
    )
    west = "spiffe://west.fedgate.local/ns/demo/sa/client"
    other_ns = "spiffe://east.fedgate.local/ns/prod/sa/client"
    assert authorized((), other_ns, 9999)  # no policy: everyone
    assert authorized((allow,), CLIENT, 8080)
    assert not authorized((allow,), CLIENT, 9090)  # port not listed
    assert not authorized((allow,), other_ns, 8080)
    assert authorized((allow,), west, 8080)
    assert not authorized((allow, deny), west, 8080)  # DENY wins
    assert authorized((deny,), CLIENT, 1)  # only DENY policies: the rest is allowed
    assert not authorized((AuthorizationPolicy("none", ECHO, "ALLOW", ()),), CLIENT, 8080)


def test_the_json_before_l7_rules_still_decodes() -> None:
    old = {
        "namespace": "demo",
        "service": "echo",
        "name": "callers",
        "action": "ALLOW",
        "rules": [{"principals": [CLIENT], "ports": [8080]}, {"principals": [], "ports": []}],
    }
    policy = codec.authorization_from_json(old)
    assert policy.rules == (
        AuthorizationRule((AuthzSource((CLIENT,)),), (AuthzOperation((8080,)),)),
        AuthorizationRule(),
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=30,
)
policy_like = st.fixed_dictionaries(
    {"namespace": st.just("demo"), "name": st.just("echo"), "clusterWeights": json_values},
    optional={
        k: json_values
        for k in (
            "subsets",
            "subsetWeights",
            "retries",
            "timeout",
            "fault",
            "mirror",
            "routes",
            "localityFailover",
            "connectionPool",
            "outlierDetection",
        )
    },
)


@settings(deadline=None, max_examples=150)  # timing varies with the machine's load
@given(policy_like)
def test_policy_decoder_raises_only_codec_errors(obj: dict[str, object]) -> None:
    with contextlib.suppress(CodecError):
        codec.decode(codec.dumps(obj), codec.policy_from_json, "policy")


@settings(deadline=None, max_examples=150)
@given(
    st.dictionaries(
        st.sampled_from(["namespace", "service", "name", "action", "rules"]), json_values
    )
)
def test_authorization_decoder_raises_only_codec_errors(obj: dict[str, object]) -> None:
    with contextlib.suppress(CodecError):
        codec.decode(codec.dumps(obj), codec.authorization_from_json, "authorization")
