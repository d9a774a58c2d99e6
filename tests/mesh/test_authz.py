"""Authorization decisions (mesh.authz): Istio's precedence, L7 fields, paths, fail-closed TCP."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.authz import (
    AuthzRequest,
    authorize,
    needs_http,
    normalize_path,
    path_matches,
)
from mesh.model import AuthorizationPolicy, AuthorizationRule, AuthzOperation, AuthzSource
from mesh.naming import ServiceKey

ECHO = ServiceKey("demo", "echo")
EAST = "spiffe://east.fedgate.local/ns/demo/sa/client"
WEST = "spiffe://west.fedgate.local/ns/demo/sa/client"


def policy(name: str, action: str, *rules: AuthorizationRule) -> AuthorizationPolicy:
    return AuthorizationPolicy(name, ECHO, action, tuple(rules))


def rule(
    principals: tuple[str, ...] = (), not_principals: tuple[str, ...] = (), **op: tuple[object, ...]
) -> AuthorizationRule:
    sources = (AuthzSource(principals, not_principals),) if principals or not_principals else ()
    operations = (AuthzOperation(**op),) if op else ()  # type: ignore[arg-type]
    return AuthorizationRule(sources, operations)


def http(principal: str, method: str, path: str, port: int = 8080) -> AuthzRequest:
    return AuthzRequest(principal, port, method, path)


def test_no_policy_admits_everyone_and_deny_wins() -> None:
    assert authorize((), AuthzRequest(EAST, 1)).allowed
    allow = policy("west-only", "ALLOW", rule((WEST,)))
    deny = policy("no-west", "DENY", rule((WEST,)))
    assert not authorize((allow,), AuthzRequest(EAST, 8080)).allowed
    assert authorize((allow,), AuthzRequest(WEST, 8080)).reason == (
        "allowed by authorization policy demo/west-only"
    )
    both = authorize((allow, deny), AuthzRequest(WEST, 8080))
    assert (both.allowed, both.reason, both.policy) == (
        False,
        "denied by authorization policy demo/no-west",
        "demo/no-west",
    )
    assert authorize((allow,), AuthzRequest(EAST, 8080)).reason == "no ALLOW policy matched"
    assert not authorize((policy("empty", "ALLOW"),), AuthzRequest(WEST, 1)).allowed


def test_l7_fields_methods_paths_and_their_negations() -> None:
    p = policy(
        "api",
        "ALLOW",
        rule(
            (EAST,), methods=("GET",), paths=("/api/*", "*.html", "/exact"), not_paths=("/api/x",)
        ),
    )
    assert authorize((p,), http(EAST, "GET", "/api/v1?q=1")).allowed
    assert authorize((p,), http(EAST, "GET", "/index.html")).allowed
    assert authorize((p,), http(EAST, "GET", "/exact")).allowed
    assert not authorize((p,), http(EAST, "GET", "/exact/more")).allowed
    assert not authorize((p,), http(EAST, "POST", "/api/v1")).allowed
    assert not authorize((p,), http(EAST, "GET", "/api/x")).allowed
    assert not authorize((p,), http(WEST, "GET", "/api/v1")).allowed
    not_west = policy("not-west", "ALLOW", rule(not_principals=(WEST,), not_ports=(9090,)))
    assert authorize((not_west,), AuthzRequest(EAST, 8080)).allowed
    assert not authorize((not_west,), AuthzRequest(EAST, 9090)).allowed
    assert not authorize((not_west,), AuthzRequest(WEST, 8080)).allowed


def test_a_rule_is_any_from_and_any_to_with_every_field_inside() -> None:
    r = AuthorizationRule(
        (AuthzSource((EAST,)), AuthzSource((WEST,))),
        (AuthzOperation(ports=(8080,), methods=("GET",)), AuthzOperation(ports=(9090,))),
    )
    p = policy("p", "ALLOW", r)
    assert authorize((p,), http(WEST, "GET", "/", 8080)).allowed
    assert authorize((p,), http(EAST, "POST", "/", 9090)).allowed
    # Not flattened: POST on 8080 matches neither operation.
    assert not authorize((p,), http(EAST, "POST", "/", 8080)).allowed


def test_http_fields_on_a_tcp_call_fail_closed() -> None:
    allow = policy("get-only", "ALLOW", rule((EAST,), methods=("GET",)))
    deny = policy("no-admin", "DENY", rule((EAST,), paths=("/admin",)))
    tcp = AuthzRequest(EAST, 6379)
    # An ALLOW rule that needs HTTP admits nobody over TCP ...
    assert not authorize((allow,), tcp).allowed
    # ... and a DENY rule is judged on its other fields: it refuses.
    assert authorize((deny,), tcp).reason == "denied by authorization policy demo/no-admin"
    assert authorize((deny,), AuthzRequest(WEST, 6379)).allowed
    assert needs_http((allow,))
    assert not needs_http((policy("l4", "ALLOW", rule((EAST,), ports=(1,))),))


def test_paths_are_normalised_before_matching() -> None:
    assert normalize_path("/a/../admin") == "/admin"
    assert normalize_path("//admin") == "/admin"
    assert normalize_path("/%61dmin?x=/y") == "/admin"
    assert normalize_path("/%2E%2E/admin/./x/") == "/admin/x/"
    assert normalize_path("http://echo:8080/admin") == "/admin"
    assert normalize_path("/%2Fadmin") == "/%2Fadmin"  # an encoded slash is not a separator
    deny = policy("no-admin", "DENY", rule(paths=("/admin",)))
    for sneaky in ("/x/../admin", "//admin", "/%61dmin", "/./admin#frag", "/admin?x=1"):
        assert not authorize((deny,), http(EAST, "GET", sneaky)).allowed, sneaky


@given(st.text(alphabet="/.%2aE-_~xyz?#", max_size=30))
def test_normalised_paths_are_stable_and_rooted(raw: str) -> None:
    once = normalize_path(raw)
    assert once.startswith("/")
    assert "//" not in once
    assert normalize_path(once) == once or "%" in raw


def test_path_patterns() -> None:
    assert path_matches("*", "/anything")
    assert path_matches("/api/*", "/api/")
    assert not path_matches("/api/*", "/ap")
    assert path_matches("*.js", "/static/app.js")
    assert not path_matches("/x", "/x/")
