"""Processes of the rig: start them detached inside a netns, stop them, wait until they serve.

`start` runs `ip netns exec NS argv...` in its own session (so the CLI that started it can exit,
and so `stop` can signal the whole process group), appends stdout and stderr to a log file and
optionally records the process in the rig state. Readiness checks run *inside* the netns (the
rig's addresses are only reachable there; nothing is ever sent from the root namespace).

This module does not decide what to run (the lead's CLI builds argv from `fedgate_cmd`) and does
not create namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ca.files import locked
from clusters.rig import state as rigstate
from clusters.rig.cmd import netns_exec_argv
from clusters.rig.errors import CommandError, RigError, WaitTimeoutError

NETNS_DIR = Path("/run/netns")
STOP_TIMEOUT = 3.0
POLL_INTERVAL = 0.1
LOG_TAIL_LINES = 20

# Popen objects of the processes this interpreter started: polling them reaps the zombie (and a
# Popen dropped while its child runs would warn); pids we did not start are probed with kill(0).
_children: dict[int, subprocess.Popen[bytes]] = {}

_TCP_CHECK = (
    "import socket, sys\n"
    "socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0).close()\n"
)


def start(
    name: str,
    netns: str,
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    *,
    state_file: Path | None = None,
) -> int:
    """Start `argv` inside `netns`, detached; return its pid.

    `env` is added to (not substituted for) this process's environment, so PATH and the venv
    still apply. With `state_file`, the process is recorded there under `name` (which must be
    unique in the rig), for `stop --all` style cleanup by a later CLI invocation.
    """
    if not argv:
        raise RigError(f"process {name!r}: empty argv")
    if not (NETNS_DIR / netns).exists():
        raise RigError(f"process {name!r}: netns {netns!r} does not exist")
    if state_file is None:
        return _spawn(name, netns, argv, log_path, env).pid
    with locked(state_file):
        current = rigstate.load(state_file)
        if current is None:
            raise RigError(f"process {name!r}: no rig state at {state_file}")
        if current.process(name) is not None:
            raise RigError(f"a process named {name!r} is already recorded in {state_file}")
        proc = _spawn(name, netns, argv, log_path, env)
        record = rigstate.ProcessRecord(
            name=name,
            pid=proc.pid,
            netns=netns,
            argv=tuple(argv),
            log_path=str(log_path),
            start_ticks=start_ticks(proc.pid),
        )
        rigstate.save(state_file, rigstate.with_process(current, record))
        return proc.pid


def _spawn(
    name: str, netns: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None
) -> subprocess.Popen[bytes]:
    full_argv = netns_exec_argv(netns, argv)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # JSON like every line the process writes after it (fedgate.native_logs).
        started = {
            "event": "rig starting process",
            "process": name,
            "argv": full_argv,
            "logger": "fedgate.rig",
            "level": "info",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        log.write(json.dumps(started).encode() + b"\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                full_argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=None if env is None else {**os.environ, **env},
            )
        except OSError as e:
            raise CommandError(full_argv, None, str(e)) from e
    _children[proc.pid] = proc
    return proc


def reap() -> list[int]:
    """Wait for every child of this interpreter that has exited; return their pids. A child
    killed and then replaced by the rig's supervisor is never polled by pid again: without
    this it stays a zombie, and its Popen warns "still running" when the interpreter exits."""
    done = [pid for pid, child in _children.items() if child.poll() is not None]
    for pid in done:
        del _children[pid]
    return done


def adopt(proc: subprocess.Popen[bytes]) -> None:
    """Track a child started elsewhere in this interpreter, so `alive` reaps it."""
    _children[proc.pid] = proc


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after its last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _signal(pid: int, sig: signal.Signals, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def terminate(pids: Iterable[int], timeout: float = STOP_TIMEOUT) -> list[int]:
    """SIGTERM every pid (its whole group when it leads one), SIGKILL what is left at timeout.

    Returns the pids that had to be killed. Callers must only pass pids the rig owns.
    """
    groups = {pid: _is_group_leader(pid) for pid in pids if alive(pid)}
    for pid, group in groups.items():
        _signal(pid, signal.SIGTERM, group)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in groups) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = [p for p in groups if alive(p)]
    for pid in killed:
        _signal(pid, signal.SIGKILL, groups[pid])
    deadline = time.monotonic() + 1.0
    while any(alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    return killed


def owned(record: rigstate.ProcessRecord) -> bool:
    """True if the recorded process still runs as the same process (its pid not recycled)."""
    if not alive(record.pid):
        return False
    return record.start_ticks is None or start_ticks(record.pid) == record.start_ticks


def stop(pid: int, timeout: float = STOP_TIMEOUT, *, state_file: Path | None = None) -> bool:
    """Stop `pid` (SIGTERM, then SIGKILL after `timeout`); True if it was running.

    With `state_file`, the pid's record supplies its start time, so a pid recycled since the
    record was written (after a crash or reboot) is left alone; the record is then removed.
    """
    record = None
    if state_file is not None:
        current = rigstate.load(state_file)
        if current is not None:
            record = next((p for p in current.processes if p.pid == pid), None)
    # With a record, a live pid whose start time differs is another process: not ours.
    was_running = owned(record) if record is not None else alive(pid)
    if state_file is not None and record is not None:
        # Unrecorded first: the rig's supervisor restarts only recorded processes, so one
        # stopped on purpose is never started again behind the caller's back.
        rigstate.update(state_file, lambda s: rigstate.without_process(s, pid))
    if was_running:
        terminate([pid], timeout)
    return was_running


def respawn(state_file: Path, name: str, dead_pid: int) -> rigstate.ProcessRecord | None:
    """Start the recorded process `name` again with its argv if it is still recorded as the
    dead `dead_pid`; return its new record (restarts + 1), or None if someone else (a stop, a
    manual restart) changed it first. Check and start happen under the state lock."""
    with locked(state_file):
        current = rigstate.load(state_file)
        record = current.process(name) if current is not None else None
        if current is None or record is None or record.pid != dead_pid or owned(record):
            return None
        proc = _spawn(name, record.netns, record.argv, Path(record.log_path), None)
        fresh = rigstate.ProcessRecord(
            name=name,
            pid=proc.pid,
            netns=record.netns,
            argv=record.argv,
            log_path=record.log_path,
            start_ticks=start_ticks(proc.pid),
        )
        updated = rigstate.with_restarted(current, dead_pid, fresh)
        rigstate.save(state_file, updated)
        return updated.process(name)


# --- readiness ----------------------------------------------------------------------------


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))  # the tail of a long log is at the end
            data = f.read()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def wait_tcp(
    netns: str,
    host: str,
    port: int,
    timeout: float,
    *,
    log_path: Path | None = None,
    pid: int | None = None,
    interval: float = POLL_INTERVAL,
) -> None:
    """Wait until a TCP connect to host:port succeeds from inside `netns`."""
    argv = [sys.executable, "-I", "-S", "-c", _TCP_CHECK, host, str(port)]
    _poll(netns, argv, f"TCP {host}:{port}", timeout, log_path, pid, interval)


def wait_http_ok(
    netns: str,
    url: str,
    timeout: float,
    *,
    log_path: Path | None = None,
    pid: int | None = None,
    interval: float = POLL_INTERVAL,
) -> None:
    """Wait until GET `url` answers 2xx from inside `netns` (curl, 1 s per attempt)."""
    # --noproxy: a proxy from the caller's environment must never see rig traffic.
    argv = ["curl", "-sSf", "-o", "/dev/null", "--noproxy", "*", "--max-time", "1", url]
    _poll(netns, argv, f"HTTP 2xx from {url}", timeout, log_path, pid, interval)


def _poll(
    netns: str,
    argv: list[str],
    what: str,
    timeout: float,
    log_path: Path | None,
    pid: int | None,
    interval: float,
) -> None:
    deadline = time.monotonic() + timeout
    last = "no attempt made"
    while True:
        try:
            done = subprocess.run(
                netns_exec_argv(netns, argv),
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=max(2.0, interval),
            )
            if done.returncode == 0:
                return
            last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            last = "check timed out"
        if pid is not None and not alive(pid):
            raise WaitTimeoutError(
                _describe(
                    f"process {pid} exited while waiting for {what} in netns {netns}",
                    last,
                    log_path,
                )
            )
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(
                _describe(
                    f"timed out after {timeout:g}s waiting for {what} in netns {netns}",
                    last,
                    log_path,
                )
            )
        time.sleep(interval)


def _describe(headline: str, last: str, log_path: Path | None) -> str:
    text = f"{headline}; last attempt: {last}"
    if log_path is not None:
        text += f"\n--- last {LOG_TAIL_LINES} lines of {log_path} ---\n{log_tail(log_path)}"
    return text
