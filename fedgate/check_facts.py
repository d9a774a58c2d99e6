"""The facts `fedgate check` evaluates (`fedgate.checks`), as `fedgate.check_collect` gathers
them: plain frozen data, no behaviour beyond a clock sample's skew interval.

Also what the agent needs from its Kubernetes cluster (`NEEDS`, `CRDS`), which the collector
asks the API server about and the checks report on.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Clock:
    """One HTTP exchange with a component: local send and receive times and the `Date` the
    component answered with (whole seconds, RFC 9110 section 6.6.1)."""

    sent: float
    received: float
    server: float

    def skew_range(self) -> tuple[float, float]:
        """The component's clock minus ours, as an interval: its `Date` was read at some
        instant of [sent, received] and truncated to the second."""
        return self.server - self.received, self.server + 1.0 - self.sent


@dataclass(frozen=True, slots=True)
class Cert:
    kind: str  # "svid" or "root" (fedgate_certificate_expiry_timestamp_seconds)
    identity: str
    trust_domain: str
    fingerprint: str
    not_after: float  # Unix time


@dataclass(frozen=True, slots=True)
class Subscriber:
    """An open config stream on a controller replica and the version it last ACKed."""

    node: str
    kind: str
    cluster: str
    version: str


@dataclass(frozen=True, slots=True)
class Component:
    """A controller replica or a gateway, as read over HTTP (its `error` if it was not)."""

    kind: str  # "controller" or "gateway"
    name: str  # replica address, or the gateway's cluster
    address: str
    error: str = ""
    leader: bool = False
    version: str = ""  # the config version it serves (controller) or runs (gateway)
    subscribers: tuple[Subscriber, ...] = ()
    certs: tuple[Cert, ...] = ()
    clock: Clock | None = None

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class ClusterFacts:
    name: str
    lease_alive: bool
    routed: bool
    state: str  # Live, Detached, Down, Suppressed, or "" with no liveness record


@dataclass(frozen=True, slots=True)
class Link:
    source: str
    destination: str
    health: str  # up, idle, down (fedgate.topology.build)
    reason: str = ""
    rtt_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Need:
    """A permission the agent needs in its cluster, and why (docs/kubernetes.md)."""

    verb: str
    group: str
    resource: str
    subresource: str = ""
    why: str = ""
    name: str = ""  # one object (RBAC `resourceNames`), "" for any

    @property
    def label(self) -> str:
        res = f"{self.resource}.{self.group}" if self.group else self.resource
        sub = "/" + self.subresource if self.subresource else ""
        return f"{self.verb} {res}{sub}" + (f" {self.name}" if self.name else "")


MCS = "multicluster.x-k8s.io"
WEBHOOK_CONFIGURATION = "fedgate-sidecar-injector"  # clusters.inject.admission.CONFIGURATION_NAME
_READ = "the cluster source lists and watches them"
# In step with docs/kubernetes.md's RBAC table: the informers only list and watch (no get);
# server-side apply of an object that does not exist yet is authorized as create and patch.
NEEDS: tuple[Need, ...] = (
    *(
        Need(verb, group, resource, why=_READ)
        for group, resource in (
            (MCS, "serviceexports"),
            ("", "services"),
            ("discovery.k8s.io", "endpointslices"),
            ("", "pods"),
        )
        for verb in ("list", "watch")
    ),
    *(
        Need(verb, MCS, "serviceimports", why="the write-back keeps one per merged service")
        for verb in ("list", "create", "patch", "delete")
    ),
    Need("patch", MCS, "serviceimports", "status", why="the write-back sets status.clusters"),
    Need("patch", MCS, "serviceexports", "status", why="the write-back sets Valid and Conflict"),
    Need("create", "authentication.k8s.io", "tokenreviews", why="the CA reviews pod tokens"),
    *(
        Need(verb, "", resource, why="injected namespaces get their bootstrap ConfigMap")
        for resource, verbs in (
            ("namespaces", ("list", "watch")),
            ("configmaps", ("list", "watch", "create", "patch")),
        )
        for verb in verbs
    ),
    *(
        Need(
            verb,
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            why="the injector webhook's caBundle follows the CA's roots",
            name=WEBHOOK_CONFIGURATION,
        )
        for verb in ("get", "patch")
    ),
)
CRDS = (f"serviceexports.{MCS}", f"serviceimports.{MCS}")


@dataclass(frozen=True, slots=True)
class Access:
    need: Need
    allowed: bool
    reason: str = ""  # the review's reason or evaluationError


@dataclass(frozen=True, slots=True)
class KubeFacts:
    server: str
    context: str = ""  # the kubeconfig context asked ("" for the current one, or in-cluster)
    error: str = ""  # the API could not be reached (then nothing below was asked)
    version: str = ""
    access: tuple[Access, ...] = ()
    crds: frozenset[str] = frozenset()  # names of the established CRDs
    crd_error: str = ""


@dataclass(frozen=True, slots=True)
class GitOps:
    applied_sha: str = ""
    applied_subject: str = ""
    applied_at: str = ""
    rejected_sha: str = ""
    rejected_at: str = ""
    issues: tuple[str, ...] = ()  # one line each
    total: int = 0
    last_result: str = ""  # the leader's last sync round (fetch-failed, ...); "" if not syncing
    last_detail: str = ""


@dataclass(frozen=True, slots=True)
class Facts:
    etcd: str
    etcd_error: str = ""
    leader_id: str = ""
    leader_admin: str = ""
    controllers: tuple[Component, ...] = ()
    gateways: tuple[Component, ...] = ()
    clusters: tuple[ClusterFacts, ...] = ()
    links: tuple[Link, ...] = ()
    topology_error: str = ""
    gitops: GitOps = field(default_factory=GitOps)
    kube: tuple[KubeFacts, ...] = ()  # one per cluster API asked
