"""What a validation problem looks like: `ConfigIssue`, and the located documents it points into."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from federation.gitops.load import FieldPath, ParsedDocument
from federation.schema import Document

Json = dict[str, Any]


@dataclass(frozen=True, slots=True, order=True)
class ConfigIssue:
    """One problem: `document` 0 means the file as a whole, `field` "" the whole document,
    `line` 0 an unknown line."""

    file: str
    document: int
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        parts = [f"{self.file}:{self.line}" if self.line else self.file]
        if self.document:
            parts.append(f"document {self.document}")
        if self.field:
            parts.append(self.field)
        return ": ".join(parts) + ": " + self.reason

    def to_json(self) -> Json:
        return {
            "file": self.file,
            "document": self.document,
            "line": self.line,
            "field": self.field,
            "reason": self.reason,
        }


def format_path(path: Iterable[str | int]) -> str:
    """`("spec", "clusterWeights", 1, "weight")` -> `spec.clusterWeights[1].weight`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part and part.replace("_", "").replace("-", "").isalnum():
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def line_of(doc: ParsedDocument, path: Sequence[str | int]) -> int:
    """The line of `path`, or of its nearest ancestor the YAML has (a missing field's parent)."""
    for end in range(len(path), 0, -1):
        line = doc.lines.get(tuple(path[:end]))
        if line is not None:
            return line
    return doc.line


@dataclass(frozen=True, slots=True)
class Located:
    """A schema-valid document and where it came from."""

    file: str
    doc: ParsedDocument
    model: Document

    @property
    def where(self) -> str:
        return f"{self.file} document {self.doc.index}"

    def issue(self, path: FieldPath, reason: str) -> ConfigIssue:
        return ConfigIssue(
            self.file, self.doc.index, line_of(self.doc, path), format_path(path), reason
        )
