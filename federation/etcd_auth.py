"""etcd users and roles for a federation: an agent may write only its own cluster's prefix.

With etcd auth enabled every fedgate process logs in as its own user
(`federation.etcd.open_client(credentials=...)`) and holds exactly these permissions:

| user               | role                   | permission | key range                         |
|--------------------|------------------------|------------|-----------------------------------|
| `agent-<cluster>`  | `fedgate-agent-<c>`    | readwrite  | /fedgate/clusters/<cluster>/      |
|                    |                        | read       | /fedgate/status/services/         |
|                    |                        | read       | /fedgate/config/denied/           |
| `controller`       | `fedgate-controller`   | readwrite  | /fedgate/ (all of it)             |
| `config-sync`      | `fedgate-config-sync`  | readwrite  | /fedgate/config/                  |
| `reader`           | `fedgate-reader`       | read       | /fedgate/ (`fedgate status`)      |
| `root`             | `root`                 | everything | (provisioning only)               |

An agent's writes all stay inside its prefix: its transaction's guard reads the prefix, its
puts and deletes write it, and lease keepalive needs no key permission. It also reads, and only
reads, the leader's service status records (what it writes back into its Kubernetes cluster as
ServiceImports and ServiceExport conditions) and the deny list (its CA refuses denied
renewals). etcd checks the keys of a lease on revoke, so an agent cannot revoke another
cluster's lease either. Lease *grant* is open to every authenticated user (etcd has no
permission for it): a rogue agent can create leases, but cannot attach them to anything outside
its prefix.

What this does not give: etcd's simple tokens travel in clear without TLS, so the rig (plain
HTTP etcd on a private bridge) would need client TLS first to make auth meaningful; with client
TLS, etcd can instead take the user from the certificate's CN (`--client-cert-auth`), which
needs no passwords. `provision()` is the one-time set-up (run as root, before `auth enable`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from etcd3aio import Etcd3Client, PermissionType, prefix_range_end

from federation import keys
from federation.errors import StoreError
from federation.etcd import store_errors

ROOT_USER = "root"
CONTROLLER_USER = "controller"
CONFIG_SYNC_USER = "config-sync"
READER_USER = "reader"


@dataclass(frozen=True, slots=True)
class Grant:
    role: str
    permission: PermissionType
    prefix: str
    reads: tuple[str, ...] = ()  # further prefixes the role may only read


def agent_user(cluster: str) -> str:
    return f"agent-{cluster}"


def grants(clusters: Iterable[str]) -> dict[str, Grant]:
    """user -> the one grant of its role (pure: the table in the module docstring)."""
    out = {
        CONTROLLER_USER: Grant("fedgate-controller", PermissionType.READWRITE, keys.ROOT),
        CONFIG_SYNC_USER: Grant(
            "fedgate-config-sync", PermissionType.READWRITE, keys.CONFIG_PREFIX
        ),
        READER_USER: Grant("fedgate-reader", PermissionType.READ, keys.ROOT),
    }
    for cluster in clusters:
        out[agent_user(cluster)] = Grant(
            f"fedgate-agent-{cluster}",
            PermissionType.READWRITE,
            keys.cluster_prefix(cluster),
            reads=(keys.SERVICE_STATUS_PREFIX, keys.DENIED_PREFIX),
        )
    return out


async def provision(
    client: Etcd3Client, root_password: str, passwords: Mapping[str, str], clusters: Iterable[str]
) -> None:
    """Create root, every user in `passwords` with its role, then enable auth (as root)."""
    auth = client.auth
    if auth is None:
        raise StoreError("etcd client is not connected")
    table = grants(clusters)
    unknown = sorted(set(passwords) - table.keys())
    if unknown:
        raise ValueError(f"no role for users {unknown}")
    with store_errors("provision etcd auth"):
        await auth.user_add(ROOT_USER, root_password)
        await auth.user_grant_role(ROOT_USER, "root")
        for user, password in sorted(passwords.items()):
            grant = table[user]
            await auth.role_add(grant.role)
            permissions = [(grant.prefix, grant.permission)]
            permissions += [(prefix, PermissionType.READ) for prefix in grant.reads]
            for prefix, permission in permissions:
                await auth.role_grant_permission(
                    grant.role, prefix, prefix_range_end(prefix), perm_type=permission
                )
            await auth.user_add(user, password)
            await auth.user_grant_role(user, grant.role)
        await auth.auth_enable()
