"""Module size: no module outside bench/ is over 450 lines unless its docstring says why.

STYLE.md asks for small modules; a long one must carry its reason where a reader meets it, in
a docstring sentence of the form "Over the 450-line aim: <why>". Generated code is exempt.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 450
SKIP_DIRS = {".venv", "bench", ".git", "build", "node_modules"}
REASON = re.compile(r"over the ~?\d+-line aim:\s*\S", re.IGNORECASE)


def _modules() -> list[Path]:
    return [
        p
        for p in sorted(ROOT.rglob("*.py"))
        if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)
        and not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))
        and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)
    ]


def test_long_modules_say_why_in_their_docstring() -> None:
    unexplained = []
    for path in _modules():
        text = path.read_text()
        lines = text.count("\n")
        if lines <= LIMIT:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not REASON.search(" ".join(doc.split())):
            unexplained.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not unexplained, (
        f"modules over {LIMIT} lines without an 'Over the {LIMIT}-line aim: <why>' sentence in "
        f"their docstring (split them, or say why): {', '.join(unexplained)}"
    )


def test_the_reason_pattern_needs_a_reason() -> None:
    assert REASON.search("Over the 450-line aim: the record loop reads best as one class.")
    assert not REASON.search("Over the 450-line aim:")
    assert not REASON.search("A short module.")
