"""`fedgate check`'s verdicts: collected facts in, one result per check out. Pure.

`evaluate(facts, now)` turns what `fedgate.check_collect` gathered (etcd's records, the
controllers' and gateways' metrics, the leader's topology data, the Kubernetes API's answers)
into `Result`s grouped by section; `render()` prints them one line each, like `linkerd check`:

    ✓  ok        the check passed; `detail` says what was seen (a version, an RTT, a date)
    ‼  warning   works now, needs attention soon (a root expiring within 7 days, an idle link)
    ✗  failure   broken now; the line is followed by a hint saying what to do

Sections, in order: kubernetes (one per context asked, only with a kubeconfig or in-cluster),
control plane, clusters, gateways, identity, clock, gitops. This module does no I/O and reads
no clock; it decides nothing about how the facts were collected (an unreachable component is a
fact with an `error`), and it does not retry: a failed check is re-run by running the command
again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

from fedgate.check_facts import CRDS, Cert, Component, Facts, GitOps, KubeFacts

OK, WARN, FAIL = "ok", "warn", "fail"
MARKS = {OK: "✓", WARN: "‼", FAIL: "✗"}


@dataclass(frozen=True, slots=True)
class Result:
    section: str
    name: str  # what was checked, phrased as the claim: "cluster west is live"
    status: str  # OK, WARN or FAIL
    detail: str = ""  # what was seen
    hint: str = ""  # what to do (warnings and failures)
    notes: tuple[str, ...] = ()  # further lines (a rejected commit's issues)


@dataclass(frozen=True, slots=True)
class Bounds:
    """Where a warning or a failure starts (`fedgate check` flags)."""

    root_warn: float = 7 * 86400.0  # a root expiring sooner warns (rotate it: `fedgate ca`)
    # SVIDs live 1 h and are renewed at half life: under 15 min left, renewal has failed for
    # a quarter of the lifetime.
    svid_warn: float = 15 * 60.0
    skew_warn: float = 1.0  # seconds, provably beyond (the Date header has 1 s resolution)
    # SVIDs are backdated 5 min (ca.authority): beyond that, a fresh SVID is not yet valid
    # for a peer whose clock is behind.
    skew_fail: float = 300.0


# --- evaluation -------------------------------------------------------------------------------


def _when(t: float, now: float) -> str:
    date = dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    left = t - now
    if left < 0:
        return f"expired {date}"
    span = f"{left / 86400:.0f} days" if left >= 2 * 86400 else f"{left / 60:.0f} min"
    return f"expires {date} (in {span})"


def _kube(k: KubeFacts) -> Iterator[Result]:
    s = f"kubernetes ({k.context})" if k.context else "kubernetes"
    if k.error:
        yield Result(
            s,
            f"the Kubernetes API at {k.server} is reachable",
            FAIL,
            k.error,
            "check --kubeconfig/--context, the server address and the credentials",
        )
        return
    yield Result(s, f"the Kubernetes API at {k.server} is reachable", OK, k.version)
    for a in k.access:
        detail = "allowed" if a.allowed else f"denied{': ' + a.reason if a.reason else ''}"
        hint = (
            ""
            if a.allowed
            else f"grant `{a.need.label}` to the agent's ServiceAccount ({a.need.why}); "
            "docs/kubernetes.md lists what the agent needs"
        )
        yield Result(s, f"can {a.need.label}", OK if a.allowed else FAIL, detail, hint)
    for crd in CRDS:
        if k.crd_error:
            yield Result(
                s,
                f"CRD {crd} is installed",
                FAIL,
                k.crd_error,
                "grant list on customresourcedefinitions.apiextensions.k8s.io to check CRDs",
            )
        elif crd in k.crds:
            yield Result(s, f"CRD {crd} is installed", OK, "established")
        else:
            yield Result(
                s,
                f"CRD {crd} is installed",
                FAIL,
                "missing or not established",
                "install the MCS API CRDs (sigs.k8s.io/mcs-api, config/crd)",
            )


def _control(f: Facts) -> Iterator[Result]:
    s = "control plane"
    if f.etcd_error:
        yield Result(
            s,
            f"etcd at {f.etcd} is reachable",
            FAIL,
            f.etcd_error,
            "start etcd, or pass the right --etcd endpoints",
        )
    else:
        yield Result(s, f"etcd at {f.etcd} is reachable", OK)
    if not f.controllers:
        yield Result(
            s,
            "a controller replica is known",
            FAIL,
            "no leader record, no address",
            "start a controller, or name its admin address with --controller-admin",
        )
    for c in f.controllers:
        if c.error:
            yield Result(
                s,
                f"{c.label} is reachable",
                FAIL,
                c.error,
                "is the replica running? its log says why it stopped",
            )
        else:
            yield Result(s, f"{c.label} is reachable", OK, f"serves version {c.version or '-'}")
    leaders = [c for c in f.controllers if c.leader and not c.error]
    if f.leader_id and leaders:
        yield Result(s, "a leader is elected", OK, f"{f.leader_id} (admin {f.leader_admin})")
    elif f.leader_id:
        yield Result(
            s,
            "a leader is elected",
            WARN,
            f"etcd names {f.leader_id}, but no reachable replica says it leads",
            "the leader may be unreachable from here: check --controller-admin",
        )
    else:
        yield Result(
            s,
            "a leader is elected",
            FAIL,
            "no replica holds the election",
            "no controller runs or none reaches etcd: see the controllers' logs",
        )
    reached = [c for c in f.controllers if not c.error]
    if reached:
        yield _acks(s, reached)


def _acks(s: str, controllers: list[Component]) -> Result:
    subs = [(c, sub) for c in controllers for sub in c.subscribers]
    behind = [
        f"{sub.node} ({sub.kind}, {sub.cluster}) at {sub.version or 'none'}, "
        f"{c.label} serves {c.version}"
        for c, sub in subs
        if sub.version != c.version
    ]
    name = "the config version is acked by every proxy"
    versions = sorted({c.version for c in controllers})
    if not subs:
        return Result(
            s,
            name,
            WARN,
            "no proxy holds a config stream",
            "start the gateways and sidecars; they stream from --controllers",
        )
    if behind:
        return Result(
            s,
            name,
            FAIL,
            f"{len(behind)} of {len(subs)} proxies are behind",
            "a proxy that stays behind refused the version (NACK, `config rejected` in its "
            "log) or lost its stream; fedgate_config_nacks_total counts refusals",
            tuple(behind),
        )
    return Result(s, name, OK, f"{len(subs)} proxies at {', '.join(versions)}")


def _clusters(f: Facts) -> Iterator[Result]:
    s = "clusters"
    if not f.clusters and not f.etcd_error:
        yield Result(
            s,
            "a cluster is registered",
            FAIL,
            "no agent holds a lease",
            "start each cluster's agent (fedgate agent)",
        )
    for c in f.clusters:
        name = f"cluster {c.name} is live"
        if not c.lease_alive and c.state == "Detached":
            yield Result(
                s,
                name,
                WARN,
                "lease expired, still routed on its last catalog (Detached)",
                f"the agent of {c.name} stopped renewing its lease; its gateway and pods keep "
                "serving until the detach grace ends: restart the agent, its log says why",
            )
        elif not c.lease_alive:
            yield Result(
                s,
                name,
                FAIL,
                f"lease expired ({c.state or 'no liveness record'})",
                f"the agent of {c.name} stopped renewing its lease: is it running, "
                "can it reach etcd? its log says",
            )
        elif c.state and c.state != "Live":
            yield Result(
                s,
                name,
                FAIL,
                c.state,
                "Suppressed: flap damping holds a cluster whose lease came and went; "
                "it returns once stable"
                if c.state == "Suppressed"
                else f"the leader marked {c.name} {c.state}",
            )
        elif not c.routed:
            yield Result(
                s,
                name,
                WARN,
                "lease alive, not in the routed snapshot yet",
                "a cluster is admitted at the next sync; run the check again",
            )
        else:
            yield Result(s, name, OK, "lease alive, routed")


_LINK_HINTS = {
    "cluster not live": "see the clusters above",
    "gateway metrics unreachable": "see the gateways above",
    "no tunnel connection": "the source gateway cannot hold a tunnel: is the destination's "
    "tunnel port reachable, and do both trust each other's roots?",
}


def _gateways(f: Facts) -> Iterator[Result]:
    s = "gateways"
    if f.topology_error:
        yield Result(
            s,
            "the leader's topology is readable",
            FAIL,
            f.topology_error,
            "gateway links are read through the leader's /topology.json",
        )
        return
    for g in f.gateways:
        name = f"gateway of {g.name} answers"
        if g.error:
            yield Result(
                s,
                name,
                FAIL,
                g.error,
                f"is {g.name}'s gateway running? its metrics listener is {g.address}; "
                "its log says why it stopped",
            )
        else:
            yield Result(s, name, OK, f"{g.address}, version {g.version or '-'}")
    for link in f.links:
        name = f"link {link.source} -> {link.destination} is healthy"
        rtt = f"rtt {link.rtt_ms:.3f} ms" if link.rtt_ms is not None else "no rtt yet"
        if link.health == "up":
            yield Result(s, name, OK, rtt)
        elif link.health == "idle":
            yield Result(
                s, name, WARN, f"idle: {link.reason}", "tunnels open on the first call across them"
            )
        else:
            hint = _LINK_HINTS.get(link.reason, "see the gateways' logs")
            yield Result(s, name, FAIL, f"{link.health}: {link.reason}", hint)


def _identity(f: Facts, now: float, b: Bounds) -> Iterator[Result]:
    s = "identity"
    roots: dict[str, Cert] = {}
    for c in f.controllers:
        for cert in c.certs:
            if cert.kind == "root":
                roots.setdefault(cert.fingerprint, cert)
    if not roots and any(not c.error for c in f.controllers):
        yield Result(
            s,
            "the trust bundle has roots",
            FAIL,
            "no root published",
            "each agent publishes its cluster's CA roots; are they running?",
        )
    for fp, root in sorted(roots.items(), key=lambda r: (r[1].trust_domain, r[0])):
        yield _validity(
            s,
            f"root of {root.trust_domain} ({fp}) is valid",
            root,
            now,
            b.root_warn,
            "rotate the root before it expires: `fedgate ca rotate`",
        )
    for comp in (*f.controllers, *f.gateways):
        for cert in comp.certs:
            if cert.kind == "svid":
                yield _validity(
                    s,
                    f"SVID of {comp.label} is valid",
                    cert,
                    now,
                    b.svid_warn,
                    "SVIDs renew at half life: renewal is failing, see its log "
                    "(the agent's CA must answer)",
                )


def _validity(s: str, name: str, cert: Cert, now: float, warn: float, hint: str) -> Result:
    detail = f"{cert.identity}, {_when(cert.not_after, now)}"
    if cert.not_after <= now:
        return Result(s, name, FAIL, detail, hint)
    if cert.not_after - now < warn:
        return Result(s, name, WARN, detail, hint)
    return Result(s, name, OK, detail)


def _clock(f: Facts, b: Bounds) -> Iterator[Result]:
    s = "clock"
    for comp in (*f.controllers, *f.gateways):
        if comp.clock is None:
            continue
        low, high = comp.clock.skew_range()
        # Only a skew provably beyond a bound counts: 0 within [low, high] is "in sync".
        off = low if low > 0 else -high if high < 0 else 0.0
        if off == 0.0:
            detail = f"within {max(high, -low):.1f} s of this host's clock"
        else:
            ahead = "ahead of" if low > 0 else "behind"
            detail = f"{off:.1f} to {max(abs(low), abs(high)):.1f} s {ahead} this host"
        name = f"clock of {comp.label} is in sync"
        hint = "run NTP (chrony, systemd-timesyncd) on every host"
        if off > b.skew_fail:
            yield Result(s, name, FAIL, detail, hint)
        elif off > b.skew_warn:
            yield Result(s, name, WARN, detail, hint)
        else:
            yield Result(s, name, OK, detail)


def _gitops(g: GitOps) -> Iterator[Result]:
    s = "gitops"
    if g.applied_sha:
        subject = f" {g.applied_subject!r}" if g.applied_subject else ""
        yield Result(
            s,
            "a GitOps commit is applied",
            OK,
            f"{g.applied_sha[:12]}{subject} at {g.applied_at or '?'}",
        )
    else:
        yield Result(s, "a GitOps commit is applied", OK, "none: the config is seeded")
    if g.last_result in ("fetch-failed", "store-failed"):
        yield Result(
            s,
            "the leader's last sync round worked",
            FAIL,
            f"{g.last_result}: {g.last_detail}",
            "the leader cannot fetch the repository or write etcd: see its log",
        )
    if g.rejected_sha:
        yield Result(
            s,
            "no GitOps commit is rejected",
            FAIL,
            f"{g.rejected_sha[:12]} rejected at {g.rejected_at or '?'}, {g.total} issue(s); "
            f"the mesh keeps {g.applied_sha[:12] or 'the seeded config'}",
            "fix the issues and push; `fedgate config validate DIR` shows them before a push",
            g.issues,
        )
    else:
        yield Result(s, "no GitOps commit is rejected", OK)


def evaluate(facts: Facts, now: float, bounds: Bounds = Bounds()) -> list[Result]:
    out: list[Result] = []
    for kube in facts.kube:
        out.extend(_kube(kube))
    out.extend(_control(facts))
    out.extend(_clusters(facts))
    out.extend(_gateways(facts))
    out.extend(_identity(facts, now, bounds))
    out.extend(_clock(facts, bounds))
    out.extend(_gitops(facts.gitops))
    return out


def failed(results: list[Result]) -> bool:
    return any(r.status == FAIL for r in results)


def render(results: list[Result]) -> str:
    lines: list[str] = []
    for section in dict.fromkeys(r.section for r in results):  # in the order evaluated
        mine = [r for r in results if r.section == section]
        if lines:
            lines.append("")
        lines += [section, "-" * len(section)]
        for r in mine:
            lines.append(f"{MARKS[r.status]} {r.name}{' [' + r.detail + ']' if r.detail else ''}")
            lines.extend(f"    {n}" for n in r.notes)
            if r.hint and r.status != OK:
                lines.append(f"    hint: {r.hint}")
    counts = {k: sum(r.status == k for r in results) for k in (OK, WARN, FAIL)}
    lines += ["", f"Status: {counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} failed"]
    return "\n".join(lines)
