"""`fedgate gateway --workers N`: a small supervisor running N gateway worker processes, one
event loop each, sharing the TCP listeners (tls, passthrough, egress) with SO_REUSEPORT; only
worker 0 serves QUIC (a UDP port cannot be shared: a datagram would reach the wrong worker).
Worker i serves its admin port (and `--metrics-listen`) at the given port + i x
`--worker-port-step` (1 by default; pick a step that clears the other ports of the host).

Liveness, with Kubernetes' semantics (period, failure threshold), per worker:
* the supervisor sends a probe every `liveness_period` over a socketpair the worker inherits
  (`--liveness-fd`); the worker's event loop echoes it (`answer_liveness`). A heartbeat pipe or
  a loopback admin endpoint per worker would do too; a socketpair is a real request/response
  probe of the loop that serves the calls (a wedged loop does not answer, a timer thread would),
  needs no port per worker (the admin ports stay the operator's), nobody else can reach it, and
  its EOF tells a worker its supervisor died, so no worker outlives it;
* probes are counted by `gateway.health.ProbeHealth` (a probe not answered by the next one is
  a miss); `liveness_failures` consecutive misses: the worker is SIGKILLed and restarted;
  until its first answer (start-up: imports, identity, config) only `startup_timeout` applies;
* a worker that exits is restarted too, after `RestartBackoff` (none for the first restart;
  doubling for each one that follows a short life, capped); every kill, exit and restart is
  logged with its reason;
* SIGTERM or SIGINT to the supervisor: SIGTERM to every worker, which drains
  (`fedgate.processes`: `Gateway.drain`), SIGKILL to those still running after `stop_grace`.
When a wedged worker is killed, the kernel closes its listening sockets and hands new
connections only to the live workers: that is how peers and sidecars stop using it on a shared
address, as Kubernetes removes a pod that fails its liveness probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from gateway.health import HealthSettings, ProbeHealth

_log = structlog.get_logger("fedgate.workers")
_PROBE = struct.Struct("!I")
_STARTUP = 0  # the probe id sent until the worker first answers (not counted)


@dataclass(frozen=True, slots=True)
class SupervisorSettings:
    workers: int
    liveness_period: float = 1.0
    liveness_failures: int = 3
    startup_timeout: float = 60.0  # first answer expected within (a start fetches identity)
    stop_grace: float = 15.0
    restart_first: float = 0.5  # seconds before the second quick restart in a row
    restart_longest: float = 10.0
    stable_after: float = 30.0  # a worker that lived this long resets the backoff

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.liveness_period <= 0:
            raise ValueError(f"--liveness-period must be > 0 seconds, got {self.liveness_period}")
        if self.liveness_failures < 1:
            raise ValueError(
                f"--liveness-failures must be at least 1, got {self.liveness_failures}"
            )


class RestartBackoff:
    """How long to wait before restarting a worker that ended. Pure: times passed in."""

    def __init__(self, first: float, longest: float, stable_after: float) -> None:
        self._first = first
        self._longest = longest
        self._stable_after = stable_after
        self._streak = 0  # restarts in a row after short lives

    def delay(self, started: float, ended: float) -> float:
        if ended - started >= self._stable_after:
            self._streak = 0
        streak, self._streak = self._streak, self._streak + 1
        if streak == 0:
            return 0.0
        return float(min(self._longest, self._first * 2 ** (streak - 1)))


WorkerArgv = Callable[[int, int], Sequence[str]]  # (worker index, liveness fd) -> argv


class _Worker:
    def __init__(self, index: int, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self.index = index
        self.proc = proc
        self.sock = sock
        self.started = time.monotonic()
        self.live = False  # answered a probe since it started
        self.health: ProbeHealth | None = None
        self._buffer = b""

    def readable(self, settings: HealthSettings) -> None:
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.sock)
            return
        self._buffer += data
        now = time.monotonic()
        while len(self._buffer) >= _PROBE.size:
            (probe,) = _PROBE.unpack_from(self._buffer)
            self._buffer = self._buffer[_PROBE.size :]
            if not self.live:
                self.live = probe == _STARTUP
                if self.live:
                    self.health = ProbeHealth(settings)
                    # From here on liveness counts; before, only the start-up timeout does.
                    _log.info(
                        "worker live",
                        worker=self.index,
                        pid=self.proc.pid,
                        after_s=round(now - self.started, 3),
                    )
            elif self.health is not None:
                self.health.answered(probe, now)

    def send(self, probe: int) -> None:
        with contextlib.suppress(OSError):  # a full buffer or a dead worker: a miss
            self.sock.send(_PROBE.pack(probe))

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.sock)
        self.sock.close()


class Supervisor:
    def __init__(self, settings: SupervisorSettings, argv: WorkerArgv) -> None:
        self.settings = settings
        self._argv = argv
        self._log = _log
        self._health = HealthSettings(
            probe_interval=settings.liveness_period,
            unhealthy_threshold=settings.liveness_failures,
        )
        self._stopping = asyncio.Event()
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0

    async def run(self) -> None:
        """Until SIGTERM/SIGINT (or `stop()`), then stop the workers."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        self._log.info("supervisor started", workers=self.settings.workers, pid=os.getpid())
        try:
            async with asyncio.TaskGroup() as tg:
                for i in range(self.settings.workers):
                    tg.create_task(self._keep(i), name=f"worker-{i}")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        self._log.info("supervisor stopped")

    def stop(self) -> None:
        self._stopping.set()

    async def _keep(self, index: int) -> None:
        s = self.settings
        backoff = RestartBackoff(s.restart_first, s.restart_longest, s.stable_after)
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                worker = await self._spawn(index)
            except OSError as e:  # e.g. out of processes: retried like an exit
                reason, pid = f"could not start: {e}", None
            else:
                reason = await self._watch(worker)
                worker.close()
                del self.workers[index]
                started, pid = worker.started, worker.proc.pid
            if self._stopping.is_set():
                break
            delay = backoff.delay(started, time.monotonic())
            self._log.warning(
                "worker restarting", worker=index, pid=pid, reason=reason, delay=delay
            )
            self.restarts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(index, theirs.fileno()), pass_fds=(theirs.fileno(),)
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = _Worker(index, proc, ours)
        asyncio.get_running_loop().add_reader(ours, worker.readable, self._health)
        self.workers[index] = worker
        self._log.info("worker started", worker=index, pid=proc.pid)
        return worker

    async def _watch(self, worker: _Worker) -> str:
        """Probe until the worker ends (or the supervisor stops); returns why it ended."""
        s = self.settings
        exited = asyncio.ensure_future(worker.proc.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        worker.send(_STARTUP)  # answered as soon as its loop runs: the worker is live from then
        try:
            while True:
                await asyncio.wait(
                    [exited, stopping], timeout=s.liveness_period, return_when="FIRST_COMPLETED"
                )
                if exited.done():
                    return f"exited with code {exited.result()}"
                if stopping.done():
                    return await self._terminate(worker, exited)
                now = time.monotonic()
                health = worker.health
                if health is None:
                    if now - worker.started > s.startup_timeout:
                        why = f"no liveness answer within {s.startup_timeout:g}s of its start"
                        return await self._kill(worker, exited, why)
                    worker.send(_STARTUP)
                    continue
                probe = health.tick(now)  # counts the unanswered one as a miss
                if health.consecutive_misses >= s.liveness_failures:
                    why = (
                        f"{health.consecutive_misses} liveness probes unanswered"
                        f" (period {s.liveness_period:g}s)"
                    )
                    return await self._kill(worker, exited, why)
                worker.send(probe)
        finally:
            stopping.cancel()

    async def _kill(self, worker: _Worker, exited: asyncio.Future[int], why: str) -> str:
        self._log.warning(
            "worker not live, killing it", worker=worker.index, pid=worker.proc.pid, reason=why
        )
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()
        await exited
        return f"killed: {why}"

    async def _terminate(self, worker: _Worker, exited: asyncio.Future[int]) -> str:
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGCONT)  # a stopped worker cannot act on SIGTERM
            worker.proc.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(exited), self.settings.stop_grace)
        except TimeoutError:
            return await self._kill(
                worker, exited, f"still running {self.settings.stop_grace:g}s after SIGTERM"
            )
        self._log.info("worker stopped", worker=worker.index, code=exited.result())
        return "stopped"


def answer_liveness(fd: int) -> None:
    """Worker side: echo the supervisor's probes from this event loop; on EOF (the supervisor
    is gone) stop as on SIGTERM."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)

    def readable() -> None:
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sock)
            _log.warning("supervisor gone, stopping")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        with contextlib.suppress(BlockingIOError):
            sock.send(data)  # answered by the loop that serves the calls

    loop.add_reader(sock, readable)


def worker_argv(
    base: Sequence[str], index: int, fd: int, admin: str, metrics_listen: str, step: int = 1
) -> list[str]:
    """A worker's command line: the gateway's own options, with its admin (and metrics) port
    offset by `index * step`, the shared TCP listeners, QUIC on worker 0 only."""
    argv = [*base, "--admin", _offset(admin, index * step), "--reuse-port"]
    argv += ["--liveness-fd", str(fd), "--worker-index", str(index)]
    if metrics_listen:
        argv += ["--metrics-listen", _offset(metrics_listen, index * step)]
    if index > 0:
        argv.append("--no-quic")
    return argv


def _offset(hostport: str, offset: int) -> str:
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"{hostport!r} is not host:port")
    if int(port) + offset > 65535:
        raise ValueError(f"{hostport}: port {int(port)} + {offset} is past 65535")
    return f"{host}:{int(port) + offset}"
