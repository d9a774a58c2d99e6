"""The rig's pure parts: the topology's names and addresses, and the state file's round trip."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from clusters.rig import state as rigstate
from clusters.rig import topology
from clusters.rig.errors import StateError
from clusters.rig.topology import TopologyError


def test_cluster_names() -> None:
    assert topology.cluster_names(0) == ()
    assert topology.cluster_names(7) == (
        "east",
        "west",
        "north",
        "south",
        "central",
        "cluster5",
        "cluster6",
    )
    for i, name in enumerate(topology.cluster_names(topology.MAX_CLUSTERS)):
        assert topology.index_of_cluster(name) == i
    with pytest.raises(TopologyError):
        topology.cluster_names(topology.MAX_CLUSTERS + 1)
    for bad in ("cluster1", "cluster05", "cluster", "mars", f"cluster{topology.MAX_CLUSTERS}"):
        with pytest.raises(TopologyError):
            topology.index_of_cluster(bad)


@pytest.mark.parametrize("prefix", ["", "fg-t", "FG", "1fg", "toolongpx"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(TopologyError, match="prefix"):
        topology.wan_netns(prefix)


def test_addresses() -> None:
    assert topology.wan_netns("fg") == "fg-wan"
    ctl = topology.control("fg")
    assert (ctl.netns, ctl.ip, ctl.etcd_endpoint) == ("fg-ctl", "172.30.0.2", "172.30.0.2:2379")
    assert ctl.grpc_address == "172.30.0.2:15012"
    assert ctl.admin_address == "172.30.0.2:15014"

    west = topology.cluster("fgt", 1)
    assert west.name == "west"
    assert west.netns == "fgt-west"
    assert west.wan_ip == "172.30.0.11"
    assert west.pod_subnet == "10.2.0.0/24"
    assert west.pod_gateway == "10.2.0.1"
    assert west.tunnel_address == ("172.30.0.11", 15443)
    assert west.egress_address == ("10.2.0.1", 15008)
    assert west.agent_ca_address == ("10.2.0.1", 15013)
    assert west.agent_admin_address == ("127.0.0.1", 15022)
    assert west.gateway_admin_address == ("127.0.0.1", 15021)

    pod = topology.pod("fgt", 1, 3, "web")
    assert pod.netns == "fgt-west-web"
    assert pod.ip == "10.2.0.13"
    assert pod.gateway == "10.2.0.1"
    assert pod.sidecar_admin_address == ("127.0.0.1", 15000)


def test_interface_names_fit_the_kernel_limit() -> None:
    last = topology.MAX_CLUSTERS - 1
    names = [
        topology.cluster("fg", last).wan_peer,
        topology.control("fg").wan_peer,
        topology.pod("fg", last, topology.MAX_PODS_PER_CLUSTER - 1, "p").veth,
        topology.WAN_BRIDGE,
        topology.POD_BRIDGE,
    ]
    assert all(len(n) <= 15 for n in names), names
    # the last pod address and the last cluster's subnets are still valid octets
    last_pod = topology.pod("fg", last, topology.MAX_PODS_PER_CLUSTER - 1, "p")
    assert all(0 <= int(o) <= 255 for o in last_pod.ip.split("."))
    assert int(last_pod.ip.split(".")[-1]) <= 254


def test_pod_limits() -> None:
    with pytest.raises(TopologyError, match="pod index"):
        topology.pod("fg", 0, topology.MAX_PODS_PER_CLUSTER, "p")
    with pytest.raises(TopologyError, match="pod name"):
        topology.pod("fg", 0, 0, "Bad_Name")


def _state() -> rigstate.RigState:
    s = rigstate.RigState(prefix="fgt")
    s = rigstate.with_created(s, "netns", "fgt-wan")
    s = rigstate.with_cluster(s, topology.cluster("fgt", 0))
    s = rigstate.with_cluster(s, topology.cluster("fgt", 1))
    s, plan = rigstate.allocate_pod(s, "east", "a")
    s = rigstate.with_pod(s, plan, "shop", "payments")
    s, plan = rigstate.allocate_pod(s, "east", "b")
    s = rigstate.with_pod(s, plan, "shop", "cart")
    s = rigstate.with_process(
        s,
        rigstate.ProcessRecord(
            name="etcd",
            pid=4242,
            netns="fgt-ctl",
            argv=("etcd", "--data-dir", "/tmp/x"),
            log_path="/run/fedgate-rig/logs/etcd.log",
            start_ticks=12345,
        ),
    )
    return s


def test_allocation_never_reuses_an_address() -> None:
    s = _state()
    assert [(p.name, p.ip, p.veth) for p in s.pods] == [
        ("a", "10.1.0.10", "vp0"),
        ("b", "10.1.0.11", "vp1"),
    ]
    s = rigstate.without_pod(s, "east", "a")
    s, plan = rigstate.allocate_pod(s, "east", "a")
    assert plan.ip == "10.1.0.12"
    s, plan = rigstate.allocate_pod(s, "west", "a")  # the same name in another cluster is fine
    assert plan.ip == "10.2.0.10"
    assert dict(s.next_pod_index) == {"east": 3, "west": 1}


def test_state_rejects_duplicates_and_unknown_clusters() -> None:
    s = _state()
    with pytest.raises(StateError, match="already exists"):
        rigstate.allocate_pod(s, "east", "b")
    with pytest.raises(StateError, match="'north' is not in the rig"):
        rigstate.allocate_pod(s, "north", "x")
    with pytest.raises(StateError, match="already in the rig"):
        rigstate.with_cluster(s, topology.cluster("fgt", 0))
    with pytest.raises(StateError, match="already recorded"):
        rigstate.with_process(s, s.processes[0])
    assert rigstate.with_created(s, "netns", "fgt-wan") == s  # idempotent


def test_round_trip() -> None:
    s = _state()
    text = rigstate.to_json(s)
    assert rigstate.from_json(text) == s
    assert json.loads(text)["version"] == rigstate.FORMAT_VERSION
    s2 = rigstate.without_process(s, 4242)
    assert rigstate.from_json(rigstate.to_json(s2)).processes == ()


def test_next_pod_index_is_immutable() -> None:
    s = _state()
    with pytest.raises(TypeError):
        s.next_pod_index["east"] = 0  # type: ignore[index]


def _doc() -> dict[str, object]:
    doc: dict[str, object] = json.loads(rigstate.to_json(_state()))
    return doc


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("prefix"), "state.prefix: missing"),
        (lambda d: d.update(version=2), "state.version: 2 is not the supported"),
        (lambda d: d.update(clusters={}), "state.clusters: expected a list"),
        (lambda d: d["pods"][1].update(ip=10), r"state.pods\[1\].ip: expected a string"),
        (lambda d: d["pods"][0].update(index=True), r"state.pods\[0\].index: expected an int"),
        (lambda d: d["processes"][0].update(argv=["a", 1]), r"processes\[0\].argv\[1\]"),
        (lambda d: d["processes"][0].pop("pid"), r"processes\[0\].pid: missing"),
        (lambda d: d.update(next_pod_index={"east": -1}), r"next_pod_index.east"),
        (lambda d: d["created"].append("x"), r"state.created\[1\]: expected an object"),
    ],
)
def test_malformed_state_names_the_field(mutate: object, message: str) -> None:
    doc = _doc()
    assert callable(mutate)
    mutate(doc)
    with pytest.raises(StateError, match=message):
        rigstate.from_json(json.dumps(doc))


def test_optional_start_ticks() -> None:
    doc = _doc()
    procs = doc["processes"]
    assert isinstance(procs, list)
    procs[0]["start_ticks"] = None
    assert rigstate.from_json(json.dumps(doc)).processes[0].start_ticks is None


def test_not_json() -> None:
    with pytest.raises(StateError, match="not valid JSON"):
        rigstate.from_json("{")


def test_file_load_save_update(tmp_path: Path) -> None:
    path = rigstate.state_file(tmp_path / "rig")
    assert rigstate.load(path) is None
    with pytest.raises(StateError, match="is the rig up"):
        rigstate.update(path, lambda s: s)
    rigstate.save(path, _state())
    assert rigstate.load(path) == _state()

    # Concurrent read-modify-writes do not lose each other's changes (the lock holds).
    def add(name: str) -> None:
        def change(s: rigstate.RigState) -> rigstate.RigState:
            s, plan = rigstate.allocate_pod(s, "west", name)
            return rigstate.with_pod(s, plan, "default", "default")

        rigstate.update(path, change)

    threads = [threading.Thread(target=add, args=(f"p{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = rigstate.load(path)
    assert final is not None
    west = sorted(p.ip for p in final.pods if p.cluster == "west")
    assert west == sorted(f"10.2.0.{10 + i}" for i in range(8))
    leftovers = sorted(p.name for p in path.parent.iterdir())
    assert leftovers == ["state.json", "state.json.lock"]

    path.write_text('{"version": 1}')
    with pytest.raises(StateError, match=rf"{path}: state.prefix: missing"):
        rigstate.load(path)
