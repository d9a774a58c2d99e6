"""`fedgate authz check`: what the destination sidecars would decide about one call.

Like `istioctl x authz check`, it reads what is applied (the AuthorizationPolicies under
/fedgate/config/ and the service's ports from the controller's status in etcd) and runs the same
decision the sidecars run (`mesh.authz.authorize`), printing the verdict and the policy that made
it. On a TCP port `--method` and `--path` do not apply (the sidecar cannot see them either), and
the decision is the fail-closed one the sidecar makes. Exit status: 0 allowed, 1 denied,
2 when the applied config cannot be read.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from fedgate.cli_status import etcd_or_rig


@click.group("authz")
def authz_group() -> None:
    """AuthorizationPolicy: check a call against the applied policies."""


@authz_group.command("check")
@click.argument("caller")
@click.argument("service")
@click.option("--port", type=int, default=0, help="Service port (default: its first port).")
@click.option("--method", default="", help="HTTP method (HTTP, HTTP2 and GRPC ports).")
@click.option("--path", default="", help="Request path, e.g. /api/v1 or /pkg.Svc/Method.")
@etcd_or_rig
def check(
    caller: str,
    service: str,
    port: int,
    method: str,
    path: str,
    etcd_endpoints: str,
    rig_dir: Path,
) -> None:
    """Decide a call from CALLER (a SPIFFE ID) to SERVICE (<svc>.<ns>[.svc.clusterset.local])."""
    from fedgate.cli_status import collect, rerun_in_rig
    from mesh.authz import AuthzRequest, authorize
    from mesh.codec import authorization_from_json
    from mesh.errors import MeshError
    from mesh.model import HTTP_PROTOCOLS
    from mesh.naming import ServiceKey, SpiffeId

    if not etcd_endpoints:
        args = ["authz", "check", caller, service, "--port", str(port)]
        args += ["--method", method, "--path", path]
        sys.exit(rerun_in_rig(rig_dir, args))
    try:
        SpiffeId.parse(caller)
        parts = service.split(".")
        if len(parts) < 2:
            raise click.BadParameter(f"{service!r}: expected <service>.<namespace>")
        key = ServiceKey(parts[1], parts[0])
    except (ValueError, MeshError) as e:
        raise click.BadParameter(str(e)) from e
    named = (key.name, key.namespace)
    try:
        data = asyncio.run(collect(etcd_endpoints.split(",")))
    except Exception as e:  # an operator tool: one clear line, not a traceback
        click.echo(f"error: cannot read etcd at {etcd_endpoints}: {e}", err=True)
        sys.exit(2)
    status = next(
        (s for s in data["services"] if (s.get("name"), s.get("namespace")) == named),
        None,
    )
    ports = {int(p["port"]): str(p["protocol"]) for p in (status or {}).get("ports", [])}
    port = port or (min(ports) if ports else 0)
    protocol = ports.get(port, "TCP")
    policies = [
        authorization_from_json(a)
        for a in data["authorization"]
        if (a["service"], a["namespace"]) == named
    ]
    http = protocol in HTTP_PROTOCOLS
    req = AuthzRequest(
        caller, port, (method or "GET") if http else None, (path or "/") if http else None
    )
    decision = authorize(policies, req)
    click.echo(f"service   {key.fqdn} port {port or '-'} ({protocol})")
    click.echo(f"caller    {caller}")
    if http:
        click.echo(f"request   {req.method} {req.path}")
    elif method or path:
        click.echo("request   method and path do not apply: the port is not HTTP")
    names = ", ".join(f"{p.ref} ({p.action})" for p in policies) or "none"
    click.echo(f"policies  {names}")
    click.echo(f"decision  {'ALLOW' if decision.allowed else 'DENY'}: {decision.reason}")
    sys.exit(0 if decision.allowed else 1)
