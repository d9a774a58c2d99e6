"""The etcd key layout, in one place, pure.

```
/fedgate/clusters/<cluster>/info                 ClusterInfo JSON        (agent, leased)
/fedgate/clusters/<cluster>/exports/<ns>/<svc>   ServiceExport JSON      (agent, leased)
/fedgate/vips/<ns>/<svc>                         "10.255.x.y"            (controller)
/fedgate/config/policies/<ns>/<svc>              TrafficPolicy JSON      (GitOps sync; seed: leader)
/fedgate/config/commit                           commit SHA of the config (GitOps sync)
/fedgate/config/denied/...                       deny list (identity issue)
/fedgate/config/...                              other GitOps documents, read raw
/fedgate/leader                                  LeaderRecord JSON       (elected replica, leased)
/fedgate/status/clusters/<cluster>               ClusterStatus JSON      (leader: liveness, damping)
/fedgate/status/services/<ns>/<svc>              ServiceStatus JSON      (leader: MCS conditions)
/fedgate/status/config                           ConfigStatus JSON       (leader: served version)
```

The controller reads everything under /fedgate/config/ as one consistent config (GitOps writes it
in one transaction with the commit key); keys it does not understand reach `generate()` raw.

Every name segment is an RFC 1123 label (checked by `mesh.naming`), so no segment can contain
`/` and a prefix scan of one cluster never reaches another's keys. Parsing is strict because
keys come from a store that agents of other clusters write to: anything off-layout raises
`KeyLayoutError` and the reader skips it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import MeshError
from mesh.naming import ServiceKey, check_label

ROOT = "/fedgate/"
CLUSTERS_PREFIX = ROOT + "clusters/"
VIPS_PREFIX = ROOT + "vips/"
CONFIG_PREFIX = ROOT + "config/"
POLICIES_PREFIX = CONFIG_PREFIX + "policies/"
DENIED_PREFIX = CONFIG_PREFIX + "denied/"
AUTHORIZATION_PREFIX = CONFIG_PREFIX + "authorization/"
COMMIT_KEY = CONFIG_PREFIX + "commit"
FEDERATION_KEY = CONFIG_PREFIX + "federation"
LEADER_KEY = ROOT + "leader"
STATUS_PREFIX = ROOT + "status/"
CLUSTER_STATUS_PREFIX = STATUS_PREFIX + "clusters/"
SERVICE_STATUS_PREFIX = STATUS_PREFIX + "services/"
CONFIG_STATUS_KEY = STATUS_PREFIX + "config"


class KeyLayoutError(ValueError):
    """A key under /fedgate/ does not follow the layout."""


def cluster_prefix(cluster: str) -> str:
    return f"{CLUSTERS_PREFIX}{check_label(cluster, 'cluster name')}/"


def info_key(cluster: str) -> str:
    return cluster_prefix(cluster) + "info"


def exports_prefix(cluster: str) -> str:
    return cluster_prefix(cluster) + "exports/"


def export_key(cluster: str, service: ServiceKey) -> str:
    return f"{exports_prefix(cluster)}{service.namespace}/{service.name}"


def vip_key(service: ServiceKey) -> str:
    return f"{VIPS_PREFIX}{service.namespace}/{service.name}"


def policy_key(service: ServiceKey) -> str:
    return f"{POLICIES_PREFIX}{service.namespace}/{service.name}"


def authorization_key(namespace: str, name: str) -> str:
    """Where the AuthorizationPolicy `<namespace>/<name>` is kept."""
    return f"{AUTHORIZATION_PREFIX}{namespace}/{check_label(name, 'name')}"


def cluster_status_key(cluster: str) -> str:
    return CLUSTER_STATUS_PREFIX + check_label(cluster, "cluster name")


def service_status_key(service: ServiceKey) -> str:
    return f"{SERVICE_STATUS_PREFIX}{service.namespace}/{service.name}"


def parse_cluster_status_key(key: str) -> str:
    """The cluster named by `/fedgate/status/clusters/<cluster>`."""
    if not key.startswith(CLUSTER_STATUS_PREFIX):
        raise KeyLayoutError(f"{key!r} is not under {CLUSTER_STATUS_PREFIX}")
    name = key[len(CLUSTER_STATUS_PREFIX) :]
    try:
        return check_label(name, "cluster name")
    except MeshError as e:
        raise KeyLayoutError(f"{key!r}: {e}") from e


@dataclass(frozen=True, slots=True)
class ClusterKey:
    """A parsed key under /fedgate/clusters/: `service` is None for the `info` key."""

    cluster: str
    service: ServiceKey | None


def _service(namespace: str, name: str, key: str) -> ServiceKey:
    try:
        return ServiceKey(namespace, name)
    except MeshError as e:
        raise KeyLayoutError(f"{key!r}: {e}") from e


def parse_cluster_key(key: str) -> ClusterKey:
    """Parse `/fedgate/clusters/<cluster>/info` or `.../exports/<ns>/<svc>`."""
    if not key.startswith(CLUSTERS_PREFIX):
        raise KeyLayoutError(f"{key!r} is not under {CLUSTERS_PREFIX}")
    parts = key[len(CLUSTERS_PREFIX) :].split("/")
    try:
        check_label(parts[0], "cluster name")
    except MeshError as e:
        raise KeyLayoutError(f"{key!r}: {e}") from e
    if parts[1:] == ["info"]:
        return ClusterKey(parts[0], None)
    if len(parts) == 4 and parts[1] == "exports":
        return ClusterKey(parts[0], _service(parts[2], parts[3], key))
    raise KeyLayoutError(
        f"{key!r} is neither {CLUSTERS_PREFIX}<cluster>/info nor .../exports/<ns>/<svc>"
    )


def parse_service_key(prefix: str, key: str) -> ServiceKey:
    """Parse `<prefix><ns>/<svc>` (the VIP and policy keys)."""
    if not key.startswith(prefix):
        raise KeyLayoutError(f"{key!r} is not under {prefix}")
    parts = key[len(prefix) :].split("/")
    if len(parts) != 2:
        raise KeyLayoutError(f"{key!r} is not {prefix}<ns>/<svc>")
    return _service(parts[0], parts[1], key)
