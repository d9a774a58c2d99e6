"""`fedgate.checks`: verdicts from fabricated facts at a fixed `now` (no I/O, no clock)."""

from __future__ import annotations

import dataclasses

from fedgate.check_facts import (
    CRDS,
    NEEDS,
    Access,
    Cert,
    Clock,
    ClusterFacts,
    Component,
    Facts,
    GitOps,
    KubeFacts,
    Link,
    Subscriber,
)
from fedgate.checks import FAIL, OK, WARN, Bounds, Result, evaluate, failed, render

NOW = 1_800_000_000.0
DAY = 86400.0
ROOT_EAST = Cert("root", "O=east", "east.fedgate.local", "ab12cd", NOW + 365 * DAY)
ROOT_WEST = Cert("root", "O=west", "west.fedgate.local", "ef34ab", NOW + 365 * DAY)


def svid(identity: str, left: float = 45 * 60) -> Cert:
    return Cert("svid", identity, "control.fedgate.local", "99", NOW + left)


def in_sync(offset: float = 0.0) -> Clock:
    """An exchange of 10 ms whose Date header reads our time plus `offset`, truncated."""
    return Clock(NOW, NOW + 0.01, float(int(NOW + 0.005 + offset)))


def controller(address: str = "172.30.0.2:15014", **kw: object) -> Component:
    defaults: dict[str, object] = {
        "leader": True,
        "version": "v7",
        "subscribers": (
            Subscriber("east-gw", "gateway", "east", "v7"),
            Subscriber("west/client", "sidecar", "west", "v7"),
        ),
        "certs": (ROOT_EAST, ROOT_WEST, svid("spiffe://control/controller")),
        "clock": in_sync(),
    }
    return Component("controller", address, address, **{**defaults, **kw})  # type: ignore[arg-type]


def gateway(cluster: str, **kw: object) -> Component:
    defaults: dict[str, object] = {
        "version": "v7",
        "certs": (svid(f"spiffe://{cluster}/gateway"),),
        "clock": in_sync(),
    }
    address = f"172.30.0.1{len(cluster)}:15020"
    return Component("gateway", cluster, address, **{**defaults, **kw})  # type: ignore[arg-type]


def healthy(**kw: object) -> Facts:
    facts = Facts(
        etcd="172.30.0.2:2379",
        leader_id="controller-0",
        leader_admin="172.30.0.2:15014",
        controllers=(controller(),),
        gateways=(gateway("east"), gateway("west")),
        clusters=(
            ClusterFacts("east", True, True, "Live"),
            ClusterFacts("west", True, True, "Live"),
        ),
        links=(Link("east", "west", "up", rtt_ms=0.412), Link("west", "east", "up", rtt_ms=0.398)),
        gitops=GitOps(applied_sha="0123456789abcdef", applied_subject="weights 70/30"),
    )
    return dataclasses.replace(facts, **kw)  # type: ignore[arg-type]


def by_name(results: list[Result]) -> dict[str, Result]:
    return {r.name: r for r in results}


def statuses(results: list[Result]) -> dict[str, str]:
    return {r.name: r.status for r in results if r.status != OK}


def test_a_healthy_federation_passes_every_check_and_says_what_it_saw() -> None:
    results = evaluate(healthy(), NOW)
    assert statuses(results) == {}
    assert not failed(results)
    r = by_name(results)
    assert r["link east -> west is healthy"].detail == "rtt 0.412 ms"
    assert r["the config version is acked by every proxy"].detail == "2 proxies at v7"
    assert r["root of east.fedgate.local (ab12cd) is valid"].detail.startswith(
        "O=east, expires 2028-01-15"
    )
    assert "(in 45 min)" in r["SVID of gateway west is valid"].detail
    assert r["a GitOps commit is applied"].detail == "0123456789ab 'weights 70/30' at ?"
    text = render(results)
    assert "✗" not in text
    assert "‼" not in text
    assert text.splitlines()[:3] == [
        "control plane",
        "-------------",
        "✓ etcd at 172.30.0.2:2379 is reachable",
    ]


def test_a_stopped_gateway_fails_its_checks_and_its_links_with_hints() -> None:
    facts = healthy(
        gateways=(
            gateway("east"),
            gateway("west", error="no answer within 3 s", certs=(), clock=None),
        ),
        links=(
            Link("east", "west", "down", "gateway metrics unreachable"),
            Link("west", "east", "down", "gateway metrics unreachable"),
        ),
    )
    results = evaluate(facts, NOW)
    assert statuses(results) == {
        "gateway of west answers": FAIL,
        "link east -> west is healthy": FAIL,
        "link west -> east is healthy": FAIL,
    }
    assert failed(results)
    for r in results:
        if r.status == FAIL:
            assert r.hint
    text = render(results)
    assert "✗ gateway of west answers [no answer within 3 s]" in text
    assert "    hint: is west's gateway running?" in text


def test_an_idle_link_warns_and_does_not_fail() -> None:
    results = evaluate(healthy(links=(Link("east", "west", "idle", "not dialled yet"),)), NOW)
    assert statuses(results) == {"link east -> west is healthy": WARN}
    assert not failed(results)
    assert "‼ link east -> west is healthy" in render(results)


def test_certificates_warn_under_their_bound_and_fail_once_expired() -> None:
    soon = dataclasses.replace(ROOT_WEST, not_after=NOW + 6 * DAY)
    gone = svid("spiffe://control/controller", left=-60)
    facts = healthy(controllers=(controller(certs=(ROOT_EAST, soon, gone)),))
    results = evaluate(facts, NOW)
    assert statuses(results) == {
        "root of west.fedgate.local (ef34ab) is valid": WARN,
        "SVID of controller 172.30.0.2:15014 is valid": FAIL,
    }
    r = by_name(results)
    assert "(in 6 days)" in r["root of west.fedgate.local (ef34ab) is valid"].detail
    assert "expired" in r["SVID of controller 172.30.0.2:15014 is valid"].detail
    # A root 8 days from expiry passes with the default 7 days, warns with --warn-days 10.
    later = dataclasses.replace(ROOT_WEST, not_after=NOW + 8 * DAY)
    facts = healthy(controllers=(controller(certs=(ROOT_EAST, later)),))
    assert statuses(evaluate(facts, NOW)) == {}
    assert statuses(evaluate(facts, NOW, Bounds(root_warn=10 * DAY))) == {
        "root of west.fedgate.local (ef34ab) is valid": WARN
    }


def test_an_svid_whose_renewal_fails_warns() -> None:
    facts = healthy(gateways=(gateway("east", certs=(svid("spiffe://east/gw", left=10 * 60),)),))
    assert statuses(evaluate(facts, NOW)) == {"SVID of gateway east is valid": WARN}


def test_clock_skew_counts_only_when_provably_beyond_the_bounds() -> None:
    def verdict(offset: float) -> str:
        facts = healthy(gateways=(gateway("east", clock=in_sync(offset)),))
        return by_name(evaluate(facts, NOW))["clock of gateway east is in sync"].status

    # The Date header has whole seconds: up to a second either way is indistinguishable.
    assert verdict(0.0) == OK
    assert verdict(0.9) == OK
    assert verdict(-0.9) == OK
    assert verdict(3.0) == WARN
    assert verdict(-3.0) == WARN
    assert verdict(400.0) == FAIL
    assert verdict(-400.0) == FAIL
    low, high = in_sync(3.0).skew_range()
    assert 2.0 < low < 3.0 < high <= 4.0
    facts = healthy(gateways=(gateway("east", clock=in_sync(3.0)),))
    r = by_name(evaluate(facts, NOW))["clock of gateway east is in sync"]
    assert r.detail == "3.0 to 4.0 s ahead of this host"
    facts = healthy(gateways=(gateway("east", clock=in_sync()),))
    assert by_name(evaluate(facts, NOW))["clock of gateway east is in sync"].detail == (
        "within 1.0 s of this host's clock"
    )


def test_a_proxy_behind_the_served_version_fails_the_ack_check_and_is_named() -> None:
    subs = (
        Subscriber("east-gw", "gateway", "east", "v7"),
        Subscriber("west/client", "sidecar", "west", "v6"),
    )
    results = evaluate(healthy(controllers=(controller(subscribers=subs),)), NOW)
    r = by_name(results)["the config version is acked by every proxy"]
    assert r.status == FAIL
    assert r.detail == "1 of 2 proxies are behind"
    assert r.notes == ("west/client (sidecar, west) at v6, controller 172.30.0.2:15014 serves v7",)
    assert "    west/client (sidecar, west) at v6" in render(results)


def test_each_replica_is_compared_with_its_own_subscribers() -> None:
    other = controller(
        "172.30.0.2:15114",
        leader=False,
        version="v8",
        subscribers=(Subscriber("east/web", "sidecar", "east", "v8"),),
    )
    results = evaluate(healthy(controllers=(controller(), other)), NOW)
    r = by_name(results)["the config version is acked by every proxy"]
    assert r.status == OK
    assert r.detail == "3 proxies at v7, v8"


def test_no_leader_and_an_unreachable_replica_fail() -> None:
    down = controller(error="connection refused", leader=False, certs=(), clock=None)
    results = evaluate(healthy(leader_id="", controllers=(down,)), NOW)
    assert statuses(results) == {
        "controller 172.30.0.2:15014 is reachable": FAIL,
        "a leader is elected": FAIL,
    }


def test_an_unreachable_etcd_fails_and_the_rest_says_so() -> None:
    facts = Facts(etcd="10.0.0.1:2379", etcd_error="no answer within 5 s")
    results = evaluate(facts, NOW)
    assert statuses(results) == {
        "etcd at 10.0.0.1:2379 is reachable": FAIL,
        "a controller replica is known": FAIL,
        "a leader is elected": FAIL,
    }


def test_cluster_states() -> None:
    clusters = (
        ClusterFacts("east", True, True, "Live"),
        ClusterFacts("west", False, False, "Down"),
        ClusterFacts("north", True, True, "Suppressed"),
        ClusterFacts("south", True, False, "Live"),
        ClusterFacts("up", False, True, "Detached"),
    )
    results = evaluate(healthy(clusters=clusters), NOW)
    assert statuses(results) == {
        "cluster west is live": FAIL,
        "cluster north is live": FAIL,
        "cluster south is live": WARN,
        "cluster up is live": WARN,
    }
    assert "still routed" in by_name(results)["cluster up is live"].detail
    assert "lease expired" in by_name(results)["cluster west is live"].detail


def test_a_rejected_commit_fails_with_its_issues() -> None:
    gitops = GitOps(
        applied_sha="0123456789abcdef",
        rejected_sha="fedcba9876543210",
        rejected_at="2027-01-01T00:00:00Z",
        issues=("policy.yaml:3: spec.weights: must sum to 100",),
        total=1,
    )
    results = evaluate(healthy(gitops=gitops), NOW)
    r = by_name(results)["no GitOps commit is rejected"]
    assert r.status == FAIL
    assert r.detail == (
        "fedcba987654 rejected at 2027-01-01T00:00:00Z, 1 issue(s); the mesh keeps 0123456789ab"
    )
    assert r.notes == gitops.issues
    assert "fedgate config validate" in r.hint
    fetch = dataclasses.replace(
        gitops, rejected_sha="", last_result="fetch-failed", last_detail="x"
    )
    assert statuses(evaluate(healthy(gitops=fetch), NOW)) == {
        "the leader's last sync round worked": FAIL
    }


def test_kubernetes_rbac_and_crds() -> None:
    denied = {("patch", "serviceexports", "status"), ("create", "tokenreviews", "")}
    access = tuple(Access(n, (n.verb, n.resource, n.subresource) not in denied) for n in NEEDS)
    kube = KubeFacts(
        "https://10.0.0.1:6443",
        version="v1.31.0",
        access=access,
        crds=frozenset({"serviceexports.multicluster.x-k8s.io"}),
    )
    results = evaluate(healthy(kube=(kube,)), NOW)
    assert statuses(results) == {
        "can patch serviceexports.multicluster.x-k8s.io/status": FAIL,
        "can create tokenreviews.authentication.k8s.io": FAIL,
        "CRD serviceimports.multicluster.x-k8s.io is installed": FAIL,
    }
    checked = {r.name for r in results if r.section == "kubernetes"}
    assert "can watch endpointslices.discovery.k8s.io" in checked
    assert "can list pods" in checked
    assert "can delete serviceimports.multicluster.x-k8s.io" in checked
    assert len(checked) == 1 + len(NEEDS) + 2
    text = render(results)
    assert text.startswith("kubernetes\n----------\n✓ the Kubernetes API at https://10.0.0.1:6443")
    assert "hint: grant `create tokenreviews.authentication.k8s.io`" in text


def test_an_unreachable_kubernetes_api_is_one_failure() -> None:
    kube = KubeFacts("https://10.0.0.1:6443", error="connection refused")
    results = [r for r in evaluate(healthy(kube=(kube,)), NOW) if r.section == "kubernetes"]
    assert [(r.name, r.status) for r in results] == [
        ("the Kubernetes API at https://10.0.0.1:6443 is reachable", FAIL)
    ]


def test_each_cluster_api_has_its_own_section() -> None:
    east = KubeFacts("https://east:6443", "east", version="v1.31.0", crds=frozenset(CRDS))
    west = KubeFacts("https://west:6443", "west", error="connection refused")
    text = render(evaluate(healthy(kube=(east, west)), NOW))
    assert text.index("kubernetes (east)\n") < text.index("kubernetes (west)\n")
    assert text.index("kubernetes (west)\n") < text.index("control plane\n")
    assert "✗ the Kubernetes API at https://west:6443 is reachable [connection refused]" in text
