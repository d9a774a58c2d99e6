"""Label selectors as the API server parses them from `?labelSelector=`, and the field
selectors (`?fieldSelector=`) every resource supports: `metadata.name` and `metadata.namespace`.

Equality-based (`k=v`, `k==v`, `k!=v`), set-based (`k in (a,b)`, `k notin (a)`) and existence
(`k`, `!k`) requirements, comma-separated and ANDed (k8s.io/apimachinery labels/selector.go).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_SET = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        match self.op:
            case "=" | "in":
                return labels.get(self.key) in self.values
            case "!=" | "notin":
                return labels.get(self.key) not in self.values
            case "exists":
                return self.key in labels
            case "!":
                return self.key not in labels
        raise AssertionError(self.op)


@dataclass(frozen=True, slots=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


def _split(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse(text: str | None) -> Selector:
    """Parse a selector; raises ValueError on a malformed one (the server answers 400)."""
    reqs = []
    for part in _split(text or ""):
        if m := _SET.match(part):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(Requirement(m.group(1), m.group(2), values))
        elif "!=" in part:
            k, v = part.split("!=", 1)
            reqs.append(Requirement(k.strip(), "!=", (v.strip(),)))
        elif "=" in part:
            k, v = part.replace("==", "=").split("=", 1)
            reqs.append(Requirement(k.strip(), "=", (v.strip(),)))
        elif part.startswith("!"):
            reqs.append(Requirement(part[1:].strip(), "!"))
        elif re.fullmatch(r"[A-Za-z0-9./_-]+", part):
            reqs.append(Requirement(part, "exists"))
        else:
            raise ValueError(f"unable to parse requirement: {part!r}")
    return Selector(tuple(reqs))


# The field labels every resource supports (k8s.io/apiserver registry generic.ObjectMetaFieldsSet).
_FIELDS = {"metadata.name": "name", "metadata.namespace": "namespace"}


@dataclass(frozen=True, slots=True)
class FieldSelector:
    """A `?fieldSelector=`: `metadata.name` / `metadata.namespace` with `=`, `==` or `!=`."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, obj: Mapping[str, object]) -> bool:
        meta = obj.get("metadata")
        fields = {
            k: str(meta.get(v) or "") for k, v in _FIELDS.items() if isinstance(meta, Mapping)
        }
        return all(r.matches(fields) for r in self.requirements)


def parse_fields(text: str | None) -> FieldSelector:
    """Parse a field selector; ValueError (400) on a malformed one or an unsupported field."""
    reqs = []
    for part in _split(text or ""):
        op = "!=" if "!=" in part else "="
        if op not in part:
            raise ValueError(f"invalid field selector: {part!r}")
        k, v = part.replace("==", "=").split(op, 1)
        if k.strip() not in _FIELDS:
            raise ValueError(f"field label not supported: {k.strip()}")
        reqs.append(Requirement(k.strip(), op, (v.strip(),)))
    return FieldSelector(tuple(reqs))
