"""The rig behaves like Kubernetes: dead processes restart with backoff (never a stopped one,
never one stopped on purpose), `down` stops the supervisor first and removes etcd's data, and
overlapping pod CIDRs give two clusters the same pod addresses without mixing them up.

The backoff maths runs on a fake clock; the supervisor runs against real processes in real
namespaces (needs root), once through `supervisor.step` (deterministic times) and once as the
real `fedgate rig supervise` process.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from clusters.rig import lifecycle, netns, procs, restart, supervisor, topology
from clusters.rig import state as rigstate
from clusters.rig.cmd import run_in
from clusters.rig.errors import RigError
from clusters.rig.restart import Backoff, RestartPolicy
from tests.clusters.test_rig_netns import _skip_reason
from tests.helpers import until_sync

PREFIX = "fgp"
FEDGATE = (sys.executable, "-m", "fedgate")


def test_backoff_doubles_to_its_cap_and_resets_after_a_long_run() -> None:
    policy = RestartPolicy("Always", backoff_max=10.0, backoff_base=1.0)
    assert [policy.delay(n) for n in range(7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    b = Backoff(policy)
    b.on_start("gw", 0.0)
    now, waits = 1.0, []
    for _ in range(5):  # crashes right after each start
        due = b.on_death("gw", now)
        assert b.on_death("gw", now + 0.1) == due  # seen dead again: the same due time
        waits.append(due - now)
        now = due
        b.on_start("gw", now)
        now += 0.5
    assert waits == [0.0, 1.0, 2.0, 4.0, 8.0]
    # Ran 2 x cap since its last start: healthy again, restarted at once.
    assert b.on_death("gw", now + policy.reset_after) == now + policy.reset_after
    b.forget("gw")
    assert b.names() == set()


def test_policies_are_validated_and_never_is_the_library_default(tmp_path: Path) -> None:
    assert restart.load(tmp_path) == restart.NO_RESTARTS
    assert not restart.NO_RESTARTS.restarts
    with pytest.raises(RigError, match="OnFailure"):
        RestartPolicy("OnFailure")
    with pytest.raises(RigError, match="backoff"):
        RestartPolicy("Always", backoff_max=0.5, backoff_base=1.0)
    restart.save(tmp_path, RestartPolicy("Always", backoff_max=3.0))
    assert restart.load(tmp_path) == RestartPolicy("Always", backoff_max=3.0)


def test_overlap_and_restarts_survive_the_state_file_and_older_files_still_load() -> None:
    s = rigstate.RigState(prefix="fgp")
    for index in range(3):
        s = rigstate.with_cluster(s, topology.cluster("fgp", index, topology.pod_net(index, True)))
    s, west = rigstate.allocate_pod(s, "west", "a")
    s, north = rigstate.allocate_pod(s, "north", "a")
    assert west.ip == north.ip == "10.2.0.10"
    assert west.netns != north.netns
    dead = rigstate.ProcessRecord("gw", 10, "fgp-west", ("fedgate",), "/tmp/gw.log")
    s = rigstate.with_process(s, dead)
    s = rigstate.with_restarted(s, 10, replace(dead, pid=11))
    assert [(p.pid, p.restarts) for p in s.processes] == [(11, 1)]
    again = rigstate.from_json(rigstate.to_json(s))
    assert again == s
    assert again.plan("north").pod_subnet == "10.2.0.0/24"
    old = rigstate.to_dict(s)
    for c in old["clusters"]:
        del c["pod_net"]
    for p in old["processes"]:
        del p["restarts"]
    before = rigstate.from_dict(old)  # a state written before these fields existed
    assert before.plan("east").pod_subnet == "10.1.0.0/24"
    assert before.processes[0].restarts == 0


_REASON = _skip_reason()
rig = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture
def rigdir(tmp_path: Path) -> Iterator[Path]:
    netns.delete_all(PREFIX)  # a crashed earlier run may have left some behind
    d = tmp_path / "rig"
    try:
        yield d
    finally:
        lifecycle.down(d, PREFIX)
        netns.delete_all(PREFIX)


def _pid(rigdir: Path, name: str) -> int:
    record = lifecycle.load(rigdir).process(name)
    assert record is not None, name
    return record.pid


@rig
@pytest.mark.rig
def test_supervisor_restarts_the_dead_not_the_stopped_nor_the_removed(rigdir: Path) -> None:
    lifecycle.up(rigdir, 1, PREFIX)
    pod = lifecycle.add_pod(rigdir, "east", "a")
    for name in ("killed", "hung", "removed"):
        lifecycle.start_process(rigdir, name, pod.netns, ["sleep", "600"])
    restart.save(rigdir, RestartPolicy("Always", backoff_max=2.0, backoff_base=0.5))
    backoff = Backoff(restart.load(rigdir))
    assert supervisor.step(rigdir, backoff, 100.0) == []  # all running: nothing to do

    killed, hung = _pid(rigdir, "killed"), _pid(rigdir, "hung")
    os.kill(killed, signal.SIGKILL)
    os.kill(hung, signal.SIGSTOP)  # hung, not dead: the kubelet would need a liveness probe
    assert lifecycle.stop_process(rigdir, "removed") is True  # on purpose: stays stopped
    until_sync(lambda: not procs.alive(killed), what="the killed process gone")

    restarted = supervisor.step(rigdir, backoff, 101.0)
    assert [(r.name, r.restarts) for r in restarted] == [("killed", 1)]
    assert restarted[0].pid != killed
    assert procs.owned(restarted[0])
    assert _pid(rigdir, "hung") == hung
    assert lifecycle.load(rigdir).process("removed") is None

    # Dies again at once: the second restart waits the base backoff (0.5 s).
    os.kill(restarted[0].pid, signal.SIGKILL)
    until_sync(lambda: not procs.alive(restarted[0].pid), what="the restarted process gone")
    assert supervisor.step(rigdir, backoff, 101.1) == []
    again = supervisor.step(rigdir, backoff, 101.6)
    assert [(r.name, r.restarts) for r in again] == [("killed", 2)]
    os.kill(hung, signal.SIGCONT)


@rig
@pytest.mark.rig
def test_the_supervisor_process_restarts_and_down_stops_it_and_removes_etcd_data(
    rigdir: Path,
) -> None:
    lifecycle.up(rigdir, 1, PREFIX)
    pod = lifecycle.add_pod(rigdir, "east", "a")
    lifecycle.start_process(rigdir, "worker", pod.netns, ["sleep", "600"])
    restart.save(rigdir, RestartPolicy("Always", backoff_max=2.0))
    sup = supervisor.start(rigdir, FEDGATE)
    data = lifecycle.etcd_data_dir(rigdir, "etcd")
    data.mkdir(parents=True)
    (data / "member").write_text("a previous rig's keys")

    first = _pid(rigdir, "worker")
    os.kill(first, signal.SIGKILL)
    record = until_sync(
        lambda: lifecycle.load(rigdir).process("worker"),
        15,
        check=lambda r: r is not None and r.pid != first and procs.owned(r),
        what="the worker restarted by the supervisor",
    )
    assert record is not None
    assert record.restarts == 1
    assert '"restarted"' in (rigdir / "logs" / "supervisor.log").read_text()

    lifecycle.down(rigdir)
    assert first not in procs.reap()  # the killed one was reaped by `down` (no zombie left)
    assert not procs.alive(sup)
    assert not procs.alive(record.pid)
    assert not data.exists()
    assert not supervisor.pid_path(rigdir).exists()


@rig
@pytest.mark.rig
def test_overlapping_pod_cidrs_give_north_west_s_addresses_in_its_own_network(
    rigdir: Path,
) -> None:
    state = lifecycle.up(rigdir, 3, PREFIX, pod_cidr_overlap=True)
    assert [(c.name, c.pod_subnet) for c in state.clusters] == [
        ("east", "10.1.0.0/24"),
        ("west", "10.2.0.0/24"),
        ("north", "10.2.0.0/24"),
    ]
    west = lifecycle.add_pod(rigdir, "west", "a")
    north = lifecycle.add_pod(rigdir, "north", "a")
    assert west.ip == north.ip == "10.2.0.10"
    # The same address in two clusters: each pod reaches its own cluster's listener, which
    # names itself, at the same bridge address.
    for c in ("west", "north"):
        plan = lifecycle.load(rigdir).plan(c)
        argv = [sys.executable, "-c", _ANSWER, plan.pod_gateway, c]
        lifecycle.start_process(rigdir, f"{c}-answer", plan.netns, argv)
    for pod, c in ((west, "west"), (north, "north")):
        plan = lifecycle.load(rigdir).plan(c)
        procs.wait_tcp(pod.netns, plan.pod_gateway, 18090, 10)
        got = run_in(pod.netns, [sys.executable, "-c", _ASK, plan.pod_gateway])
        assert got.strip() == c


_ANSWER = (
    "import socket, sys\n"
    "s = socket.create_server((sys.argv[1], 18090))\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(sys.argv[2].encode()); c.close()\n"
)
_ASK = (
    "import socket, sys\n"
    "c = socket.create_connection((sys.argv[1], 18090), timeout=5)\n"
    "print(c.recv(100).decode())\n"
)
