"""Sampling profiles of running fedgate processes with py-spy, and their summary (bench helper).

    .venv/bin/python bench/pyspy.py PROFILE.raw [--top 25]     # summarize a raw profile

`record` starts one `py-spy record --format raw --nonblocking` per process (py-spy is a
PyPI package: `.venv/bin/pip install py-spy`); `summary` turns a raw profile (collapsed stacks:
`frame;frame;... count` per line) into the share of samples per frame, self (the innermost
frame) and inclusive (anywhere on the stack, counted once per sample). `--nonblocking` does not
stop the process for each sample, so the profile perturbs the load less on a busy machine.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path


def record(pids: dict[str, int], out: Path, duration: float, rate: int = 100) -> list[Path]:
    """Profile each process for `duration` seconds in the background; the files it will write.
    Wait for them with `wait`."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, pid in pids.items():
        path = out / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".raw")
        argv = [spy, "record", "--format", "raw", "--nonblocking", "--rate", str(rate)]
        argv += ["--duration", str(int(duration)), "--pid", str(pid), "--output", str(path)]
        _running.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        files.append(path)
    return files


_running: list[subprocess.Popen[bytes]] = []


def wait(timeout: float = 120.0) -> None:
    """Wait for every profiler `record` started (bounded: killed after `timeout`)."""
    while _running:
        proc = _running.pop()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summary(path: Path, top: int = 25) -> str:
    """The `top` frames by self and by inclusive share of samples, as text."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"total samples {total}"]
    for title, counts in (("self", own), ("inclusive", inclusive)):
        lines.append(f"-- {title}")
        lines += [f"{n / max(total, 1) * 100:5.1f}% {f}" for f, n in counts.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", type=Path, nargs="+")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    for path in a.raw:
        print(f"== {path.stem}\n{summary(path, a.top)}\n")


if __name__ == "__main__":
    main()
