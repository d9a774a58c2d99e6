"""West's catalog from the Kubernetes source, on the namespace rig, with the faithful fake API
server (tests/kubefake) as west's API server (issue 13).

The rig of this module (its own prefix, `<FEDGATE_TEST_RIG_PREFIX>k`) starts west's agent with
`--source kubernetes --kubeconfig` (bringup's `kube_api`), so west's exports.json is never read:
west's echo is known only from the Service, ServiceExport, Pod and EndpointSlice the fake holds,
at the address the rig's plan gives west's echo-1 pod. East stays on its exports.json.

Where the fake listens: in this test process (the test edits and reads its store directly), but
with its listening socket inside west's cluster netns, on 127.0.0.1 there. The agent runs in
that netns, so it reaches the server as an agent reaches a private API endpoint, and nothing of
the rig is reachable from the root namespace anyway (DESIGN: traffic stays inside the rig's
namespaces or loopback). setns(2) moves only the calling thread, so one short-lived thread
enters the netns and binds; the sockets accepted there stay in it.

Identity: with the Kubernetes source west's CA checks every join token with TokenReview, so the
fake answers TokenReview from the rig's tokens.json of west (each join token stands in for a
projected ServiceAccount token with audience `fedgate`, for the account the rig granted it).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clusters import source
from clusters.rig import bringup, lifecycle, topology
from fedgate.demo import curl_many
from tests.clusters.kube_objects import endpoint, endpoint_slice, pod, service, service_export
from tests.clusters.kube_rig import write_kubeconfig
from tests.e2e.conftest import PREFIX, _why_no_rig, rig_command
from tests.helpers import until_sync
from tests.kubefake import FakeKubeAPI
from tests.kubefake.fake import TokenIdentity
from tests.kubefake.resources import (
    ENDPOINTSLICES,
    PODS,
    SERVICEEXPORTS,
    SERVICEIMPORTS,
    SERVICES,
)
from tests.kubefake.store import StoreError

pytestmark = pytest.mark.rig

KUBE_PREFIX = (PREFIX[:7] + "k") if len(PREFIX) >= 8 else PREFIX + "k"
NS, SVC, POD = bringup.DEMO_NAMESPACE, "echo", "echo-1"
SLICE = "echo-x7k2p"  # the EndpointSlice controller's generateName style
ECHO = f"http://{SVC}.{NS}.svc.clusterset.local:{bringup.ECHO_PORT}/"
# Bring-up adds each cluster's pods in this order: client (index 0), then echo-1 (index 1).
ECHO_POD_INDEX = 1
WEST = topology.index_of_cluster("west")
WITHIN = 30.0
STOP_NEW_CALLS = 1.0  # issue 13: east stops sending west new calls within 1 s

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def start_in_netns(api: FakeKubeAPI, netns: str) -> None:
    """Start the fake with its listener inside `netns` (see the module docstring)."""
    failure: list[BaseException] = []

    def enter_and_start() -> None:
        try:
            with open(f"/run/netns/{netns}", "rb") as f:
                if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            api.start()
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=enter_and_start, name=f"kubefake-enter-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def rig_tokens(path: Path) -> Callable[[str], TokenIdentity | None]:
    """TokenReview answers from the rig's tokens.json (read at each review: it grows)."""

    def lookup(token: str) -> TokenIdentity | None:
        grant = source.read_tokens(path).get(token)
        if grant is None:
            return None
        account = f"system:serviceaccount:{grant.namespace}:{grant.service_account}"
        return TokenIdentity(account, ("fedgate",))

    return lookup


def describe_west_echo(api: FakeKubeAPI, address: str) -> None:
    """What a real west would hold for its echo pod: exported, one ready endpoint."""
    s = api.store
    s.create(SERVICES, service(SVC, ("http", bringup.ECHO_PORT, "http"), ns=NS))
    s.create(SERVICEEXPORTS, service_export(SVC, ns=NS))
    uid = s.create(PODS, pod(POD, SVC, ns=NS, app=SVC))["metadata"]["uid"]
    s.create(
        ENDPOINTSLICES, endpoint_slice(SLICE, SVC, endpoint(address, POD, uid=uid, ns=NS), ns=NS)
    )


def set_ready(api: FakeKubeAPI, ready: bool) -> None:
    """What the EndpointSlice controller writes when the pod's readiness probe changes."""
    obj = api.store.get(ENDPOINTSLICES, NS, SLICE)
    conditions = {"ready": ready, "serving": ready, "terminating": False}
    obj["endpoints"][0]["conditions"] = conditions
    api.store.update(ENDPOINTSLICES, obj)


@pytest.fixture(scope="module")
def kube_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FakeKubeAPI]]:
    reason = _why_no_rig()
    if reason is not None:
        pytest.skip(reason)
    rig_dir = tmp_path_factory.mktemp("kuberig")
    lifecycle.down(rig_dir, KUBE_PREFIX)
    api = FakeKubeAPI(token_lookup=rig_tokens(source.tokens_path(rig_dir, "west")))
    echo_ip = topology.pod(KUBE_PREFIX, WEST, ECHO_POD_INDEX, POD).ip
    describe_west_echo(api, echo_ip)

    def west_api(netns: str) -> Path:
        start_in_netns(api, netns)
        return write_kubeconfig(rig_dir / "west.kubeconfig", api.url)

    try:
        bringup.up(
            rig_dir,
            2,
            rig_command(),
            prefix=KUBE_PREFIX,
            progress=lambda m: None,
            kube_api={"west": west_api},
        )
        record = lifecycle.load(rig_dir).pod("west", POD)
        assert record is not None
        assert record.ip == echo_ip
        yield rig_dir, api
    finally:
        lifecycle.down(rig_dir, KUBE_PREFIX)
        api.stop()


def west_endpoints(rig: Path, pod_name: str) -> list[dict[str, str]]:
    """West's endpoints of echo.demo in the config of east's `pod_name` sidecar."""
    seen = bringup.endpoints_seen(bringup.sidecar_config(rig, "east", pod_name), SVC, NS)
    return [e for e in seen if e.get("cluster") == "west"]


def test_east_client_reaches_west_echo_known_only_from_the_api(
    kube_rig: tuple[Path, FakeKubeAPI],
) -> None:
    rig, api = kube_rig
    agent = lifecycle.load(rig).process("west-agent")
    assert agent is not None
    assert "--exports" not in agent.argv
    assert "--tokens" not in agent.argv
    assert agent.argv[agent.argv.index("--source") + 1] == "kubernetes"
    # West's agent listed and watches all four resources; its CA reviewed the join tokens of
    # west's gateway and pods (TokenReview, not tokens.json).
    for plural in ("serviceexports", "services", "endpointslices", "pods"):
        assert api.list_requests(plural), plural
        assert api.watch_requests(plural), plural
    reviews = [q for q in api.requests if q.path.endswith("/tokenreviews")]
    assert len(reviews) >= 3  # gateway, client, echo-1
    [ep] = west_endpoints(rig, "client")
    assert ep["address"] == topology.pod(KUBE_PREFIX, WEST, ECHO_POD_INDEX, POD).ip
    assert ep["identity"] == f"spiffe://west.fedgate.local/ns/{NS}/sa/{SVC}"
    # Local 70 / remote 30: 40 calls all staying in east happen with p = 0.7^40 < 1e-6.
    counts, failures = curl_many(rig, "east/client", ECHO, 40)
    print(f"40 calls from east/client: {dict(counts)}")
    assert failures == 0
    assert counts["west"] > 0


# A bounded load loop run in east/client: one new connection per call, each printed as
# [monotonic start, serving cluster or "failed: ..."], until stdin closes (or 60 s pass).
# CLOCK_MONOTONIC is the same in every network namespace, so starts compare with the test's.
LOAD = r"""
import http.client, json, socket, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
vip = socket.gethostbyname(host)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
deadline = time.monotonic() + 60
while not stop.is_set() and time.monotonic() < deadline:
    started = time.monotonic()
    conn = http.client.HTTPConnection(vip, port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host})
        answer = conn.getresponse()
        body = answer.read()
        served = json.loads(body)["cluster"] if answer.status == 200 else f"failed: {answer.status}"
    except Exception as e:
        served = f"failed: {e!r}"
    finally:
        conn.close()
    print(json.dumps([started, served]), flush=True)
"""


class Load:
    """`LOAD` in east/client, its calls collected as they are printed."""

    def __init__(self, rig: Path) -> None:
        record = lifecycle.load(rig).pod("east", "client")
        assert record is not None
        host = f"{SVC}.{NS}.svc.clusterset.local"
        argv = [sys.executable, "-c", LOAD, host, str(bringup.ECHO_PORT)]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", record.netns, *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.calls: list[tuple[float, str]] = []

    def _take(self, line: str) -> None:
        started, served = json.loads(line)
        self.calls.append((float(started), str(served)))

    def read_until(self, check: Callable[[list[tuple[float, str]]], bool], what: str) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + WITHIN
        while not check(self.calls):
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} within {WITHIN:.0f} s: {self.calls[-5:]}"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            line = self.proc.stdout.readline() if ready else ""
            assert line or not ready, f"the load loop ended early: {self.calls[-5:]}"
            if line:
                self._take(line)

    def stop(self) -> list[tuple[float, str]]:
        try:
            out, _ = self.proc.communicate("", timeout=15)  # closes stdin: the loop ends
        except subprocess.TimeoutExpired:
            self.proc.kill()  # `ip netns exec` exec'd the loop: this pid is the loop
            out, _ = self.proc.communicate()
        for line in out.splitlines():
            self._take(line)
        return self.calls


def test_a_not_ready_endpoint_gets_no_new_calls_from_east_within_a_second(
    kube_rig: tuple[Path, FakeKubeAPI],
) -> None:
    rig, api = kube_rig
    load = Load(rig)
    try:
        load.read_until(lambda calls: any(c == "west" for _, c in calls), "call served by west")
        changed = time.monotonic()
        set_ready(api, False)
        # Each east sidecar's config, polled together until neither lists west's endpoint.
        dropped: dict[str, float] = {}
        deadline = changed + WITHIN
        while len(dropped) < 2:
            assert time.monotonic() < deadline, f"east still routes to west: {dropped}"
            for sidecar in ("client", POD):
                if sidecar not in dropped and not west_endpoints(rig, sidecar):
                    dropped[sidecar] = time.monotonic() - changed
        # Calls for well past the bound, to see that none of them goes to west.
        load.read_until(
            lambda calls: bool(calls) and calls[-1][0] > changed + 2 * STOP_NEW_CALLS,
            "calls 2 s after the change",
        )
    finally:
        calls = load.stop()
    try:
        failed = [c for c in calls if c[1].startswith("failed")]
        to_west = [t - changed for t, c in calls if c == "west" and t >= changed]
        after_bound = [c for t, c in calls if t >= changed + STOP_NEW_CALLS]
        last = max(to_west, default=None)
        print(
            f"west's endpoint marked not ready: east/client's sidecar dropped it after "
            f"{dropped['client']:.3f} s, east/{POD}'s after {dropped[POD]:.3f} s; calls east/"
            f"client started after the change: {len(to_west)} to west (the last "
            + (f"{last:.3f} s after it)" if last is not None else "none)")
            + f", {len([t for t, _ in calls if t >= changed]) - len(to_west)} to east"
        )
        assert not failed, failed[:5]
        assert max(dropped.values()) < STOP_NEW_CALLS, dropped
        assert last is None or last < STOP_NEW_CALLS, to_west
        assert len(after_bound) >= 5, after_bound
        assert set(after_bound) == {"east"}, after_bound
    finally:
        set_ready(api, True)
        bringup.wait_routes(rig, SVC, NS, 2)


def stored(api: FakeKubeAPI, res: Any, name: str) -> dict[str, Any] | None:
    try:
        return api.store.get(res, NS, name)
    except StoreError:
        return None


def test_service_import_and_export_conditions_are_written_back_to_the_api(
    kube_rig: tuple[Path, FakeKubeAPI],
) -> None:
    rig, api = kube_rig
    services = bringup.sidecar_config(rig, "east", "client")["snapshot"]
    assert isinstance(services, dict)
    [echo] = [s for s in services["services"] if (s["namespace"], s["name"]) == (NS, SVC)]
    assert echo["vip"]

    def written() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        return stored(api, SERVICEIMPORTS, SVC), stored(api, SERVICEEXPORTS, SVC)

    def complete(got: tuple[dict[str, Any] | None, dict[str, Any] | None]) -> bool:
        imp, exp = got
        return (
            imp is not None
            and (imp.get("spec") or {}).get("ips") is not None
            and (imp.get("status") or {}).get("clusters") is not None
            and exp is not None
            and len((exp.get("status") or {}).get("conditions") or []) == 2
        )

    imp, exp = until_sync(written, WITHIN, check=complete, what="ServiceImport and conditions")
    assert imp is not None
    assert exp is not None
    print(f"ServiceImport {NS}/{SVC}: {json.dumps(imp['spec'])} {json.dumps(imp['status'])}")
    assert imp["spec"] == {
        "type": "ClusterSetIP",
        "ips": [echo["vip"]],
        # The merged ports: east's exports.json and west's Service agree on http 8080 (HTTP).
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
    }
    assert imp["status"] == {"clusters": [{"cluster": "east"}, {"cluster": "west"}]}
    assert imp["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "fedgate"}
    managers = {m["manager"] for m in imp["metadata"]["managedFields"]}
    assert managers == {"fedgate"}
    conditions = {c["type"]: c for c in exp["status"]["conditions"]}
    print(f"ServiceExport {NS}/{SVC} conditions: {json.dumps(list(conditions.values()))}")
    assert (conditions["Valid"]["status"], conditions["Valid"]["reason"]) == ("True", "Merged")
    assert (conditions["Conflict"]["status"], conditions["Conflict"]["reason"]) == (
        "False",
        "NoConflict",
    )
