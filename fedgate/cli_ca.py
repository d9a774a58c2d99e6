"""`fedgate ca ...`: create, inspect and rotate cluster CAs; deny and allow identities.

Every failure is a `click.ClickException` saying what was wrong and what to do; nothing here
prints a traceback for an operator's mistake. The procedures these commands implement are in
docs/identity.md.

Over the 450-line aim: one command per CA procedure of docs/identity.md, each with its options and
its operator-facing errors, sharing the option helpers at the top.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca import cadir, denylist
from ca.authority import root_id
from ca.bundle import TrustBundle, normalize_denial
from ca.errors import CAError, VerificationError
from ca.rotation import DEFAULT_GRACE
from ca.verify import spiffe_id_of, utcnow, verify_certs
from clusters.rig import topology
from fedgate.etcdopts import env_connect_kwargs

T = TypeVar("T")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> dt.timedelta:
    """`90`, `90s`, `5m`, `1h`, `365d` -> timedelta; ClickException otherwise."""
    m = _DURATION.match(text.strip())
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 5m, 1h or 365d")
    return dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


class Duration(click.ParamType[dt.timedelta, Any]):
    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> dt.timedelta:
        if isinstance(value, dt.timedelta):
            return value
        return parse_duration(str(value))


DURATION = Duration()


@click.group("ca")
def ca() -> None:
    """Cluster certificate authorities: init, inspect, rotate, deny, allow."""


# --- init ------------------------------------------------------------------------------------


@ca.command("init")
@click.option("--trust-domain", required=True, help="e.g. east.fedgate.local")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="CA directory.")
@click.option(
    "--max-svid-ttl",
    type=DURATION,
    default="1h",
    show_default=True,
    help="Longest SVID lifetime this CA issues (also how long a rotated-out root stays).",
)
@click.option("--root-ttl", type=DURATION, default="365d", show_default=True)
def init(trust_domain: str, out: Path, max_svid_ttl: dt.timedelta, root_ttl: dt.timedelta) -> None:
    """Create a CA directory with a new root for TRUST_DOMAIN."""
    try:
        authority = cadir.init_ca_dir(
            out, trust_domain, utcnow(), max_svid_ttl=max_svid_ttl, root_ttl=root_ttl
        )
    except CAError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"root CA for {trust_domain} written to {out} (root {authority.root_id})")


# --- inspect ---------------------------------------------------------------------------------


def _fetch_admin(address: str) -> bytes:
    url = f"http://{address}/config"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            body: dict[str, Any] = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise click.ClickException(f"cannot read {url}: {e}") from e
    pem = body.get("identityPem")
    if not isinstance(pem, str) or not pem:
        raise click.ClickException(f"{url} reports no certificate (identityPem)")
    return pem.encode()


def describe(cert: x509.Certificate, now: dt.datetime) -> dict[str, Any]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        uris, dns = [], []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    left = cert.not_valid_after_utc - now
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "ca": is_ca,
        "uris": list(uris),
        "dns": list(dns),
        "serial": format(cert.serial_number, "x"),
        "id": root_id(cert),
        "notBefore": cert.not_valid_before_utc.isoformat(),
        "notAfter": cert.not_valid_after_utc.isoformat(),
        "secondsLeft": int(left.total_seconds()),
    }


def _load_pems(source: str) -> tuple[list[x509.Certificate], str]:
    path = Path(source)
    if path.is_dir():
        try:
            state = cadir.load_ca_dir(path)
        except CAError as e:
            raise click.ClickException(str(e)) from e
        return list(state.published(utcnow())), f"CA directory {path}"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise click.ClickException(f"cannot read {path}: {e}") from e
    try:
        return x509.load_pem_x509_certificates(data), str(path)
    except ValueError as e:
        raise click.ClickException(f"{path} holds no PEM certificate: {e}") from e


@ca.command("inspect")
@click.argument("source", required=False)
@click.option("--admin", "admin", help="host:port of a running process's admin endpoint.")
@click.option(
    "--roots",
    "roots_path",
    type=click.Path(path_type=Path),
    help="Verify the chain against these roots (PEM file or CA directory).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(source: str | None, admin: str | None, roots_path: Path | None, as_json: bool) -> None:
    """Show a certificate chain: SOURCE is a PEM file or a CA directory, or use --admin.

    For each certificate: subject, issuer, SPIFFE ID and DNS SANs, validity and time left;
    with --roots, whether ca.verify accepts the chain (and why not)."""
    if (source is None) == (admin is None):
        raise click.UsageError("give exactly one of SOURCE or --admin")
    now = utcnow()
    if admin is not None:
        certs, origin = x509.load_pem_x509_certificates(_fetch_admin(admin)), f"admin {admin}"
    else:
        assert source is not None
        certs, origin = _load_pems(source)
    if not certs:
        raise click.ClickException(f"{origin} holds no certificate")
    out: dict[str, Any] = {"source": origin, "chain": [describe(c, now) for c in certs]}
    if roots_path is not None:
        roots, _ = _load_pems(str(roots_path))
        leaf = certs[0]
        try:
            td = spiffe_id_of(leaf).trust_domain
            bundle = TrustBundle.from_pem({td: [c.public_bytes(Encoding.PEM) for c in roots]})
            out["verified"] = verify_certs(certs, bundle, now).uri
        except VerificationError as e:
            out["verified"] = None
            out["refused"] = str(e)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        _print_chain(out)
    if roots_path is not None and out.get("verified") is None:
        sys.exit(1)


def _print_chain(out: dict[str, Any]) -> None:
    click.echo(f"source: {out['source']}")
    for i, c in enumerate(out["chain"]):
        role = "CA" if c["ca"] else "leaf"
        click.echo(f"[{i}] {role}  {c['subject']}")
        click.echo(f"    issuer     {c['issuer']}")
        for uri in c["uris"]:
            click.echo(f"    URI SAN    {uri}")
        for name in c["dns"]:
            click.echo(f"    DNS SAN    {name}")
        click.echo(f"    id         {c['id']}  serial {c['serial']}")
        click.echo(f"    valid      {c['notBefore']} .. {c['notAfter']}")
        left = c["secondsLeft"]
        state = "EXPIRED" if left < 0 else f"{left} s left"
        click.echo(f"    time left  {state}")
    if "verified" in out:
        if out["verified"]:
            click.echo(f"verified: {out['verified']}")
        else:
            click.echo(f"REFUSED: {out['refused']}")


# --- rotate ----------------------------------------------------------------------------------


def _ca_dir(ca_dir: Path | None, cluster: str | None, rig_dir: Path) -> Path:
    if ca_dir is not None:
        return ca_dir
    if cluster is None:
        raise click.UsageError("give --ca-dir, or --cluster (with --rig-dir for a rig)")
    return rig_dir / "ca" / cluster


def _run(coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(coro())


def _published_roots(etcd: str, cluster: str) -> tuple[str, ...] | None:
    from federation import denied
    from federation.errors import StoreError
    from federation.etcd import etcd_client

    async def read() -> tuple[str, ...] | None:
        async with etcd_client(etcd.split(","), **env_connect_kwargs()) as client:
            info = await denied.cluster_info(client, cluster)
        return info.roots if info else None

    try:
        return _run(read)
    except StoreError as e:
        raise click.ClickException(f"etcd at {etcd}: {e}") from e


def _wait_published(etcd: str, cluster: str, rid: str, timeout: float) -> float:
    started = time.monotonic()
    while True:
        roots = _published_roots(etcd, cluster) or ()
        ids = set()
        for pem in roots:
            try:
                ids.add(root_id(x509.load_pem_x509_certificate(pem.encode())))
            except ValueError:
                continue
        if rid in ids:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise click.ClickException(
                f"root {rid} is not published by cluster {cluster} after {timeout:.0f} s: is its "
                "agent running (it re-reads the CA directory every second, or on SIGHUP)? "
                "The rotation stays pending; re-run with --activate once it is published, "
                "or --abort."
            )
        time.sleep(0.25)


@ca.command("rotate")
@click.option("--ca-dir", type=click.Path(path_type=Path), help="The cluster's CA directory.")
@click.option("--cluster", help="Cluster name (its CA directory in the rig; its etcd info).")
@click.option(
    "--rig-dir",
    type=click.Path(path_type=Path),
    default=topology.DEFAULT_RIG_DIR,
    show_default=True,
)
@click.option("--etcd", help="host:port: wait until the cluster's agent publishes the new root.")
@click.option(
    "--settle",
    type=DURATION,
    default="10s",
    show_default=True,
    help="Wait after publication before switching issuance (one config push everywhere).",
)
@click.option(
    "--grace",
    type=DURATION,
    default=f"{int(DEFAULT_GRACE.total_seconds())}s",
    show_default=True,
    help="Keep the old root this long beyond the longest SVID lifetime.",
)
@click.option("--prepare-only", is_flag=True, help="Only add the new root (step 1).")
@click.option("--activate", "activate_only", is_flag=True, help="Only switch issuance (step 2).")
@click.option("--abort", is_flag=True, help="Drop a pending (never activated) root.")
@click.option("--prune", is_flag=True, help="Delete roots past their retirement (step 3).")
def rotate(
    ca_dir: Path | None,
    cluster: str | None,
    rig_dir: Path,
    etcd: str | None,
    settle: dt.timedelta,
    grace: dt.timedelta,
    prepare_only: bool,
    activate_only: bool,
    abort: bool,
    prune: bool,
) -> None:
    """Rotate a cluster's root without dropping a connection.

    1. add a new root (published beside the current one; every verifier trusts both after one
    config push); 2. once it is published (--etcd) and --settle has passed, switch issuance to
    it; 3. the old root retires by itself after the longest SVID lifetime plus --grace (the
    agent stops publishing it); --prune then deletes its files."""
    if sum((prepare_only, activate_only, abort, prune)) > 1:
        raise click.UsageError("--prepare-only, --activate, --abort and --prune exclude each other")
    directory = _ca_dir(ca_dir, cluster, rig_dir)
    try:
        if abort:
            click.echo(f"dropped pending root {cadir.abort_rotation(directory)}")
            return
        if prune:
            gone = cadir.prune_retired(directory, utcnow())
            click.echo(f"pruned {', '.join(gone)}" if gone else "nothing to prune")
            return
        if activate_only:
            pending = cadir.load_ca_dir(directory).plan.pending
            if pending is None:
                raise click.ClickException("no rotation is pending (run without --activate)")
            _activate(directory, pending.id, grace)
            return
        rid = cadir.prepare_rotation(directory, utcnow())
        click.echo(f"step 1: new root {rid} added (pending); the agent publishes it")
        if prepare_only:
            click.echo("activate it once every cluster trusts it: fedgate ca rotate --activate")
            return
        if etcd is not None:
            if cluster is None:
                raise click.UsageError("--etcd needs --cluster (whose info to watch)")
            took = _wait_published(etcd, cluster, rid, timeout=60)
            click.echo(f"        published by cluster {cluster} after {took:.1f} s")
        time.sleep(settle.total_seconds())
        _activate(directory, rid, grace)
    except CAError as e:
        raise click.ClickException(str(e)) from e


def _activate(directory: Path, rid: str, grace: dt.timedelta) -> None:
    plan = cadir.activate_rotation(directory, rid, utcnow(), grace)
    click.echo(f"step 2: root {rid} now issues; workloads move to it at their next renewal")
    for r in plan.roots:
        if r.retire_at is not None and r.id != rid:
            click.echo(f"step 3: root {r.id} retires at {r.retire_at.isoformat()} (automatic)")


# --- deny / allow ----------------------------------------------------------------------------


def _entry(
    identity: str | None, cluster: str | None, trust_domain: str | None, etcd: str
) -> tuple[str, str]:
    """(canonical deny entry, cluster name or "") from exactly one selector."""
    if sum(x is not None for x in (identity, cluster, trust_domain)) != 1:
        raise click.UsageError("give exactly one of --identity, --cluster, --trust-domain")
    try:
        if identity is not None:
            return normalize_denial(identity), ""
        if trust_domain is not None:
            return normalize_denial(f"spiffe://{trust_domain}"), ""
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    assert cluster is not None
    from federation import denied
    from federation.errors import StoreError
    from federation.etcd import etcd_client

    async def lookup() -> str | None:
        async with etcd_client(etcd.split(","), **env_connect_kwargs()) as client:
            info = await denied.cluster_info(client, cluster)
        return info.trust_domain if info else None

    try:
        td = _run(lookup)
    except StoreError as e:
        raise click.ClickException(f"etcd at {etcd}: {e}") from e
    if td is None:
        raise click.ClickException(
            f"cluster {cluster!r} publishes no info in etcd (not running?): "
            "give its trust domain with --trust-domain"
        )
    return f"spiffe://{td}", cluster


_selectors = [
    click.option("--etcd", required=True, help="host:port[,host:port...]"),
    click.option("--identity", help="An exact SPIFFE ID."),
    click.option("--cluster", help="A cluster: its whole trust domain."),
    click.option("--trust-domain", help="A trust domain."),
]


def _with_selectors(f: Any) -> Any:
    for opt in reversed(_selectors):
        f = opt(f)
    return f


@ca.command("deny")
@_with_selectors
@click.option("--reason", default="", help="Recorded with the entry.")
def deny(
    etcd: str, identity: str | None, cluster: str | None, trust_domain: str | None, reason: str
) -> None:
    """Deny an identity or a whole cluster everywhere (effective within one config push)."""
    from federation import denied
    from federation.errors import StoreError
    from federation.etcd import etcd_client

    entry, by_cluster = _entry(identity, cluster, trust_domain, etcd)
    denial = denylist.new_denial(entry, reason, utcnow(), by_cluster)

    async def write() -> None:
        async with etcd_client(etcd.split(","), **env_connect_kwargs()) as client:
            await denied.put(client, denial)

    try:
        _run(write)
    except StoreError as e:
        raise click.ClickException(f"etcd at {etcd}: {e}") from e
    click.echo(f"denied {entry} ({denylist.key_for(entry)})")


@ca.command("allow")
@_with_selectors
def allow(etcd: str, identity: str | None, cluster: str | None, trust_domain: str | None) -> None:
    """Remove a deny entry (new handshakes succeed again after one config push)."""
    from federation import denied
    from federation.errors import StoreError
    from federation.etcd import etcd_client

    entry, _ = _entry(identity, cluster, trust_domain, etcd)

    async def remove() -> bool:
        async with etcd_client(etcd.split(","), **env_connect_kwargs()) as client:
            return await denied.delete(client, entry)

    try:
        removed = _run(remove)
    except StoreError as e:
        raise click.ClickException(f"etcd at {etcd}: {e}") from e
    if not removed:
        raise click.ClickException(f"{entry} was not denied")
    click.echo(f"allowed {entry}")


@ca.command("denied")
@click.option("--etcd", required=True, help="host:port[,host:port...]")
def list_denied(etcd: str) -> None:
    """List the deny list."""
    from federation import denied
    from federation.errors import StoreError
    from federation.etcd import etcd_client

    async def read() -> tuple[denylist.Denial, ...]:
        async with etcd_client(etcd.split(","), **env_connect_kwargs()) as client:
            return await denied.load(client)

    try:
        entries = _run(read)
    except StoreError as e:
        raise click.ClickException(f"etcd at {etcd}: {e}") from e
    for d in entries:
        extra = f" (cluster {d.cluster})" if d.cluster else ""
        click.echo(f"{d.entry}{extra}  {d.created}  {d.reason}")
