"""Three real `fedgate agent --source kubernetes` processes of one cluster, against the fake API
server and a real etcd: one is elected and alone publishes the cluster's keys, with the gateway
address its load balancer has; stopping it (SIGTERM: the Lease is released) hands over with
no gap in the cluster's keys, and killing the next (SIGKILL, no release) hands over with the
keys never missing for longer than the etcd lease TTL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ca.cadir import init_ca_dir
from ca.verify import utcnow
from federation import keys
from mesh.codec import cluster_from_json
from tests import helpers
from tests.ca.conftest import free_pair
from tests.clusters.kube_rig import write_kubeconfig
from tests.clusters.test_kube_gateway_service import NAME, NS, gateway_service, set_ingress
from tests.etcd_fixture import EtcdServer
from tests.helpers import free_port
from tests.kubefake import FakeKubeAPI
from tests.kubefake.resources import LEASES, SERVICES

pytestmark = pytest.mark.etcd

TD = "east.fedgate.test"
ETCD_TTL = 3


@contextlib.contextmanager
def agent_process(argv: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


def argv(tmp_path: Path, etcd: EtcdServer, api: FakeKubeAPI, identity: str) -> list[str]:
    return [
        *(sys.executable, "-m", "fedgate", "agent", "--cluster", "east"),
        *("--etcd", etcd.endpoint, "--ca-dir", str(tmp_path / "ca")),
        *("--ca-listen", free_pair(), "--source", "kubernetes"),
        *("--kubeconfig", str(write_kubeconfig(tmp_path / "kubeconfig", api.url))),
        *("--gateway-service", f"{NS}/{NAME}", "--gateway-egress", "127.0.0.1:15008"),
        *("--admin", f"127.0.0.1:{free_port()}", "--lease-ttl", str(ETCD_TTL)),
        *("--leader-elect-identity", identity, "--leader-elect-durations", "1.5,1,0.1"),
    ]


async def published(client: Any) -> tuple[str, int] | None:
    """(tunnel host, etcd lease) of the cluster's info key; None when it is absent."""
    found = await client.kv.get(keys.info_key("east"))
    if not found.kvs:
        return None
    gw = cluster_from_json(json.loads(found.kvs[0].value)).gateway
    assert gw is not None
    return gw.tunnel_host, int(found.kvs[0].lease)


async def hand_over(
    etcd: Any, holder: Callable[[], str], proc: subprocess.Popen[bytes], lease: int, sig: int
) -> tuple[int, float, float]:
    """Signal the leader `proc`; wait until the info key is on another etcd lease. Returns
    (the new lease, seconds until then, seconds the key was missing meanwhile)."""
    old_holder = holder()
    proc.send_signal(sig)
    start = last = time.monotonic()
    missing = 0.0
    while time.monotonic() - start < 30:
        now = await published(etcd)
        t = time.monotonic()
        if now is None:
            missing += t - last
        elif now[1] != lease:
            assert holder() not in ("", old_holder)
            return now[1], t - start, missing
        last = t
        await asyncio.sleep(0.05)  # (a poll interval)
    raise AssertionError("no replica took over the publishing")


async def test_agent_processes_elect_one_publisher_and_hand_over(
    tmp_path: Path, etcd_server: EtcdServer, etcd: Any
) -> None:
    init_ca_dir(tmp_path / "ca", TD, utcnow())  # the CA Secret every replica mounts
    with FakeKubeAPI() as api:
        api.store.create(SERVICES, gateway_service())
        set_ingress(api, {"hostname": "gw.east.example.com"})
        with contextlib.ExitStack() as stack:
            procs = {
                name: stack.enter_context(
                    agent_process(argv(tmp_path, etcd_server, api, name), tmp_path / f"{name}.log")
                )
                for name in ("agent-a", "agent-b", "agent-c")
            }

            def holder() -> str:
                spec = api.store.get(LEASES, NS, "fedgate-agent").get("spec") or {}
                return str(spec.get("holderIdentity") or "")

            async def info() -> tuple[str, int] | None:
                return await published(etcd)

            first: tuple[str, int] | None = await helpers.until(info, 60, what="a publish")
            assert first is not None
            assert first[0] == "gw.east.example.com"  # the load balancer's name, followed
            assert holder() in procs
            # A clean stop (rollout, drain): the Lease is released, the etcd lease abandoned,
            # and the next replica takes over within a few retry periods; no gap.
            lease, took, missing = await hand_over(
                etcd, holder, procs[holder()], first[1], signal.SIGTERM
            )
            print(f"SIGTERM: takeover after {took:.2f} s, keys missing {missing:.2f} s")
            assert missing == 0.0
            # A crash (no release, no revoke): the next replica waits out the 1.5 s (2 s, in
            # whole seconds) election lease; the keys may lapse only past the etcd lease TTL.
            _, took, missing = await hand_over(etcd, holder, procs[holder()], lease, signal.SIGKILL)
            print(f"SIGKILL: takeover after {took:.2f} s, keys missing {missing:.2f} s")
            assert missing <= ETCD_TTL
