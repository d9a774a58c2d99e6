"""The rules beyond one document's schema: sums, references, duplicates. Pure.

- At most one `Federation` document; its cluster names and trust domains are unique, its links
  name two distinct declared clusters once, its roots are PEM certificates.
- Weights: a non-empty `clusterWeights` or `subsetWeights` list adds up to exactly 100 (as
  Istio requires of route weights), and names each cluster or subset once.
- References: a named cluster (in weights, mirrors, links) is declared in the Federation
  document (`local` and `remote` always exist); a subset (in weights, mirrors) is declared in the
  policy's `subsets`; `host` is in the document's own namespace; `localityFailover` needs a
  region on every cluster; an exact principal's trust domain belongs to the federation.
- Duplicates: one document per (kind, namespace, name); one TrafficPolicy per service; route
  and subset names unique within a policy.

Services themselves are not checked against the catalog: a policy may be committed before its
service is deployed (as in Istio), and the catalog is live state, not configuration. The one
exception: when the caller passes the catalog's port protocols (`ports`: the controller's sync
does, and `fedgate config validate --controller`), an AuthorizationPolicy rule with HTTP fields
(`methods`, `paths`, `notMethods`, `notPaths`) that would apply to a TCP port of its service is
an issue: Istio silently ignores such a rule, and operators are bitten by it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509

from federation import schema as s
from federation.gitops.convert import parse_retry_on, trust_domain
from federation.gitops.issues import ConfigIssue, Located
from federation.gitops.load import FieldPath
from mesh.model import HTTP_PROTOCOLS, SPECIAL_CLUSTERS, Snapshot
from mesh.naming import ServiceKey, SpiffeId

TOTAL_WEIGHT = 100


# service -> port -> protocol (TCP, HTTP, HTTP2, GRPC), as the catalog has them
PortProtocols = Mapping[ServiceKey, Mapping[int, str]]


def port_protocols(snapshot: Snapshot | None) -> dict[ServiceKey, dict[int, str]]:
    """The catalog's port protocols from a controller snapshot (None: none yet)."""
    services = snapshot.services if snapshot is not None else ()
    return {s.key: {p.port: p.protocol for p in s.ports} for s in services}


class _Checker:
    def __init__(
        self, located: Sequence[Located], federation_broken: bool, ports: PortProtocols
    ) -> None:
        self.located = located
        self.ports = ports
        self.federation_broken = federation_broken
        self.issues: list[ConfigIssue] = []
        feds = [loc for loc in located if isinstance(loc.model, s.FederationDocument)]
        self.federation: s.FederationSpec | None = None
        if feds:
            first = feds[0].model
            assert isinstance(first, s.FederationDocument)
            self.federation = first.spec
            for extra in feds[1:]:
                self.add(
                    extra,
                    ("kind",),
                    f"a second Federation document (the first is in {feds[0].where}); a "
                    "repository holds at most one",
                )
        self.clusters = (
            {c.name: c for c in self.federation.clusters} if self.federation is not None else {}
        )

    def add(self, loc: Located, path: FieldPath, reason: str) -> None:
        self.issues.append(loc.issue(path, reason))

    # --- Federation ---------------------------------------------------------------------------

    def federation_doc(self, loc: Located, spec: s.FederationSpec) -> None:
        names: dict[str, int] = {}
        domains: dict[str, str] = {}
        for i, c in enumerate(spec.clusters):
            path: FieldPath = ("spec", "clusters", i)
            if c.name in names:
                self.add(loc, (*path, "name"), f"cluster {c.name!r} is declared twice")
            names.setdefault(c.name, i)
            td = trust_domain(c, spec)
            if td in domains:
                self.add(
                    loc,
                    (*path, "trustDomain"),
                    f"trust domain {td!r} is already cluster {domains[td]!r}'s",
                )
            domains.setdefault(td, c.name)
            for j, pem in enumerate(c.roots):
                try:
                    x509.load_pem_x509_certificates(pem.encode())
                except ValueError:
                    self.add(loc, (*path, "roots", j), "is not a PEM X.509 certificate")
        pairs: dict[frozenset[str], int] = {}
        for i, link in enumerate(spec.links):
            path = ("spec", "links", i, "clusters")
            a, b = link.clusters
            if a == b:
                self.add(loc, path, f"a link joins two different clusters, got {a!r} twice")
            for j, name in enumerate(link.clusters):
                if name not in names:
                    self.add(loc, (*path, j), f"cluster {name!r} is not declared in spec.clusters")
            pair = frozenset(link.clusters)
            if pair in pairs:
                self.add(loc, path, f"the link {a}-{b} is already spec.links[{pairs[pair]}]")
            pairs.setdefault(pair, i)
        d = spec.defaults.traffic_policy
        if d is not None:
            base: FieldPath = ("spec", "defaults", "trafficPolicy")
            self.retries(loc, base, d.retries)
            if d.locality_failover is not None:
                self.regions(loc, (*base, "localityFailover"))

    # --- TrafficPolicy ------------------------------------------------------------------------

    def host(self, loc: Located, host: str, namespace: str) -> ServiceKey:
        key = ServiceKey.parse_fqdn(host)
        if key.namespace != namespace:
            self.add(
                loc,
                ("spec", "host"),
                f"{host!r} is not in the document's namespace {namespace!r} (expected "
                f"<service>.{namespace}.svc.clusterset.local)",
            )
        return key

    def cluster_ref(self, loc: Located, path: FieldPath, name: str) -> None:
        if name in SPECIAL_CLUSTERS or name in self.clusters:
            return
        if self.federation is None:
            if self.federation_broken:
                return  # the Federation document has errors of its own, reported there
            self.add(
                loc,
                path,
                f"cluster {name!r} is not declared: the repository has no Federation "
                "document (use local or remote, or declare the clusters)",
            )
        else:
            known = ", ".join(sorted(self.clusters))
            self.add(
                loc, path, f"cluster {name!r} is not declared in the Federation (known: {known})"
            )

    def weights(self, loc: Located, path: FieldPath, items: Sequence[Any], what: str) -> None:
        seen: set[str] = set()
        for i, w in enumerate(items):
            name = getattr(w, what)
            if name in seen:
                self.add(loc, (*path, i, what), f"{what} {name!r} is weighted twice")
            seen.add(name)
        total = sum(w.weight for w in items)
        if items and total != TOTAL_WEIGHT:
            self.add(loc, path, f"weights add up to {total}; they must add up to {TOTAL_WEIGHT}")

    def retries(self, loc: Located, path: FieldPath, retries: s.Retries | None) -> None:
        if retries is not None and retries.retry_on is not None:
            try:
                parse_retry_on(retries.retry_on)
            except ValueError as e:
                self.add(loc, (*path, "retries", "retryOn"), str(e))

    def regions(self, loc: Located, path: FieldPath) -> None:
        if self.federation is None:
            if not self.federation_broken:
                self.add(loc, path, "needs a Federation document giving every cluster a locality")
            return
        missing = sorted(c.name for c in self.federation.clusters if c.locality is None)
        if missing:
            self.add(
                loc,
                path,
                f"needs locality.region on every cluster; missing on {', '.join(missing)}",
            )

    def overrides(
        self, loc: Located, path: FieldPath, o: s.TrafficPolicySpec | s.Route, subsets: set[str]
    ) -> None:
        self.weights(loc, (*path, "clusterWeights"), o.cluster_weights, "cluster")
        for i, w in enumerate(o.cluster_weights):
            self.cluster_ref(loc, (*path, "clusterWeights", i, "cluster"), w.cluster)
        self.weights(loc, (*path, "subsetWeights"), o.subset_weights, "subset")
        for i, sw in enumerate(o.subset_weights):
            if sw.subset not in subsets:
                self.add(
                    loc,
                    (*path, "subsetWeights", i, "subset"),
                    f"subset {sw.subset!r} is not declared in spec.subsets",
                )
        self.retries(loc, path, o.retries)
        if o.mirror is not None:
            if o.mirror.cluster is not None:
                self.cluster_ref(loc, (*path, "mirror", "cluster"), o.mirror.cluster)
            if o.mirror.subset is not None and o.mirror.subset not in subsets:
                self.add(
                    loc,
                    (*path, "mirror", "subset"),
                    f"subset {o.mirror.subset!r} is not declared in spec.subsets",
                )
        elif o.mirror_percentage is not None:
            self.add(loc, (*path, "mirrorPercentage"), "is set but mirror is not")

    def traffic_policy(self, loc: Located, doc: s.TrafficPolicyDocument) -> None:
        spec = doc.spec
        subsets: set[str] = set()
        for i, sub in enumerate(spec.subsets):
            if sub.name in subsets:
                self.add(
                    loc, ("spec", "subsets", i, "name"), f"subset {sub.name!r} is declared twice"
                )
            subsets.add(sub.name)
        self.overrides(loc, ("spec",), spec, subsets)
        if spec.locality_failover is not None:
            self.regions(loc, ("spec", "localityFailover"))
        routes: set[str] = set()
        for i, route in enumerate(spec.routes):
            if route.name in routes:
                self.add(
                    loc, ("spec", "routes", i, "name"), f"route {route.name!r} is declared twice"
                )
            routes.add(route.name)
            self.overrides(loc, ("spec", "routes", i), route, subsets)

    # --- AuthorizationPolicy ------------------------------------------------------------------

    def authorization(self, loc: Located, doc: s.AuthorizationPolicyDocument) -> None:
        if doc.spec.action == "DENY" and not doc.spec.rules:
            self.add(loc, ("spec", "rules"), "a DENY policy without rules matches nothing")
        self.http_fields_on_tcp(loc, doc)
        if self.federation is None:
            return
        domains = {trust_domain(c, self.federation) for c in self.federation.clusters}
        domains.add(self.federation.domain)
        for i, rule in enumerate(doc.spec.rules):
            for j, f in enumerate(rule.from_):
                for k, principal in enumerate(f.source.principals):
                    if "*" in principal:
                        continue
                    td = SpiffeId.parse(principal).trust_domain
                    if td not in domains:
                        self.add(
                            loc,
                            ("spec", "rules", i, "from", j, "source", "principals", k),
                            f"trust domain {td!r} is not the federation's nor one of its "
                            f"clusters' (known: {', '.join(sorted(domains))})",
                        )

    def http_fields_on_tcp(self, loc: Located, doc: s.AuthorizationPolicyDocument) -> None:
        key = ServiceKey.parse_fqdn(doc.spec.host)
        protocols = self.ports.get(key)
        if not protocols:
            return
        for i, rule in enumerate(doc.spec.rules):
            for j, to in enumerate(rule.to):
                op = to.operation
                named = [
                    (name, values)
                    for name, values in (
                        ("methods", op.methods),
                        ("notMethods", op.not_methods),
                        ("paths", op.paths),
                        ("notPaths", op.not_paths),
                    )
                    if values
                ]
                if not named:
                    continue
                applies = [
                    p
                    for p in (op.ports or sorted(protocols))
                    if p not in op.not_ports and protocols.get(p, "") not in HTTP_PROTOCOLS
                ]
                tcp = [p for p in applies if p in protocols]
                if not tcp:
                    continue
                field = named[0][0]
                self.add(
                    loc,
                    ("spec", "rules", i, "to", j, "operation", field),
                    f"{field} is an HTTP field, but the rule applies to port "
                    f"{', '.join(map(str, tcp))} of {key.fqdn}, whose protocol is "
                    f"{protocols[tcp[0]]}: name only HTTP, HTTP2 or GRPC ports in "
                    "`ports` (Istio would silently ignore this rule)",
                )

    # --- across documents ---------------------------------------------------------------------

    def run(self) -> list[ConfigIssue]:
        names: dict[tuple[str, str, str], Located] = {}
        hosts: dict[ServiceKey, Located] = {}
        for loc in self.located:
            model = loc.model
            namespace = getattr(model.metadata, "namespace", "")
            ident = (model.kind, namespace, model.metadata.name)
            if ident in names:
                self.add(
                    loc,
                    ("metadata", "name"),
                    f"duplicate name: {model.kind} {namespace + '/' if namespace else ''}"
                    f"{model.metadata.name} is already defined in {names[ident].where}",
                )
            names.setdefault(ident, loc)
            match model:
                case s.FederationDocument():
                    if self.federation is model.spec:
                        self.federation_doc(loc, model.spec)
                case s.TrafficPolicyDocument():
                    key = self.host(loc, model.spec.host, model.metadata.namespace)
                    if key in hosts:
                        self.add(
                            loc,
                            ("spec", "host"),
                            f"duplicate policy: {key.fqdn} already has a TrafficPolicy in "
                            f"{hosts[key].where}",
                        )
                    hosts.setdefault(key, loc)
                    self.traffic_policy(loc, model)
                case s.AuthorizationPolicyDocument():
                    self.host(loc, model.spec.host, model.metadata.namespace)
                    self.authorization(loc, model)
                case _:
                    raise AssertionError(f"unknown document model {type(model).__name__}")
        return self.issues


def check(
    located: Sequence[Located], federation_broken: bool = False, ports: PortProtocols | None = None
) -> list[ConfigIssue]:
    """Every rule above, over every schema-valid document of a checkout.

    `federation_broken`: a Federation document exists but failed its schema, so references to
    clusters cannot be checked (and are not reported as undeclared). `ports`: the catalog's
    port protocols, for the HTTP-fields-on-a-TCP-port rule (None: not checked).
    """
    return _Checker(located, federation_broken, ports or {}).run()
