"""`fedgate config ...`: the GitOps config repository from the command line.

- `validate PATH`  the sync's validation, offline (CI of the config repository): prints every
                   issue, exits 1 if there is any; with `--etcd`, also against the live
                   catalog's port protocols, as the controller's sync validates.
- `diff PATH`      what applying PATH would change against what etcd holds (exit 0: nothing,
                   1: differences, 2: PATH invalid or etcd unreachable), like `kubectl diff`.
- `status`         the applied commit and the last rejected one, with its issues.
- `schema`         the JSON Schema of the documents (docs/schema/fedgate.schema.json).
- `sync`           run the sync as its own process (the rig uses it until the controller
                   runs it behind leader election).
"""

from __future__ import annotations

import asyncio
import difflib
import json
import sys
from pathlib import Path
from typing import Any

import click

from fedgate.etcdopts import env_connect_kwargs

EXIT_INVALID = 1
EXIT_ERROR = 2


@click.group("config")
def config_group() -> None:
    """The federation's config repository (GitOps): validate, diff, status, sync."""


def _validate(path: Path, etcd_endpoints: str = "") -> Any:
    from federation.gitops.errors import RepositoryError
    from federation.gitops.validate import validate_directory

    ports = _catalog_ports(etcd_endpoints) if etcd_endpoints else None
    try:
        return validate_directory(path, ports)
    except RepositoryError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_ERROR)


def _print_issues(result: Any) -> None:
    for issue in result.issues:
        click.echo(str(issue))
    files = len({i.file for i in result.issues})
    click.echo(
        f"{len(result.issues)} issue(s) in {files} file(s); nothing would be applied", err=True
    )


def _catalog_ports(etcd_endpoints: str) -> Any:
    """Each service's port protocols, from the controller's service status in etcd."""
    from fedgate.cli_status import collect
    from mesh.naming import ServiceKey

    try:
        data = asyncio.run(collect(etcd_endpoints.split(",")))
    except Exception as e:  # an operator tool: one clear line, not a traceback
        click.echo(f"error: cannot read etcd at {etcd_endpoints}: {e}", err=True)
        sys.exit(EXIT_ERROR)
    return {
        ServiceKey(s["namespace"], s["name"]): {int(p["port"]): p["protocol"] for p in s["ports"]}
        for s in data["services"]
        if s.get("namespace") and s.get("name")
    }


@config_group.command("validate")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--etcd",
    "etcd_endpoints",
    default="",
    help="Also check against the live catalog (HTTP fields on TCP ports): host:port[,...]",
)
def validate(path: Path, etcd_endpoints: str) -> None:
    """Validate every YAML document under PATH (a checkout of the config repository)."""
    result = _validate(path, etcd_endpoints)
    if result.issues:
        _print_issues(result)
        sys.exit(EXIT_INVALID)
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(result.documents.items())) or "nothing"
    click.echo(f"valid: {kinds} in {result.files} file(s)")


def _pretty(raw: bytes) -> list[str]:
    try:
        return json.dumps(json.loads(raw), indent=2, sort_keys=True).splitlines()
    except ValueError:
        return raw.decode("utf-8", "replace").splitlines()


def _etcd_state(endpoints: str) -> Any:
    from federation.errors import StoreError
    from federation.etcd import etcd_client
    from federation.gitops.store import ConfigStore

    async def read() -> Any:
        async with etcd_client(endpoints.split(","), **env_connect_kwargs()) as client:
            return await ConfigStore(client).state()

    try:
        return asyncio.run(read())
    except StoreError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_ERROR)


@config_group.command("diff")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--etcd", "etcd_endpoints", required=True, help="host:port[,host:port...]")
def diff(path: Path, etcd_endpoints: str) -> None:
    """Show what applying PATH would change in the applied config."""
    from federation.gitops.store import desired_entries, diff_entries

    result = _validate(path)
    if result.config is None:
        _print_issues(result)
        sys.exit(EXIT_ERROR)
    state = _etcd_state(etcd_endpoints)
    if state.commit is not None:
        c = state.commit
        click.echo(f"applied commit {c.sha} {c.subject!r} at {c.applied_at or '?'}")
    else:
        click.echo("no commit applied yet")
    changes = diff_entries(state.entries, desired_entries(result.config))
    for key, value in changes.added.items():
        click.secho(f"+ {key}", fg="green")
        click.echo("\n".join(f"+   {line}" for line in _pretty(value)))
    for key, (old, new) in changes.changed.items():
        click.secho(f"~ {key}", fg="yellow")
        lines = difflib.unified_diff(_pretty(old), _pretty(new), lineterm="", n=2)
        click.echo("\n".join(f"    {line}" for line in list(lines)[2:]))
    for key in changes.removed:
        click.secho(f"- {key}", fg="red")
    if changes.empty:
        click.echo("no changes")
        return
    click.echo(
        f"{len(changes.added)} added, {len(changes.changed)} changed, "
        f"{len(changes.removed)} removed"
    )
    sys.exit(1)


@config_group.command("status")
@click.option("--etcd", "etcd_endpoints", required=True, help="host:port[,host:port...]")
def status(etcd_endpoints: str) -> None:
    """The applied commit, and the last rejected commit with every issue."""
    state = _etcd_state(etcd_endpoints)
    c = state.commit
    if c is None:
        click.echo("applied: none (no commit applied yet)")
    else:
        click.echo(f"applied: {c.sha} {c.subject!r} on {c.branch or '?'} at {c.applied_at}")
    click.echo(f"managed keys: {len(state.entries)}")
    r = state.rejection
    if r is None:
        click.echo("rejected: none")
        return
    click.secho(f"rejected: {r.sha} at {r.rejected_at}, {r.total} issue(s):", fg="red")
    for i in r.issues:
        click.echo(f"  {issue_line(i)}")


def issue_line(i: dict[str, Any]) -> str:
    """One issue of a rejection record: `file:line: document N: field: reason`."""
    where = ": ".join(
        part
        for part in (
            f"{i.get('file', '')}:{i.get('line')}" if i.get("line") else i.get("file", ""),
            f"document {i['document']}" if i.get("document") else "",
            i.get("field", ""),
        )
        if part
    )
    return f"{where}: {i.get('reason', '')}" if where else str(i.get("reason", ""))


@config_group.command("schema")
@click.option("--out", type=click.Path(path_type=Path), help="Write to this file.")
def schema(out: Path | None) -> None:
    """Print (or write) the JSON Schema of every fedgate document."""
    from federation.schema import json_schema

    text = json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    if out is None:
        click.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    click.echo(f"JSON Schema written to {out}")


@config_group.command("sync")
@click.option("--repo", "repository", required=True, help="Repository path or URL.")
@click.option("--branch", default="main", show_default=True)
@click.option("--path", "config_path", default="", help="Config directory inside the repo.")
@click.option("--etcd", "etcd_endpoints", required=True, help="host:port[,host:port...]")
@click.option("--workdir", type=click.Path(path_type=Path), required=True, help="Private clone.")
@click.option("--poll-interval", type=float, default=15.0, show_default=True)
def sync(
    repository: str,
    branch: str,
    config_path: str,
    etcd_endpoints: str,
    workdir: Path,
    poll_interval: float,
) -> None:
    """Follow the repository and apply each valid commit to etcd (runs until signalled)."""
    from fedgate import native_logs

    native_logs.take_over_stderr()  # before grpc is imported
    from federation.etcd import open_client
    from federation.gitops.store import ConfigStore
    from federation.gitops.sync import GitOpsSync, SyncSettings
    from fedgate import logs
    from fedgate.wiring import run_with_loop, until_signalled
    from mesh.tasks import TaskSet

    settings = SyncSettings(repository, branch, config_path, poll_interval, workdir)
    logs.configure("config-sync")

    async def main() -> None:
        client = await open_client(etcd_endpoints.split(","), **env_connect_kwargs())
        tasks = TaskSet("config-sync")
        tasks.spawn(GitOpsSync.from_settings(settings, ConfigStore(client)).run(), "sync")
        try:
            await until_signalled()
        finally:
            await tasks.aclose()
            await client.close()

    run_with_loop(main())
