"""The rig's supervisor: the kubelet's restart loop for the processes the rig started.

`fedgate rig up --restart-policy Always` starts one supervisor (`fedgate rig supervise`) in the
root namespace once the rig is ready. Every `POLL` seconds it reads the state file; a recorded
process that is no longer running (`procs.owned`: a zombie counts as dead, a SIGSTOPped one
does not) is started again with its argv, in its netns, after the backoff of `restart.py`, and
its record gets the new pid and one more restart (`fedgate rig status` shows the count).
Processes added later (`rig run`, `rig add-pod`) are supervised too: the state is re-read.

A process stopped on purpose (`rig down`, `remove-pod`, `control.restart`) is unrecorded before
it is signalled, and `procs.respawn` re-checks the record under the state lock, so the
supervisor never races an operator. `lifecycle.down` stops the supervisor first. Its pid is in
`<rigdir>/supervisor.json`; its log (one JSON line per restart) in `logs/supervisor.log`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from clusters.rig import procs, restart
from clusters.rig import state as rigstate

POLL = 0.2
PID_FILE = "supervisor.json"
LOG_NAME = "supervisor.log"


def pid_path(rigdir: Path) -> Path:
    return rigdir / PID_FILE


def _log(rigdir: Path, event: str, **fields: object) -> None:
    line = {
        "event": event,
        "logger": "fedgate.rig.supervisor",
        "level": "info",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
    }
    with open(rigdir / "logs" / LOG_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def step(rigdir: Path, backoff: restart.Backoff, now: float) -> list[rigstate.ProcessRecord]:
    """One pass: restart every dead process whose backoff is over; return the new records."""
    current = rigstate.load(rigstate.state_file(rigdir))
    if current is None:
        return []
    started: list[rigstate.ProcessRecord] = []
    for name in backoff.names() - {p.name for p in current.processes}:
        backoff.forget(name)
    for record in current.processes:
        if procs.owned(record):
            continue
        due = backoff.on_death(record.name, now)
        if due > now:
            continue
        fresh = procs.respawn(rigstate.state_file(rigdir), record.name, record.pid)
        if fresh is None:  # stopped or restarted by someone else meanwhile: not our restart
            backoff.forget(record.name)
            continue
        backoff.on_start(record.name, now)
        started.append(fresh)
        _log(
            rigdir,
            "restarted",
            process=record.name,
            pid=fresh.pid,
            old_pid=record.pid,
            restarts=fresh.restarts,
        )
    return started


def run(rigdir: Path) -> None:
    """Supervise until SIGTERM/SIGINT or until the rig's state is gone; finishes the current
    pass first (never leaves a started process unrecorded)."""
    stopping: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    policy = restart.load(rigdir)
    backoff = restart.Backoff(policy)
    _log(rigdir, "supervising", policy=policy.policy, backoff_max=policy.backoff_max)
    state = rigstate.state_file(rigdir)
    while not stopping and state.exists():  # no state: the rig is gone, so is our work
        step(rigdir, backoff, time.monotonic())
        time.sleep(POLL)
    _log(rigdir, "stopped", signal=stopping[0] if stopping else None)


def start(rigdir: Path, fedgate: Sequence[str]) -> int:
    """Start the supervisor of the rig at `rigdir` (detached, in the root namespace)."""
    (rigdir / "logs").mkdir(parents=True, exist_ok=True)
    with open(rigdir / "logs" / LOG_NAME, "ab") as log:
        proc = subprocess.Popen(
            [*fedgate, "rig", "supervise", "--rig-dir", str(rigdir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    procs.adopt(proc)
    pid_path(rigdir).write_text(
        json.dumps({"pid": proc.pid, "start_ticks": procs.start_ticks(proc.pid)})
    )
    return proc.pid


def running(rigdir: Path) -> int | None:
    """The supervisor's pid while it runs (its recorded start time guards against reuse)."""
    try:
        data = json.loads(pid_path(rigdir).read_text())
        record = rigstate.ProcessRecord(
            "supervisor", int(data["pid"]), "", (), "", data.get("start_ticks")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record.pid if procs.owned(record) else None


def stop(rigdir: Path) -> bool:
    """Stop the rig's supervisor (before anything else is stopped); True if it was running."""
    pid = running(rigdir)
    if pid is not None:
        procs.terminate([pid])
    pid_path(rigdir).unlink(missing_ok=True)
    return pid is not None
