"""Scalar types of the GitOps documents: names, durations, percentages, hosts, SPIFFE patterns.

Each type is an `Annotated` pydantic type carrying its own check (with an error message an
operator can act on) and its JSON Schema (so editors flag the same mistakes). Durations keep
Istio's string form in the documents ("1.5s", "200ms", "1m30s", as Go's time.ParseDuration reads
them); `parse_duration` turns one into float seconds for the runtime model.

This module validates single values only; references between fields and documents are checked in
`federation.gitops.checks`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from mesh.errors import MeshError
from mesh.model import SPECIAL_CLUSTERS
from mesh.naming import ServiceKey, SpiffeId

API_VERSION = "fedgate.io/v1alpha1"

LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
TRUST_DOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,253}[a-z0-9])?$"
# A Go/Istio duration: one or more <number><unit>, e.g. "1.5s", "200ms", "1h30m".
DURATION_PATTERN = r"^((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$"
HEADER_PATTERN = r"^[a-z0-9!#$%&'*+.^_`|~-]+$"  # an RFC 9110 token, lower-case
MIN_DURATION = 0.001  # Istio refuses durations under 1 ms
MAX_DURATION = 365 * 24 * 3600.0

_LABEL = re.compile(LABEL_PATTERN)
_TRUST_DOMAIN = re.compile(TRUST_DOMAIN_PATTERN)
_DURATION = re.compile(DURATION_PATTERN)
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_HEADER = re.compile(HEADER_PATTERN)
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
)
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def camel(name: str) -> str:
    """snake_case -> camelCase: `consecutive_5xx_errors` -> `consecutive5xxErrors`."""
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


class Strict(BaseModel):
    """Base of every document model: unknown fields are errors, no type coercion, immutable."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        alias_generator=camel,
        validate_by_name=False,
        use_attribute_docstrings=True,  # a field's docstring is its JSON Schema description
        field_title_generator=lambda name, info: info.alias or name,
    )


def parse_duration(text: str) -> float:
    """`"1m30s"` -> 90.0 seconds; raises ValueError for anything Istio would refuse."""
    if not _DURATION.match(text):
        raise ValueError(
            f"{text!r} is not a duration: use a number and a unit (h, m, s, ms, us, ns), "
            'e.g. "1.5s", "200ms" or "1m30s"'
        )
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(text))
    if seconds < MIN_DURATION:
        raise ValueError(f"{text!r} is shorter than the minimum of 1ms")
    if seconds > MAX_DURATION:
        raise ValueError(f"{text!r} is longer than the maximum of 365 days")
    return seconds


def _must_be_string(what: str, example: str) -> Any:
    def check(value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"must be {what} string such as {example}, got {value!r}")
        return value

    return BeforeValidator(check)


def _duration(value: str) -> str:
    parse_duration(value)
    return value


def _label(value: str) -> str:
    if not _LABEL.match(value):
        raise ValueError(
            f"{value!r} is not an RFC 1123 label (lower-case letters, digits and '-', at most "
            "63, starting and ending with a letter or digit)"
        )
    return value


def _cluster_ref(value: str) -> str:
    if value in SPECIAL_CLUSTERS or _LABEL.match(value):
        return value
    raise ValueError(f"{value!r} is neither local, remote nor a cluster name (an RFC 1123 label)")


def _trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN.match(value):
        raise ValueError(f"{value!r} is not a trust domain (a lower-case DNS name)")
    return value


def _host(value: str) -> str:
    """An IP address or a DNS name (gateway addresses may be either)."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _DNS_NAME.match(value.rstrip(".")):
        raise ValueError(f"{value!r} is neither an IP address nor a lower-case DNS name")
    return value


def _service_host(value: str) -> str:
    try:
        ServiceKey.parse_fqdn(value)
    except MeshError as e:
        raise ValueError(str(e)) from None
    return value


def _principal(value: str) -> str:
    """An exact SPIFFE ID, `*`, or a SPIFFE ID with `*` wildcards that could match one."""
    if value == "*":
        return value
    probe = value.replace("*", "x")
    try:
        SpiffeId.parse(probe)
    except MeshError:
        raise ValueError(
            f"{value!r} is not a SPIFFE ID spiffe://<trust-domain>/ns/<ns>/sa/<sa>, nor such an "
            "ID with '*' wildcards (each matches within one segment), nor '*'"
        ) from None
    return value


def _header(value: str) -> str:
    lowered = value.lower()
    if not _HEADER.match(lowered):
        raise ValueError(f"{value!r} is not an HTTP header name")
    return lowered


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"{value!r} is not a valid regular expression: {e}") from None
    return value


_METHOD = re.compile(r"[A-Z]+")


def _method(value: str) -> str:
    if not _METHOD.fullmatch(value):
        raise ValueError(f"{value!r} is not an HTTP method (upper case, such as GET or POST)")
    return value


def _path_pattern(value: str) -> str:
    if value == "*":
        return value
    if "*" in value[1:-1] or (value.startswith("*") and value.endswith("*")):
        raise ValueError(
            f"{value!r}: '*' may only start (suffix match) or end (prefix match) a path"
        )
    if not value.startswith(("/", "*")):
        raise ValueError(f"{value!r} is not a path (it starts with '/', or '*' for a suffix)")
    return value


def _string_schema(pattern: str | None, description: str) -> WithJsonSchema:
    schema: dict[str, Any] = {"type": "string", "description": description}
    if pattern is not None:
        schema["pattern"] = pattern
    return WithJsonSchema(schema)


Label = Annotated[
    str,
    _must_be_string("a", '"echo"'),
    AfterValidator(_label),
    _string_schema(LABEL_PATTERN, "An RFC 1123 label, as Kubernetes names."),
]
ClusterRef = Annotated[
    str,
    _must_be_string("a cluster name", '"west"'),
    AfterValidator(_cluster_ref),
    _string_schema(
        LABEL_PATTERN, "`local` (the caller's cluster), `remote` (every other) or a cluster name."
    ),
]
TrustDomain = Annotated[
    str,
    _must_be_string("a", '"east.fedgate.local"'),
    AfterValidator(_trust_domain),
    _string_schema(TRUST_DOMAIN_PATTERN, "A SPIFFE trust domain (a lower-case DNS name)."),
]
Duration = Annotated[
    str,
    _must_be_string("a duration", '"1.5s" or "200ms"'),
    AfterValidator(_duration),
    _string_schema(DURATION_PATTERN, 'A duration as Istio writes it: "1.5s", "200ms", "1m30s".'),
]
Host = Annotated[
    str,
    _must_be_string("an address", '"gw.east.example.com" or "172.30.0.10"'),
    AfterValidator(_host),
    _string_schema(None, "An IP address or a DNS name."),
]
ServiceHost = Annotated[
    str,
    _must_be_string("a service name", '"echo.demo.svc.clusterset.local"'),
    AfterValidator(_service_host),
    _string_schema(
        r"^[a-z0-9-]+\.[a-z0-9-]+\.svc\.clusterset\.local\.?$",
        "A clusterset service name: <service>.<namespace>.svc.clusterset.local",
    ),
]
Principal = Annotated[
    str,
    _must_be_string("a SPIFFE ID", '"spiffe://east.fedgate.local/ns/demo/sa/client"'),
    AfterValidator(_principal),
    _string_schema(
        r"^(\*|spiffe://.+)$",
        "A SPIFFE ID, '*', or a SPIFFE ID with '*' wildcards matching within one segment.",
    ),
]
HeaderName = Annotated[str, AfterValidator(_header)]
Regex = Annotated[
    str,
    _must_be_string("a regular expression", '"^/api/v[12]/"'),
    AfterValidator(_regex),
    _string_schema(None, "A regular expression (Python `re` syntax), matched in full."),
]
Weight = Annotated[int, Field(ge=0, le=100)]
Percent = Annotated[float, Field(ge=0, le=100)]
Port = Annotated[int, Field(ge=1, le=65535)]
HttpMethod = Annotated[
    str,
    _must_be_string("an HTTP method", '"GET"'),
    AfterValidator(_method),
    _string_schema(r"^[A-Z]+$", "An HTTP method, upper case (gRPC calls are POST)."),
]
PathPattern = Annotated[
    str,
    _must_be_string("a path", '"/api/*"'),
    AfterValidator(_path_pattern),
    _string_schema(
        r"^(\*|/.*|\*.+)$",
        "A request path: exact (/x), a prefix (/api/*), a suffix (*.html), or * (any).",
    ),
]
