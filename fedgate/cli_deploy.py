"""`fedgate manifests` (deploy/: one cluster's install as YAML) and `fedgate kind up|down`
(kind-configs/: the three-cluster kind rig)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from fedgate.manifests import settings as ms

_DEPLOY_HELP = "The deploy/ directory holding the vendored CRDs [default: this checkout's]."


@click.command()
@click.option("--cluster", required=True, help="This cluster's name (a DNS label).")
@click.option(
    "--role",
    type=click.Choice(ms.ROLES),
    default="member",
    show_default=True,
    help="management adds the controller and etcd to a member's objects.",
)
@click.option(
    "--gateway-address",
    required=True,
    help="host:port peer gateways dial: the gateway Service's load balancer address (or, "
    "with NodePort, a node's address and port 31443).",
)
@click.option("--image", default=ms.DEFAULT_IMAGE, show_default=True)
@click.option("--etcd-image", default=ms.DEFAULT_ETCD_IMAGE, show_default=True)
@click.option(
    "--gateway-service",
    type=click.Choice(ms.SERVICE_TYPES),
    default="LoadBalancer",
    show_default=True,
    help="Type of the Services other clusters reach (NodePort for kind).",
)
@click.option("--transport", type=click.Choice(ms.TRANSPORTS), default="tls", show_default=True)
@click.option(
    "--etcd",
    default="",
    help="The management cluster's etcd as this cluster reaches it (host:port,...); required "
    "for a member [management default: its in-cluster members].",
)
@click.option(
    "--controller",
    default="",
    help="The management cluster's controllers (host:port); required for a member.",
)
@click.option(
    "--clusters",
    default="",
    help="management: every member cluster, comma-separated (their etcd users are created).",
)
@click.option(
    "--ca-bundle",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The cluster CA's root(s), PEM (its CA directory's root.pem): the injection webhook's "
    "caBundle [default: left out, to be set by the installer].",
)
@click.option(
    "--cluster-dns",
    default="10.96.0.10",
    show_default=True,
    help="kube-dns's Service IP in this cluster (injected pods' second nameserver).",
)
@click.option(
    "--deploy-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help=_DEPLOY_HELP,
)
def manifests(
    cluster: str,
    role: str,
    gateway_address: str,
    image: str,
    etcd_image: str,
    gateway_service: str,
    transport: str,
    etcd: str,
    controller: str,
    clusters: str,
    ca_bundle: Path | None,
    cluster_dns: str,
    deploy_dir: Path | None,
) -> None:
    """Print the Kubernetes manifests installing fedgate on one cluster (kubectl apply -f -)."""
    from fedgate.manifests.render import DEPLOY_DIR, render, to_yaml
    from fedgate.manifests.settings import ManifestError, ManifestSettings

    try:
        bundle = ca_bundle.read_bytes() if ca_bundle is not None else None
    except OSError as e:
        raise click.ClickException(f"--ca-bundle: {e}") from e
    try:
        settings = ManifestSettings(
            cluster=cluster,
            gateway_address=gateway_address,
            role=role,
            image=image,
            gateway_service=gateway_service,
            transport=transport,
            etcd=etcd,
            controller=controller,
            clusters=tuple(c.strip() for c in clusters.split(",") if c.strip()),
            etcd_image=etcd_image,
            ca_bundle=bundle,
            cluster_dns=cluster_dns,
        )
        click.echo(to_yaml(render(settings, deploy_dir or DEPLOY_DIR)), nl=False)
    except ManifestError as e:
        raise click.ClickException(str(e)) from e


@click.group("kind")
def kind_group() -> None:
    """The three-cluster kind rig (kind-configs/; needs docker, kind, kubectl and openssl)."""


_REPO = Path(__file__).resolve().parents[1]
_state_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path(".fedgate-kind"),
    show_default=True,
    help="Where the rig's CA directories, etcd certificates and passwords are generated.",
)


def _options(state_dir: Path, image: str) -> object:
    from fedgate.kindplan import KindOptions

    return KindOptions(_REPO, state_dir.resolve(), image, shlex_join_self())


def shlex_join_self() -> str:
    """This installation of fedgate, whatever PATH says."""
    import shlex

    return shlex.join([sys.executable, "-m", "fedgate"])


def _run(steps: list[object], dry_run: bool) -> None:
    from fedgate.kindplan import Step, missing_tools

    if not dry_run:
        missing = missing_tools()
        if missing:
            raise click.ClickException(
                f"fedgate kind needs {', '.join(missing)} on PATH (not found); Docker and kind "
                "cannot run on every machine: see kind-configs/README.md, or use --dry-run to "
                "print the plan"
            )
    for n, step in enumerate(steps, 1):
        assert isinstance(step, Step)
        click.echo(f"[{n}/{len(steps)}] {step.what}", err=True)
        if dry_run:
            click.echo(step.command)
            continue
        if subprocess.run(["sh", "-c", step.command], check=False).returncode != 0:
            raise click.ClickException(f"step {n} ({step.what}) failed: {step.command}")


@kind_group.command("up")
@_state_option
@click.option("--image", default=ms.DEFAULT_IMAGE, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the commands instead of running them.")
def kind_up(state_dir: Path, image: str, dry_run: bool) -> None:
    """Create east, west and north, install fedgate, deploy echo and curl it across clusters."""
    from fedgate.kindplan import KindOptions, up_plan

    options = _options(state_dir, image)
    assert isinstance(options, KindOptions)
    _run(list(up_plan(options)), dry_run)


@kind_group.command("down")
@_state_option
@click.option("--dry-run", is_flag=True, help="Print the commands instead of running them.")
def kind_down(state_dir: Path, dry_run: bool) -> None:
    """Delete the three kind clusters and the generated state."""
    from fedgate.kindplan import KindOptions, down_plan

    options = _options(state_dir, ms.DEFAULT_IMAGE)
    assert isinstance(options, KindOptions)
    _run(list(down_plan(options)), dry_run)


@kind_group.command("demo")
@click.option("--cluster", required=True)
@click.option("--image", default=ms.DEFAULT_IMAGE, show_default=True)
@click.option("--serve", is_flag=True, help="Run and export echo here.")
@click.option("--call", is_flag=True, help="Run the curl client here.")
def kind_demo(cluster: str, image: str, serve: bool, call: bool) -> None:
    """Print the demo workload's manifests for one cluster."""
    from fedgate.manifests.demo import demo
    from fedgate.manifests.render import to_yaml

    click.echo(to_yaml(demo(cluster, serve=serve, call=call, image=image)), nl=False)
