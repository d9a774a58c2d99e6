"""Which modules hold a process kind's memory: RSS deltas per first import (issue 17).

    .venv/bin/python bench/import_rss.py sidecar            # kinds: bench/footprint.py's KINDS
    .venv/bin/python bench/import_rss.py sidecar --top 40 --by package
    .venv/bin/python bench/import_rss.py sidecar --traced   # tracemalloc's bytes, not RSS

One interpreter imports the kind's modules (as `bench/footprint.py --imports` does) with a
`sys.meta_path` hook that reads VmRSS around each module's execution. A module's own delta is
its execution's delta minus that of the modules it imported meanwhile, so a shared library
loaded by an extension module is charged to that module. `--by package` sums by top-level
package. RSS grows in pages and the allocator's arenas, so small figures are noisy (±0.1 MiB);
what it shows is where the megabytes go. `--traced` counts the bytes Python allocates instead
(tracemalloc): exact, but blind to shared libraries and to memory C code allocates itself.
A benchmark: prints, asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import sys
import tracemalloc
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_kib() -> int:
    if tracemalloc.is_tracing():
        return tracemalloc.get_traced_memory()[0] // 1024
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4  # resident pages of 4 KiB


class _Timed(importlib.abc.Loader):
    """Wraps a module's loader: measures its `exec_module` (and `create_module`, where an
    extension module's shared library is mapped)."""

    def __init__(self, inner: importlib.abc.Loader, rec: Recorder) -> None:
        self._inner = inner
        self._rec = rec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        self._rec.enter()
        try:
            return self._inner.create_module(spec)
        finally:
            self._rec.leave(spec.name + " (load)")

    def exec_module(self, module: ModuleType) -> None:
        self._rec.enter()
        try:
            self._inner.exec_module(module)
        finally:
            self._rec.leave(module.__name__)


class Recorder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.own: dict[str, int] = defaultdict(int)  # KiB per module, children excluded
        self._stack: list[list[int]] = []  # [rss at entry, children's total]

    def enter(self) -> None:
        self._stack.append([rss_kib(), 0])

    def leave(self, name: str) -> None:
        start, children = self._stack.pop()
        total = rss_kib() - start
        self.own[name.removesuffix(" (load)")] += total - children
        if self._stack:
            self._stack[-1][1] += total

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec: importlib.machinery.ModuleSpec | None = (
                find(fullname, path, target) if find else None
            )
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Timed(spec.loader, self)
                return spec
        return None


def main() -> None:
    # The hook goes in first: bench.footprint's own imports (asyncio, ssl, json) are the
    # stdlib every kind loads anyway, and are charged like the rest.
    if "--traced" in sys.argv:
        tracemalloc.start()
    rec = Recorder()
    start = rss_kib()
    sys.meta_path.insert(0, rec)
    from bench.footprint import KINDS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=list(KINDS))
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--by", choices=["module", "package"], default="module")
    p.add_argument("--traced", action="store_true", help="tracemalloc's bytes instead of RSS")
    args = p.parse_args()
    for module in KINDS[args.kind]:
        importlib.import_module(module)
    sys.meta_path.remove(rec)
    rec.own.pop("bench.footprint", None)
    rec.own.pop("bench", None)
    end = rss_kib()
    rows: dict[str, int] = defaultdict(int)
    for name, kib in rec.own.items():
        rows[name.split(".")[0] if args.by == "package" else name] += kib
    what = "traced" if args.traced else "RSS"
    print(f"{args.kind}: {what} {start / 1024:.1f} MiB before, {end / 1024:.1f} MiB after imports")
    print(f"{len(rec.own)} modules, {(end - start) / 1024:.1f} MiB charged")
    for name, kib in sorted(rows.items(), key=lambda r: -r[1])[: args.top]:
        print(f"{kib / 1024:7.2f}  {name}")


if __name__ == "__main__":
    main()
