"""Which part of a `TrafficPolicy` applies to one request: route matching (Istio's HTTPMatch).

Routes are tried in order; the first with a matching entry applies, and its unset fields
inherit the policy's own. An entry matches when its `uri` (if any) matches the path AND every
listed header matches; header names are compared lower-case. `regex` is a Python `re` full
match; an expression that does not compile matches nothing (validation should have refused it).
The path is matched without its query string, as Envoy does for `exact` and `regex`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mesh.model import (
    ClusterWeight,
    Fault,
    HttpRoute,
    Mirror,
    RequestMatch,
    Retries,
    StringMatch,
    SubsetWeight,
    TrafficPolicy,
)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What matching looks at: the method, the path (no query) and the headers (lower-case
    names; repeated headers joined with ", ")."""

    method: str
    path: str
    headers: Mapping[str, str]

    @classmethod
    def build(cls, method: str, target: str, headers: tuple[tuple[str, str], ...]) -> RequestInfo:
        joined: dict[str, str] = {}
        for name, value in headers:
            key = name.lower()
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        return cls(method, target.split("?", 1)[0], MappingProxyType(joined))


@dataclass(frozen=True, slots=True)
class Effective:
    """The policy fields one request runs on; `route` names the matched route ("" for none)."""

    route: str = ""
    cluster_weights: tuple[ClusterWeight, ...] = ()
    subset_weights: tuple[SubsetWeight, ...] = ()
    retries: Retries | None = None
    timeout: float | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None


NO_POLICY = Effective()


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def string_matches(m: StringMatch, value: str) -> bool:
    match m.kind:
        case "exact":
            return value == m.value
        case "prefix":
            return value.startswith(m.value)
        case "regex":
            rx = _regex(m.value)
            return rx is not None and rx.fullmatch(value) is not None
        case _:
            raise AssertionError(f"unknown string match kind {m.kind!r}")


def request_matches(m: RequestMatch, req: RequestInfo) -> bool:
    if m.uri is not None and not string_matches(m.uri, req.path):
        return False
    for name, sm in m.headers:
        value = req.headers.get(name.lower())
        if value is None or not string_matches(sm, value):
            return False
    return True


def route_for(policy: TrafficPolicy, req: RequestInfo) -> HttpRoute | None:
    """The first route with a matching entry, or None."""
    for route in policy.routes:
        if any(request_matches(m, req) for m in route.matches):
            return route
    return None


def effective(policy: TrafficPolicy | None, req: RequestInfo | None) -> Effective:
    """The fields that apply to `req` (None: a connection-level call, no route matching)."""
    if policy is None:
        return NO_POLICY
    base = Effective(
        "",
        policy.cluster_weights,
        policy.subset_weights,
        policy.retries,
        policy.timeout,
        policy.fault,
        policy.mirror,
    )
    route = route_for(policy, req) if req is not None else None
    if route is None:
        return base
    return Effective(
        route=route.name,
        cluster_weights=route.cluster_weights or base.cluster_weights,
        subset_weights=route.subset_weights or base.subset_weights,
        retries=route.retries if route.retries is not None else base.retries,
        timeout=route.timeout if route.timeout is not None else base.timeout,
        fault=route.fault if route.fault is not None else base.fault,
        mirror=route.mirror if route.mirror is not None else base.mirror,
    )
