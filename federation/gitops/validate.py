"""Validating a whole configuration checkout: every file, every document, every reference.

`validate_files` is pure (files in, result out) and is the one validation used everywhere: by the
sync on every commit, by `fedgate config validate` on a directory, by `fedgate config diff`. It
never stops at the first problem: a result lists every issue, each naming the file, the document
(1-based position in its file), the field path (`spec.retries.perTryTimeout`), the line when
known, and the reason. A checkout with any issue yields no config at all: nothing is partially
applied.

Stages: read (UTF-8, YAML with duplicate keys and aliases refused) -> schema (per document,
`federation.schema`) -> rules (`federation.gitops.checks`: weights, references, duplicates) ->
runtime form (`federation.gitops.convert`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from federation.gitops import checks
from federation.gitops.convert import authorization_policy, federation_json, traffic_policy
from federation.gitops.issues import ConfigIssue, Located, format_path, line_of
from federation.gitops.load import ParsedDocument, SourceFile, parse_yaml, read_directory
from federation.schema import (
    DOCUMENT_MODELS,
    KINDS,
    AuthorizationPolicyDocument,
    FederationDocument,
    TrafficPolicyDocument,
    known_fields,
)
from federation.schema_types import API_VERSION
from mesh.model import AuthorizationPolicy, TrafficPolicy

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class DesiredConfig:
    """A valid checkout in runtime form: what the sync writes to etcd."""

    federation: Json | None
    policies: tuple[TrafficPolicy, ...]
    authorization: tuple[AuthorizationPolicy, ...]


@dataclass(frozen=True, slots=True)
class ValidationResult:
    files: int
    documents: dict[str, int]  # kind -> count of valid-schema documents
    issues: tuple[ConfigIssue, ...]
    config: DesiredConfig | None  # None whenever `issues` is not empty

    @property
    def ok(self) -> bool:
        return not self.issues


_KNOWN = known_fields()


def _reason(error: Any) -> str:
    kind, message, loc = error["type"], str(error["msg"]), error["loc"]
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else ""
        close = difflib.get_close_matches(name, _KNOWN, n=1)
        return "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind == "missing":
        return "is required"
    return message.removeprefix("Value error, ")


def _schema_issues(file: str, doc: ParsedDocument, error: ValidationError) -> list[ConfigIssue]:
    out = []
    for e in error.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if p != "[key]")
        out.append(ConfigIssue(file, doc.index, line_of(doc, loc), format_path(loc), _reason(e)))
    return out


def _check_document(file: str, doc: ParsedDocument) -> tuple[Located | None, list[ConfigIssue]]:
    data = doc.data
    if not isinstance(data, dict):
        got = type(data).__name__
        return None, [ConfigIssue(file, doc.index, doc.line, "", f"must be a mapping, got {got}")]
    api_version = data.get("apiVersion")
    if api_version != API_VERSION:
        reason = (
            "is required"
            if api_version is None
            else f"{api_version!r} is not {API_VERSION!r} (a config repository holds only "
            "fedgate documents)"
        )
        return None, [
            ConfigIssue(file, doc.index, line_of(doc, ("apiVersion",)), "apiVersion", reason)
        ]
    kind = data.get("kind")
    model = DOCUMENT_MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        reason = "is required" if kind is None else f"unknown kind {kind!r}"
        reason += f" (one of {', '.join(KINDS)})"
        return None, [ConfigIssue(file, doc.index, line_of(doc, ("kind",)), "kind", reason)]
    try:
        return Located(file, doc, model.model_validate(data)), []
    except ValidationError as e:
        return None, _schema_issues(file, doc, e)


def validate_files(
    files: Sequence[SourceFile],
    problems: Sequence[tuple[str, str]] = (),
    ports: checks.PortProtocols | None = None,
) -> ValidationResult:
    """Validate a checkout's config files (and report `problems` found while reading them);
    `ports`: the catalog's port protocols, if known (federation.gitops.checks)."""
    issues = [ConfigIssue(path, 0, 0, "", reason) for path, reason in problems]
    located: list[Located] = []
    # Set when a Federation document (or a file that may hold one) failed before the rules ran.
    broken = False
    for f in sorted(files, key=lambda f: f.path):
        try:
            text = f.data.decode("utf-8")
        except UnicodeDecodeError as e:
            issues.append(ConfigIssue(f.path, 0, 0, "", f"is not UTF-8 text: {e.reason}"))
            continue
        docs, problem = parse_yaml(text)
        if problem is not None:
            issues.append(
                ConfigIssue(f.path, problem.document, problem.line or 0, "", problem.reason)
            )
            broken = True
        for doc in docs:
            if doc.data is None:  # an empty document, e.g. after a trailing `---`
                continue
            loc, found = _check_document(f.path, doc)
            issues.extend(found)
            if loc is not None:
                located.append(loc)
            elif isinstance(doc.data, dict) and doc.data.get("kind") == "Federation":
                broken = True
    issues.extend(checks.check(located, federation_broken=broken, ports=ports))
    counts: dict[str, int] = {}
    for loc in located:
        counts[loc.model.kind] = counts.get(loc.model.kind, 0) + 1
    config = None if issues else _desired(located)
    return ValidationResult(len(files), counts, tuple(sorted(set(issues))), config)


def validate_directory(root: Path, ports: checks.PortProtocols | None = None) -> ValidationResult:
    """Validate the config files under `root`; raises RepositoryError if it cannot be read."""
    files, problems = read_directory(root)
    return validate_files(files, problems, ports)


def _desired(located: list[Located]) -> DesiredConfig:
    federation = next(
        (loc.model for loc in located if isinstance(loc.model, FederationDocument)), None
    )
    defaults = federation.spec.defaults.traffic_policy if federation is not None else None
    policies = tuple(
        sorted(
            (
                traffic_policy(loc.model, defaults)
                for loc in located
                if isinstance(loc.model, TrafficPolicyDocument)
            ),
            key=lambda p: p.key,
        )
    )
    authorization = tuple(
        sorted(
            (
                authorization_policy(loc.model)
                for loc in located
                if isinstance(loc.model, AuthorizationPolicyDocument)
            ),
            key=lambda a: (a.key.namespace, a.name),
        )
    )
    return DesiredConfig(
        federation_json(federation) if federation is not None else None, policies, authorization
    )
