"""Authorization decisions, pure: a service's `AuthorizationPolicy`s and one call -> allow/deny.

Istio's evaluation (security/authorization, "Authorization policy precedence"):

1. a DENY policy with a matching rule refuses the call;
2. then, if the service has ALLOW policies, the call must match one of them (an ALLOW policy
   without rules matches nothing);
3. a service without ALLOW policies admits every authenticated caller.

A rule matches when one of its sources matches the caller and one of its operations matches the
call; inside a source or an operation every listed field must match. Paths are Istio's forms:
exact, prefix `/api/*`, suffix `*.html`, or `*` (any path); a request path is matched without
its query and after RFC 3986 §5.2.4 dot-segment removal, percent-decoding of unreserved
characters and merging of repeated slashes, so `/a/../admin`, `//admin` and `/%61dmin` cannot
walk around a DENY on `/admin`. Methods match exactly (gRPC calls are `POST`, their path
`/<package>.<Service>/<Method>`).

A call that is not HTTP (`AuthzRequest.method` is None: a TCP stream) cannot be checked against
HTTP fields. As Istio does, that fails closed: an ALLOW rule that uses them matches nothing, and
a DENY rule that uses them is judged on its other fields only (so it refuses more, never less).
`config validate` rejects such rules outright (federation.gitops.checks), so this is the
runtime's answer to a catalog that changed after the config was applied.

What this module does not do: know where a call came from (the destination sidecar builds the
`AuthzRequest` from the verified peer certificate) or refuse anything (its callers do).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.model import (
    AuthorizationPolicy,
    AuthorizationRule,
    AuthzOperation,
)

NO_ALLOW_MATCHED = "no ALLOW policy matched"
# How a refused TCP stream's reply starts (`<AUTHZ_REFUSAL>: <reason>`), so the source sidecar
# can tell an authorization refusal from an unhealthy endpoint.
AUTHZ_REFUSAL = "authorization"
DENIED_BY = "denied by authorization policy"

_UNRESERVED = re.compile(r"%(2[DdEe]|3[0-9]|[46][1-9A-Fa-f]|[57][0-9Aa]|5[Ff]|7[Ee])")
_SLASHES = re.compile(r"/{2,}")


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """One call as the destination sidecar sees it. `method`/`path` are None for a call that
    is not HTTP (a TCP stream)."""

    principal: str
    port: int
    method: str | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    allowed: bool
    reason: str  # what a refusal says (x-fedgate-reason, access line, metric label)
    policy: str = ""  # `<ns>/<name>` of the policy that decided ("" when none did)

    def __str__(self) -> str:
        verdict = "ALLOW" if self.allowed else "DENY"
        return f"{verdict}: {self.reason}"


ALLOW_ALL = AuthzDecision(True, "no authorization policy")


def normalize_path(target: str) -> str:
    """The path Istio's rules match: no query or fragment, unreserved characters decoded,
    dot segments removed, repeated slashes merged. An absolute-form target
    (`http://host/x`) is reduced to its path."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if "://" in path:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    path = _UNRESERVED.sub(lambda m: chr(int(m.group(1), 16)), path)
    path = _SLASHES.sub("/", path)
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        elif seg == ".":
            if last:
                out.append("")
        else:
            out.append(seg)
    normal = "/".join(out)
    return normal if normal.startswith("/") else "/" + normal


def path_matches(pattern: str, path: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return path.endswith(pattern[1:])
    return path == pattern


def _operation(op: AuthzOperation, req: AuthzRequest, path: str | None) -> bool | None:
    """True/False; None when only HTTP fields could tell and the call is not HTTP."""
    if op.ports and req.port not in op.ports:
        return False
    if req.port in op.not_ports:
        return False
    if not op.http_fields:
        return True
    if req.method is None or path is None:
        return None
    if op.methods and req.method not in op.methods:
        return False
    if req.method in op.not_methods:
        return False
    if op.paths and not any(path_matches(p, path) for p in op.paths):
        return False
    return not any(path_matches(p, path) for p in op.not_paths)


def rule_matches(rule: AuthorizationRule, req: AuthzRequest, path: str | None) -> bool | None:
    if rule.sources and not any(s.matches(req.principal) for s in rule.sources):
        return False
    if not rule.operations:
        return True
    found = [_operation(op, req, path) for op in rule.operations]
    if True in found:
        return True
    return None if None in found else False


def _matches(policy: AuthorizationPolicy, req: AuthzRequest, path: str | None) -> bool:
    for rule in policy.rules:
        hit = rule_matches(rule, req, path)
        # An unknowable HTTP field: a DENY rule refuses, an ALLOW rule admits nobody.
        if hit or (hit is None and policy.action == "DENY"):
            return True
    return False


def authorize(policies: Iterable[AuthorizationPolicy], req: AuthzRequest) -> AuthzDecision:
    """Istio's decision for one service's `policies` (see the module docstring)."""
    ordered = sorted(policies, key=lambda p: p.ref)
    if not ordered:
        return ALLOW_ALL
    path = normalize_path(req.path) if req.path is not None else None
    for p in ordered:
        if p.action == "DENY" and _matches(p, req, path):
            return AuthzDecision(False, f"{DENIED_BY} {p.ref}", p.ref)
    allow = [p for p in ordered if p.action == "ALLOW"]
    if not allow:
        return AuthzDecision(True, "no ALLOW policy for the service")
    for p in allow:
        if _matches(p, req, path):
            return AuthzDecision(True, f"allowed by authorization policy {p.ref}", p.ref)
    return AuthzDecision(False, NO_ALLOW_MATCHED)


def needs_http(policies: Iterable[AuthorizationPolicy]) -> bool:
    """Whether any rule of `policies` uses HTTP fields (so a decision needs each request)."""
    return any(op.http_fields for p in policies for r in p.rules for op in r.operations)


def authorized(policies: Iterable[AuthorizationPolicy], principal: str, port: int) -> bool:
    """`authorize` for a call known only by caller and port (a TCP stream)."""
    return authorize(policies, AuthzRequest(principal, port)).allowed
