"""`fedgate check`'s collector: gathers the facts `fedgate.checks` evaluates. Decides nothing.

Reads, concurrently and each within `timeout`:
- etcd: the leader record, every cluster's lease and liveness (`fedgate status`'s `collect`,
  which also reads the leader's `/topology.json`: gateway metrics addresses, links with health
  and RTT), and the GitOps commit and rejection (`federation.gitops.store.ConfigStore`);
- every controller replica's `/metrics` (leader gauge, served version, each subscriber's ACKed
  version, its SVID and the roots it trusts) and the leader's `/config` (its last GitOps round);
- every gateway's metrics listener (its SVID and running version);
- with a Kubernetes API client: a SelfSubjectAccessReview per permission the agent needs and
  the CRD list, in a thread (the `kubernetes` client blocks).

Each HTTP answer's `Date` header, with the local send and receive times, is a clock sample. A
read that fails becomes the fact's `error`; nothing here raises for an unreachable component.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from email.utils import parsedate_to_datetime
from typing import Any

from fedgate import rates
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
from fedgate.errors import FedgateError
from fedgate.etcdopts import env_connect_kwargs
from fedgate.topology import http_get_headers

Json = dict[str, Any]
Now = Callable[[], float]
KUBE_TIMEOUT = 5.0


async def _get(address: str, path: str, timeout: float, now: Now) -> tuple[str, Clock | None]:  # noqa: ASYNC109
    host, _, port = address.rpartition(":")
    sent = now()
    headers, body = await http_get_headers(host, int(port), path, timeout)
    received = now()
    clock = None
    if date := headers.get("date"):
        try:
            clock = Clock(sent, received, parsedate_to_datetime(date).timestamp())
        except (TypeError, ValueError):
            clock = None
    return body, clock


def _certs(scrape: rates.Scrape) -> tuple[Cert, ...]:
    out = []
    for labels, value in scrape.named("fedgate_certificate_expiry_timestamp_seconds").items():
        d = dict(labels)
        out.append(
            Cert(
                d.get("kind", ""),
                d.get("identity", ""),
                d.get("trust_domain", ""),
                d.get("fingerprint", ""),
                value,
            )
        )
    return tuple(sorted(out, key=lambda c: (c.kind, c.identity, c.fingerprint)))


def _version(scrape: rates.Scrape, component: str) -> str:
    for labels in scrape.named("fedgate_config_version_info"):
        d = dict(labels)
        if d.get("component") == component:
            return d.get("version", "")
    return ""


async def _component(
    kind: str,
    name: str,
    address: str,
    timeout: float,  # noqa: ASYNC109
    now: Now,
) -> Component:
    try:
        text, clock = await _get(address, "/metrics", timeout, now)
        scrape = rates.parse(text, 0.0)
    except (FedgateError, ValueError) as e:
        return Component(kind, name, address, error=str(e) or type(e).__name__)
    subscribers = tuple(
        Subscriber(d.get("node", ""), d.get("kind", ""), d.get("cluster", ""), d.get("version", ""))
        for d in (dict(labels) for labels in scrape.named("fedgate_config_subscriber_version_info"))
    )
    return Component(
        kind,
        name,
        address,
        leader=scrape.value("fedgate_controller_leader") == 1.0,
        version=_version(scrape, kind),
        subscribers=tuple(sorted(subscribers, key=lambda s: s.node)),
        certs=_certs(scrape),
        clock=clock,
    )


async def _etcd(endpoints: list[str], timeout: float) -> tuple[Json, GitOps]:  # noqa: ASYNC109
    from federation.etcd import etcd_client
    from federation.gitops.store import ConfigStore
    from fedgate.cli_config import issue_line
    from fedgate.cli_status import collect as status_collect

    async with asyncio.timeout(timeout):
        data = await status_collect(endpoints)
        async with etcd_client(endpoints, **env_connect_kwargs()) as client:
            state = await ConfigStore(client).state()
    g = GitOps()
    if state.commit is not None:
        c = state.commit
        g = GitOps(applied_sha=c.sha, applied_subject=c.subject, applied_at=c.applied_at)
    if (r := state.rejection) is not None:
        issues = tuple(issue_line(i) for i in r.issues)
        g = replace(
            g,
            rejected_sha=r.sha,
            rejected_at=r.rejected_at,
            issues=issues,
            total=r.total or len(issues),
        )
    return data, g


async def _last_round(leader_admin: str, timeout: float, now: Now) -> tuple[str, str]:  # noqa: ASYNC109
    """The leader's last GitOps round (result, detail) from its /config; ("", "") if unknown."""
    try:
        body, _ = await _get(leader_admin, "/config", timeout, now)
        last = (json.loads(body).get("gitops") or {}).get("last") or {}
    except (FedgateError, ValueError, AttributeError):
        return "", ""
    return str(last.get("result", "")), str(last.get("detail", ""))


async def collect(
    etcd_endpoints: list[str],
    controller_admins: Sequence[str] = (),
    kube: Sequence[Callable[[], KubeFacts]] = (),
    timeout: float = 3.0,  # noqa: ASYNC109
    now: Now = time.time,
) -> Facts:
    kube_task = asyncio.gather(*(asyncio.to_thread(probe) for probe in kube))
    etcd = ",".join(etcd_endpoints)
    data: Json = {}
    gitops = GitOps()
    etcd_error = ""
    try:
        data, gitops = await _etcd(etcd_endpoints, timeout + 2.0)
    except TimeoutError:
        etcd_error = f"no answer within {timeout + 2.0:g} s"
    except Exception as e:  # an operator tool: the reason is the fact
        etcd_error = str(e) or type(e).__name__
    leader = data.get("leader", {})
    leader_admin = str(leader.get("admin", ""))
    admins = list(dict.fromkeys([*controller_admins, *([leader_admin] if leader_admin else [])]))
    gw = data.get("gateways", {})
    gw_addresses = {n: str(g.get("address", "")) for n, g in gw.get("clusters", {}).items()}
    controllers, gateways, last = await asyncio.gather(
        asyncio.gather(*(_component("controller", a, a, timeout, now) for a in admins)),
        asyncio.gather(
            *(
                _component("gateway", n, a, timeout, now)
                for n, a in sorted(gw_addresses.items())
                if a
            )
        ),
        _last_round(leader_admin, timeout, now) if leader_admin else _none(),
    )
    if last[0]:
        gitops = replace(gitops, last_result=last[0], last_detail=last[1])
    clusters = tuple(
        ClusterFacts(
            name,
            c.get("lease") == "alive",
            bool(c.get("routed")),
            str(c.get("liveness", {}).get("state", "")),
        )
        for name, c in data.get("clusters", {}).items()
    )
    links = tuple(
        Link(lk["source"], lk["destination"], lk["health"], lk.get("reason", ""), lk.get("rtt_ms"))
        for lk in gw.get("links", [])
    )
    return Facts(
        etcd=etcd,
        etcd_error=etcd_error,
        leader_id=str(leader.get("id", "")),
        leader_admin=leader_admin,
        controllers=tuple(controllers),
        gateways=tuple(gateways),
        clusters=clusters,
        links=links,
        topology_error="" if etcd_error else str(gw.get("error", "")),
        gitops=gitops,
        kube=tuple(await kube_task),
    )


async def _none() -> tuple[str, str]:
    return "", ""


# --- Kubernetes -------------------------------------------------------------------------------


def kube_probe(kubeconfig: str | None, context: str | None) -> Callable[[], KubeFacts]:
    """What `collect` runs in a thread for one cluster: load the credentials (a kubeconfig and
    context, or the pod's ServiceAccount when `kubeconfig` is None), ask, close."""

    def probe() -> KubeFacts:
        try:
            api_client = kube_client(kubeconfig, context)
        except Exception as e:  # a broken kubeconfig is a failed check, not a traceback
            reason = str(e) or type(e).__name__
            where = kubeconfig or "in-cluster"
            return KubeFacts(where, context or "", error=f"cannot load the credentials: {reason}")
        try:
            return kube_facts(api_client, context or "")
        finally:
            api_client.close()

    return probe


def kube_facts(api_client: Any, context: str = "") -> KubeFacts:
    """Ask the API server (blocking; run it in a thread): its version, a SelfSubjectAccessReview
    per needed permission (cluster-wide: the agent's ClusterRole), the established CRDs."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    server = str(api_client.configuration.host)
    errors = (ApiException, HTTPError, OSError, ValueError)
    try:
        version = client.VersionApi(api_client).get_code(_request_timeout=KUBE_TIMEOUT)
    except errors as e:
        return KubeFacts(server, context, error=_kube_error(e))
    authz = client.AuthorizationV1Api(api_client)
    access = []
    for need in NEEDS:
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    verb=need.verb,
                    group=need.group,
                    resource=need.resource,
                    subresource=need.subresource or None,
                    name=need.name or None,
                )
            )
        )
        try:
            got = authz.create_self_subject_access_review(review, _request_timeout=KUBE_TIMEOUT)
            status = got.status
            if status is None:
                raise ValueError("the review has no status")
            reason = status.reason or status.evaluation_error or ""
            access.append(Access(need, bool(status.allowed), reason))
        except errors as e:
            access.append(Access(need, False, f"review failed: {_kube_error(e)}"))
    crds: set[str] = set()
    crd_error = ""
    try:
        listed = client.ApiextensionsV1Api(api_client).list_custom_resource_definition(
            _request_timeout=KUBE_TIMEOUT
        )
        for crd in listed.items:
            conditions = (crd.status.conditions if crd.status else None) or []
            name = crd.metadata.name if crd.metadata else None
            if name in CRDS and any(
                c.type == "Established" and c.status == "True" for c in conditions
            ):
                crds.add(str(name))
    except errors as e:
        crd_error = f"cannot list CRDs: {_kube_error(e)}"
    return KubeFacts(
        server,
        context,
        version=str(version.git_version),
        access=tuple(access),
        crds=frozenset(crds),
        crd_error=crd_error,
    )


def _kube_error(e: Exception) -> str:
    from kubernetes.client.exceptions import ApiException

    if isinstance(e, ApiException):
        return f"{e.status} {e.reason}"
    return str(e) or type(e).__name__


def kube_client(kubeconfig: str | None, context: str | None) -> Any:
    """An API client from a kubeconfig, or the pod's ServiceAccount when `kubeconfig` is None."""
    import kubernetes

    if kubeconfig is not None:
        return kubernetes.config.new_client_from_config(config_file=kubeconfig, context=context)
    config = kubernetes.client.Configuration()
    kubernetes.config.load_incluster_config(client_configuration=config)
    return kubernetes.client.ApiClient(config)
