"""`fedgate.workers`: the restart backoff and worker command lines (pure), and the supervisor
with real worker processes (`liveness_worker.py`) sharing a real TCP port: a SIGSTOPped worker
is SIGKILLed after `liveness_failures` unanswered probes and restarted; connections to the
shared port keep being answered; a worker that exits is restarted; stop() ends them all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from fedgate.workers import RestartBackoff, Supervisor, SupervisorSettings, worker_argv
from tests.helpers import free_port, until

WORKER = Path(__file__).with_name("liveness_worker.py")


def test_restart_backoff_is_immediate_once_then_doubles_and_resets_after_a_stable_life() -> None:
    b = RestartBackoff(first=0.5, longest=4.0, stable_after=30.0)
    assert b.delay(0, 1) == 0.0  # the first restart: at once
    assert [b.delay(0, 1) for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.delay(0, 31) == 0.0  # it had been up long enough: a fresh start


def test_worker_argv_offsets_ports_and_keeps_quic_on_worker_0() -> None:
    base = ["fedgate", "gateway", "--cluster", "east"]
    first = worker_argv(base, 0, 7, "127.0.0.1:15021", "10.0.0.1:15020", step=100)
    assert first[:4] == base
    assert "--no-quic" not in first
    assert first[first.index("--admin") + 1] == "127.0.0.1:15021"
    assert first[first.index("--liveness-fd") + 1] == "7"
    assert "--reuse-port" in first
    second = worker_argv(base, 1, 8, "127.0.0.1:15021", "", step=100)
    assert second[second.index("--admin") + 1] == "127.0.0.1:15121"
    assert "--metrics-listen" not in second
    assert "--no-quic" in second
    with pytest.raises(ValueError, match="past 65535"):
        worker_argv(base, 1, 8, "127.0.0.1:65535", "")
    with pytest.raises(ValueError, match="--workers"):
        SupervisorSettings(0)


async def who_answers(port: int) -> int | None:
    """The pid of the worker that answers a new connection (None: refused or no answer)."""
    writer = None
    try:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            line = await reader.readline()
            return int(line) if line else None
    except (OSError, TimeoutError, ValueError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def supervisor(port: int, exit_after: float = 0) -> AsyncIterator[Supervisor]:
    def argv(index: int, fd: int) -> list[str]:
        return [sys.executable, str(WORKER), str(fd), str(port), str(exit_after if index else 0)]

    sup = Supervisor(SupervisorSettings(2, stable_after=5.0), argv)
    task = asyncio.create_task(sup.run())
    try:
        yield sup
    finally:
        sup.stop()
        await asyncio.wait_for(task, 20)
    assert not sup.workers


async def test_a_stopped_worker_is_killed_and_restarted_while_the_port_keeps_answering() -> None:
    port = free_port()
    with capture_logs() as logs:
        async with supervisor(port) as sup:
            await until(
                lambda: len(sup.workers) == 2 and all(w.live for w in sup.workers.values()), 15
            )
            pids = {w.index: w.proc.pid for w in sup.workers.values()}
            answered = {await who_answers(port) for _ in range(40)}
            assert answered == set(pids.values())  # the kernel spreads them over both
            stopped = pids[1]
            t0 = time.monotonic()
            os.kill(stopped, signal.SIGSTOP)
            outcomes: list[tuple[float, int | None]] = []
            restarted_at = live_at = None
            while time.monotonic() - t0 < 7:  # bounded: one connection every 50 ms
                outcomes.append((time.monotonic() - t0, await who_answers(port)))
                w1 = sup.workers.get(1)
                if w1 is not None and w1.proc.pid != stopped:
                    restarted_at = restarted_at or time.monotonic() - t0
                    if live_at is None and w1.live:
                        live_at = time.monotonic() - t0
                await asyncio.sleep(0.05)
            kill = [e for e in logs if e["event"] == "worker not live, killing it"]
            assert [e["pid"] for e in kill] == [stopped]
            assert "3 liveness probes unanswered" in kill[0]["reason"]
            assert restarted_at is not None, "worker 1 was not restarted"
            assert live_at is not None, "the restarted worker never answered its probes"
            failed = [t for t, pid in outcomes if pid is None]
            print(
                f"\nsupervisor: worker SIGSTOPped; killed and restarted {restarted_at:.2f} s"
                f" after, answering probes at {live_at:.2f} s; {len(failed)} of {len(outcomes)}"
                f" new connections to the shared port unanswered, the last"
                f" {max(failed, default=0):.2f} s after the stop"
            )
            assert restarted_at <= 5.0
            # Only connections the stopped worker's socket took (its accept queue) fail, and
            # none once it is dead: the kernel hands new ones to the live workers.
            assert all(t < restarted_at for t in failed)
            assert all(pid in (pids[0], sup.workers[1].proc.pid) for t, pid in outcomes if pid)
            assert sum(1 for t, pid in outcomes if t > restarted_at and pid) >= 10


async def test_a_worker_that_exits_is_restarted_with_backoff() -> None:
    port = free_port()
    with capture_logs() as logs:
        async with supervisor(port, exit_after=0.5) as sup:
            await until(lambda: sup.restarts >= 3, 20)
            assert 0 in sup.workers  # worker 0 never exited
        restarts = [e for e in logs if e["event"] == "worker restarting" and e["worker"] == 1]
        assert all(e["reason"] == "exited with code 3" for e in restarts)
        delays = [e["delay"] for e in restarts[:3]]
        assert delays == [0.0, 0.5, 1.0]
