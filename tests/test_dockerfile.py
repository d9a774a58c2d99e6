"""The Dockerfile, read (Docker cannot run here): stages, base, user, entrypoint, iptables, and
that everything it copies exists and is not excluded by .dockerignore."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_multi_stage_slim_non_root_with_fedgate_entrypoint() -> None:
    steps = instructions()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert froms == ["python:3.11-slim AS build", "python:3.11-slim AS run"]
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    users = [rest for word, rest in final if word == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("0", "root")
    (entrypoint,) = [json.loads(rest) for word, rest in final if word == "ENTRYPOINT"]
    assert entrypoint == ["fedgate"]
    runs = " ".join(rest for word, rest in final if word == "RUN")
    assert "apt-get install" in runs
    assert " iptables" in runs
    assert any(w == "COPY" and r.startswith("--from=build") for w, r in final)


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used there: last match wins, `!` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) for p in prefixes) or fnmatch.fnmatch(path, pat):
            result = not negate
    return result


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for word, rest in instructions():
        if word == "COPY" and not rest.startswith("--from"):
            copied += rest.split()[:-1]
    assert "fedgate" in copied
    for source in copied:
        assert (REPO / source).exists(), source
        assert not ignored(source, patterns), f"{source} is excluded by .dockerignore"
    assert ignored("tests", patterns)
    assert ignored(".venv", patterns)
    assert ignored("fedgate/__pycache__/x.pyc", patterns)
