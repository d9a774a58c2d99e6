"""`fedgate etcd provision`, which creates `federation.etcd_auth`'s users and roles (the etcd
client options it shares with `fedgate agent` and `fedgate controller`: `fedgate.etcdopts`).

Provisioning is idempotent, so the management cluster's Job can run at every install: on an
etcd without auth it is `etcd_auth.provision` (users, roles, then `auth enable`); once auth is
on it logs in as root and adds only the users missing, e.g. the agent of a cluster that joined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import click

from fedgate.etcdopts import EtcdClientOptions, etcd_client_options


@click.group("etcd")
def etcd_group() -> None:
    """The federation's etcd: users and roles (federation/etcd_auth.py)."""


def read_passwords(directory: Path) -> dict[str, str]:
    """One file per etcd user, its content the password (a mounted Secret's layout)."""
    return {
        p.name: p.read_text().strip()
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


@etcd_group.command("provision")
@click.option("--etcd", "etcd_endpoints", required=True, help="host:port[,host:port...]")
@etcd_client_options
@click.option(
    "--users-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="One file per user (root, controller, reader, config-sync, agent-<cluster>): its "
    "password. Only the users present are created.",
)
@click.option("--clusters", required=True, help="Member clusters, comma-separated.")
def provision(
    etcd_endpoints: str, etcd_client: EtcdClientOptions, users_dir: Path, clusters: str
) -> None:
    """Create the etcd users and roles and enable auth; later runs add missing users."""
    import asyncio

    from federation.errors import StoreError
    from federation.etcd_auth import ROOT_USER

    passwords = read_passwords(users_dir)
    root = passwords.pop(ROOT_USER, "")
    if not root:
        raise click.ClickException(f"{users_dir}/{ROOT_USER} is missing: the root password")
    names = [c.strip() for c in clusters.split(",") if c.strip()]
    try:
        done = asyncio.run(
            ensure_auth(etcd_endpoints.split(","), etcd_client, root, passwords, names)
        )
    except (StoreError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(done)


async def ensure_auth(
    endpoints: Sequence[str],
    options: EtcdClientOptions,
    root_password: str,
    passwords: Mapping[str, str],
    clusters: Sequence[str],
) -> str:
    from etcd3aio import prefix_range_end

    from federation.errors import StoreAuthError
    from federation.etcd import etcd_client, store_errors
    from federation.etcd_auth import ROOT_USER, grants
    from federation.etcd_auth import provision as provision_auth

    async with etcd_client(endpoints, **options.connect_kwargs()) as client:
        assert client.auth is not None
        try:
            with store_errors("auth status"):
                enabled = (await client.auth.auth_status()).enabled
        except StoreAuthError:
            enabled = True  # with auth on, etcd answers an anonymous AuthStatus so
        if not enabled:
            await provision_auth(client, root_password, passwords, clusters)
            return f"etcd auth enabled with users {sorted(passwords)}"
    table = grants(clusters)
    unknown = sorted(set(passwords) - table.keys())
    if unknown:
        raise ValueError(f"no role for users {unknown}")
    kw = options.connect_kwargs(ROOT_USER, root_password)
    async with etcd_client(endpoints, **kw) as client:
        auth = client.auth
        assert auth is not None
        with store_errors("add etcd users"):
            present = set((await auth.user_list()).users)
            missing = sorted(set(passwords) - present)
            for user in missing:
                grant = table[user]
                await auth.role_add(grant.role)
                perms = [(grant.prefix, grant.permission)]
                perms += [(p, type(grant.permission).READ) for p in grant.reads]
                for prefix, perm in perms:
                    await auth.role_grant_permission(
                        grant.role, prefix, prefix_range_end(prefix), perm_type=perm
                    )
                await auth.user_add(user, passwords[user])
                await auth.user_grant_role(user, grant.role)
    return f"etcd auth already enabled; added users {missing}"
