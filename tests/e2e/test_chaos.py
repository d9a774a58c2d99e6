"""Faults of issue 15 that cost callers nothing, on one rig shared by the module: the WAN between
two gateways dropped silently, an opaque TCP client while a remote gateway is SIGKILLed, and a
whole cluster killed.

The faults and the bounded client loops (one new connection per call, inside the client pod)
are `clusters/rig/faults.py`, the ones `bench/chaos.py` measures. Each test prints calls,
failed calls and the time to recover (fault to the last failed call). The module's rig has its
own prefix, `<FEDGATE_TEST_RIG_PREFIX>c`, restart policy Never (a killed process stays killed),
and the whole-cluster test runs last: it leaves west dead.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clusters.rig import bringup, control, faults, lifecycle, ready
from clusters.rig.errors import CommandError
from tests.e2e.conftest import PREFIX, _why_no_rig, rig_command
from tests.helpers import until_sync

pytestmark = pytest.mark.rig

CHAOS_PREFIX = (PREFIX + "c")[:8]
ECHO = f"http://echo.demo.svc.clusterset.local:{bringup.ECHO_PORT}/"
REDIS = "redis.demo.svc.clusterset.local"
RACE = 1.0  # seconds after a fault in which a call already on its way may still fail


@pytest.fixture(scope="module")
def chaos_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = _why_no_rig()
    if reason is not None:
        pytest.skip(reason)
    rig_dir = tmp_path_factory.mktemp("chaosrig")
    lifecycle.down(rig_dir, CHAOS_PREFIX)
    try:
        bringup.up(rig_dir, 2, rig_command(), prefix=CHAOS_PREFIX, progress=lambda m: None)
        faults.redis_in_both(rig_dir, rig_command())
        yield rig_dir
    finally:
        lifecycle.down(rig_dir, CHAOS_PREFIX)


def around(
    rig: Path,
    mode: str,
    target: str,
    seconds: float,
    fault: Callable[[], None],
    enough: Callable[[list[faults.Call], float], bool] | None = None,
) -> tuple[list[faults.Call], float]:
    """The calls of a `seconds` loop from east/client with `fault` run once 3 calls answered,
    and the wall-clock time the fault began. With `enough(calls, began)`, the loop is ended
    (after its call under way) as soon as the calls so far satisfy it."""
    load = faults.start_load(rig, "east", mode, target, seconds)
    assert load.stdout is not None
    try:
        first = [load.stdout.readline() for _ in range(3)]  # the load flows before the fault
        assert all(first), f"the load ended early: {first}"
        began = time.time()
        fault()
        lines = list(first)
        while enough is not None and (line := load.stdout.readline()):
            lines.append(line)
            if enough(faults.calls("".join(lines)), began):
                load.terminate()
                break
        rest, _ = load.communicate(timeout=seconds + 60)
    except BaseException:
        load.kill()
        load.communicate()
        raise
    return faults.calls("".join(lines) + rest), began


def went_on(seconds: float) -> Callable[[list[faults.Call], float], bool]:
    """Enough once calls went on `seconds` past the fault, 20 of them after `RACE` (asserted)."""

    def enough(got: list[faults.Call], began: float) -> bool:
        late = [c for c in got if c.t > began + RACE]
        return len(late) >= 20 and late[-1].t > began + seconds

    return enough


def report(what: str, got: list[faults.Call], began: float) -> list[faults.Call]:
    """Print the run's figures; its failed calls."""
    failed = [c for c in got if not c.ok]
    recovered = f"{max(c.t for c in failed) - began:.1f} s" if failed else "-"
    print(f"\n{what}: {len(got)} calls, {len(failed)} failed, recovered {recovered}", failed[:3])
    return failed


def unreachable(rig: Path) -> object:
    """The remote clusters east's client sidecar avoids now (its gateway's peer-health feed)."""
    status = ready.sidecar_config(rig, "east", "client")["status"]
    assert isinstance(status, dict)
    return status["peers_unreachable"]


def west_reachable(rig: Path) -> None:
    """Once east's sidecar no longer counts west unreachable (its gateway's probes passed)."""
    until_sync(
        lambda: unreachable(rig),
        30,
        what="west reachable from east again",
        interval=0.3,
        check=lambda down: down == [],
        ignoring=(CommandError,),
    )


def test_a_silently_dropped_wan_fails_no_call(chaos_rig: Path) -> None:
    """Issue 15: every packet between east's and west's WAN addresses dropped (no refusal, no
    reset: what a broken link looks like) for `hold` seconds, then healed while the calls go
    on: no call fails, with the client's own 5 s timeout.

    A call whose try went to west just after the drop waits for an answer: the reply to its
    new tunnel stream, or (most often: the sidecar pools its inner connections) the response
    to a request written on a stream opened before. East's gateway does not wait for 3 missed
    periodic probes (3-6 s, longer than the client's timeout): its connection, carrying
    streams and silent for `silence_timeout` (1 s), is probed at once and, unanswered within
    `suspect_timeout` (0.5 s), closed (`gateway.liveness`); the stream's reset is a connect
    failure, or an unanswered request on a pooled connection, which the sidecar retries on
    another cluster. A call that finds no connection yet (the load's first calls went local)
    waits for a dial at most `dial_wait` (2 s), not its 5 s handshake timeout. West is then
    unreachable for every sidecar of east (the peer-health feed) 1.4-3.5 s after the drop.
    Taking west back (by probes) costs no call."""
    hold, seconds = 6.0, 14.0
    healed: list[Callable[[], None]] = []
    began_at, healed_at, avoided_at = [time.time()], [0.0], [0.0]

    def drop() -> None:
        began_at[0] = time.time()
        healed.append(faults.wan_drop(chaos_rig))
        # The fault bites: a call finds the link silent and east's sidecars avoid west.
        until_sync(
            lambda: unreachable(chaos_rig),
            hold,
            what="west unreachable in east's sidecar",
            interval=0.1,
            check=lambda down: down == ["west"],
            ignoring=(CommandError,),
        )
        avoided_at[0] = time.time()
        print(f"west unreachable {avoided_at[0] - began_at[0]:.1f} s after the drop")
        time.sleep(max(0.0, began_at[0] + hold - time.time()))  # the fault's length
        healed.pop()()
        healed_at[0] = time.time()
        west_reachable(chaos_rig)  # taken back by the probes while the calls go on
        print(f"west reachable again {time.time() - healed_at[0]:.1f} s after the heal")

    try:
        got, began = around(chaos_rig, "http", ECHO, seconds, drop)
    finally:
        for heal in healed:
            heal()
    failed = report("WAN east-west dropped", got, began)
    assert failed == [], f"{len(failed)} failed: {failed[:3]}"
    assert len([c for c in got if began < c.t < avoided_at[0]]) >= 1  # calls met the fault
    assert len([c for c in got if c.t > healed_at[0] + 2]) >= 10  # calls went on after the heal


def test_new_tcp_connections_fail_none_a_second_after_a_remote_gateway_dies(
    chaos_rig: Path,
) -> None:
    """Issue 15: `redis-cli` (opaque TCP, 70 % local / 30 % remote, a new connection per
    call) while west's gateway is SIGKILLed. A failed dial to the dead gateway is retried
    elsewhere before the client's connection is answered; a connection racing the kill may
    fail, none started `RACE` seconds after it."""
    seconds = 15.0  # at most: the calls end once they went on two of the old 5 s rounds
    got, began = around(
        chaos_rig,
        "redis",
        REDIS,
        seconds,
        lambda: faults.kill("west-gateway")(chaos_rig),
        went_on(RACE + 2 * 5.0),
    )
    failed = report("west's gateway SIGKILLed, redis-cli", got, began)
    late = [c for c in failed if c.t > began + RACE]
    assert late == [], f"{len(failed)} failed: {failed[:3]}"
    assert len([c for c in got if c.t > began + RACE]) >= 20
    assert got[-1].t > began + RACE + 2 * 5.0  # the calls went on past the old 5 s rounds
    control.restart(chaos_rig, "west-gateway")
    west_reachable(chaos_rig)


def test_a_whole_cluster_killed_fails_only_calls_in_flight_and_leaves_routing_in_5_s(
    chaos_rig: Path,
) -> None:
    """Issue 15 ("what held"): every process of west (gateway, agent, sidecars, apps)
    SIGKILLed at once. Only calls already on their way there may fail, and east's sidecars
    count west unreachable (out of routing) within 5 s."""
    seconds = 15.0
    west = [p for p in lifecycle.load(chaos_rig).processes if p.name.startswith("west-")]
    assert {"west-gateway", "west-agent"} <= {p.name for p in west}
    out_at: list[float] = []

    def kill_west() -> None:
        for process in west:
            os.kill(process.pid, signal.SIGKILL)
        until_sync(
            lambda: unreachable(chaos_rig),
            10,
            what="west unreachable in east's sidecar",
            interval=0.1,
            check=lambda down: down == ["west"],
            ignoring=(CommandError,),
        )
        out_at.append(time.time())

    got, began = around(chaos_rig, "http", ECHO, seconds, kill_west, went_on(RACE + 2 * 5.0))
    failed = report("west killed whole", got, began)
    out_of_routing = out_at[0] - began
    print(f"west out of routing {out_of_routing:.1f} s after the kill")
    assert out_of_routing < 5.0
    late = [c for c in failed if c.t > began + RACE]
    assert late == [], f"{len(failed)} failed: {failed[:3]}"
    assert len([c for c in got if c.t > began + RACE]) >= 20
