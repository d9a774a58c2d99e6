"""Reading configuration files: a directory or a commit's files -> YAML documents with lines.

The YAML loader is PyYAML's safe loader made stricter in two ways operators would otherwise
trip over silently: a key repeated within one mapping is an error (PyYAML keeps the last one),
and aliases (`*name`) are refused (they make "billion laughs" documents cheap to write and are
never needed in these documents). Each document comes with a map from field path to line so
errors can point at a line.

What this module does not do: decide what a document means (federation.gitops.validate).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from federation.gitops.errors import RepositoryError

YAML_SUFFIXES = (".yaml", ".yml")
MAX_FILE_BYTES = 1 << 20  # one config file; Kubernetes objects are capped at 1.5 MiB too
MAX_TOTAL_BYTES = 16 << 20  # a whole checkout
MAX_FILES = 5000

FieldPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A config file of a checkout: path relative to the config root (POSIX), and its bytes."""

    path: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    index: int  # 1-based position in its file
    line: int  # 1-based line the document starts on
    data: Any
    lines: Mapping[FieldPath, int]  # field path -> line of its key (or item)


@dataclass(frozen=True, slots=True)
class YamlProblem:
    document: int  # the document the problem was found in (1-based)
    line: int | None
    reason: str


def is_config_path(path: str) -> bool:
    """A YAML file not under a hidden directory (.git, .github, ...) and not hidden itself."""
    parts = PurePosixPath(path).parts
    return path.endswith(YAML_SUFFIXES) and not any(p.startswith(".") for p in parts)


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise ComposerError(
                None,
                None,
                f"aliases (*{event.anchor}) are not allowed in fedgate documents",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports unhashable keys
                if key in seen:
                    raise ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"key {key!r} appears twice (first on line {seen[key]})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _lines(node: Any, path: FieldPath, out: dict[FieldPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = (*path, str(key_node.value))
            out[sub] = key_node.start_mark.line + 1
            _lines(value_node, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = item.start_mark.line + 1
            _lines(item, (*path, i), out)


def parse_yaml(text: str) -> tuple[list[ParsedDocument], YamlProblem | None]:
    """Every document of a YAML stream, up to the first syntax problem (returned, not raised)."""
    docs: list[ParsedDocument] = []
    loader: _StrictLoader | None = None
    try:
        # Inside the try: the loader's reader refuses non-printable characters as it is made.
        loader = _StrictLoader(text)
        while loader.check_node():
            node = loader.get_node()
            lines: dict[FieldPath, int] = {}
            _lines(node, (), lines)
            data = loader.construct_document(node)
            start = node.start_mark.line + 1 if node is not None else 1
            docs.append(ParsedDocument(len(docs) + 1, start, data, lines))
    # ValueError: an integer of over 4300 digits, which Python refuses to convert.
    except (yaml.YAMLError, ValueError) as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        if isinstance(e, yaml.reader.ReaderError):  # no mark: it checks the text before parsing
            line = text.count("\n", 0, e.position) + 1
            problem = f"character #x{e.character:04x}: {e.reason}"
        context = getattr(e, "context", None)
        reason = f"not valid YAML: {problem}" + (f" ({context})" if context else "")
        return docs, YamlProblem(len(docs) + 1, line, reason)
    finally:
        if loader is not None:
            loader.dispose()
    return docs, None


def read_directory(root: Path) -> tuple[list[SourceFile], list[tuple[str, str]]]:
    """Config files under `root` (or `root` itself if it is a file), sorted by path.

    Returns the files and the problems found while reading (path, reason): a symbolic link (not
    followed: a commit's tree holds links as links too), an unreadable or oversized file.
    Raises RepositoryError if `root` does not exist or the checkout is too large as a whole.
    """
    if root.is_file():
        return _read_files(root.parent, [root.name])
    if not root.is_dir():
        raise RepositoryError(f"{root}: no such file or directory")
    found: list[str] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(directory).relative_to(root)
        found.extend(
            (rel / f).as_posix() for f in filenames if is_config_path((rel / f).as_posix())
        )
        if len(found) > MAX_FILES:
            raise RepositoryError(f"{root}: more than {MAX_FILES} YAML files")
    return _read_files(root, sorted(found))


def _read_files(root: Path, names: list[str]) -> tuple[list[SourceFile], list[tuple[str, str]]]:
    files: list[SourceFile] = []
    problems: list[tuple[str, str]] = []
    total = 0
    for name in names:
        path = root / name
        if path.is_symlink():
            problems.append((name, "is a symbolic link; config files must be regular files"))
            continue
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                problems.append((name, f"is {size} bytes, over the limit of {MAX_FILE_BYTES}"))
                continue
            data = path.read_bytes()
        except OSError as e:
            problems.append((name, f"cannot be read: {e.strerror or e}"))
            continue
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise RepositoryError(f"{root}: config files exceed {MAX_TOTAL_BYTES} bytes in total")
        files.append(SourceFile(name, data))
    return files, problems
