"""Bounded curl loops from a rig client pod around a control-plane or gateway fault, for
tests/e2e/test_controller.py: one line per call (the answer's JSON, or FAILED), read as the
lines come, with the time each arrived.

A loop runs at most its `seconds`; a test may end it sooner once what it asserts has been seen
(`Loop.stop`: the loop finishes its current call and exits), so a fault test costs the time
its assertion needs rather than a fixed worst case.
"""

from __future__ import annotations

import json
import select
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clusters.rig import lifecycle


@dataclass
class Loop:
    """A running traffic loop and the file that ends it early."""

    proc: subprocess.Popen[str]
    stop_file: Path

    def stop(self) -> None:
        """End the loop after its current call (the rig's pods share this filesystem)."""
        self.stop_file.touch()


def traffic(rig: Path, seconds: float, cluster: str, url: str) -> Loop:
    """A loop of calls to `url` from `cluster`'s client for at most `seconds`."""
    record = lifecycle.load(rig).pod(cluster, "client")
    assert record is not None
    stop_file = rig / "traffic" / f"{cluster}-{time.monotonic_ns()}.stop"
    stop_file.parent.mkdir(exist_ok=True)
    script = (
        f"end=$(( $(date +%s) + {int(seconds)} )); "
        f'while [ "$(date +%s)" -lt "$end" ] && [ ! -e {stop_file} ]; do '
        f"curl -s --noproxy '*' --max-time 5 {url} || echo FAILED; echo; sleep 0.05; done"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", record.netns, "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return Loop(proc, stop_file)


def flowing(proc: subprocess.Popen[str], calls: int, timeout: float = 15.0) -> list[str]:
    """The first `calls` answers' lines, once they came (the traffic is flowing)."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len([x for x in lines if x.strip()]) < calls:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"only {len(lines)} lines of traffic within {timeout} s: {lines}"
        line = proc.stdout.readline()
        assert line, f"the traffic ended early: {lines}"
        lines.append(line)
    return lines


def outcomes(proc: subprocess.Popen[str], seen: list[str] | None = None) -> tuple[int, list[str]]:
    """(answers from west, failed calls' lines) of a finished traffic loop."""
    out, _ = proc.communicate(timeout=60)
    return count([*(seen or []), *out.splitlines()])


def drained(
    proc: subprocess.Popen[str], stamps: list[float] | None = None
) -> tuple[threading.Thread, list[str]]:
    """Read a traffic loop's lines as they come (a full pipe would stall the loop); with
    `stamps`, the monotonic time each line arrived."""
    lines: list[str] = []
    assert proc.stdout is not None

    def read() -> None:
        for line in proc.stdout or ():
            lines.append(line)
            if stamps is not None:
                stamps.append(time.monotonic())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, lines


def count(lines: list[str]) -> tuple[int, list[str]]:
    """(answers from west, failed calls' lines)."""
    ok, failed = 0, []
    for line in filter(None, (x.strip() for x in lines)):
        try:
            ok += json.loads(line)["cluster"] == "west"
        except (ValueError, KeyError, TypeError):
            failed.append(line)
    return ok, failed


@dataclass
class Run:
    """The calls of one traffic loop around a fault: each line and when it arrived."""

    lines: list[str]
    stamps: list[float]  # monotonic arrival of each of `lines`
    fault_at: float  # monotonic time the fault began

    def failures(self) -> tuple[list[str], list[float]]:
        """The failed calls' lines, and seconds after the fault each arrived."""
        failed = [(x, t) for x, t in zip(self.lines, self.stamps, strict=True) if count([x])[1]]
        return [x for x, _ in failed], [round(t - self.fault_at, 2) for _, t in failed]


def calls_after(lines: list[str], stamps: list[float], t: float) -> int:
    """How many calls (answered or failed) ended after monotonic time `t`."""
    return len([s for x, s in zip(lines, stamps, strict=False) if s > t and x.strip()])


def around(
    loop: Loop,
    seconds: float,
    fault: Callable[[], None],
    enough: Callable[[list[str], list[float], float], bool] | None = None,
) -> Run:
    """Run `fault` while `loop` flows; every line once the loop ended. With `enough(lines,
    stamps, fault_at)`, the loop is stopped once it holds (checked every 0.2 s)."""
    proc = loop.proc
    try:
        seen = flowing(proc, 5)
        stamps: list[float] = []
        thread, lines = drained(proc, stamps)
        fault_at = time.monotonic()
        fault()
        while enough is not None and proc.poll() is None:
            if enough(list(lines), list(stamps), fault_at):
                loop.stop()
                break
            time.sleep(0.2)
        proc.wait(timeout=seconds + 30)
        thread.join(timeout=10)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    assert proc.stdout is not None
    proc.stdout.close()
    return Run([*seen, *lines], [fault_at] * len(seen) + stamps, fault_at)
