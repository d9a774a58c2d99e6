"""`fedgate inject`: add the sidecar to Kubernetes manifests, as `linkerd inject` does.

Reads YAML (files, or stdin for none or `-`; several documents per file), writes every document
to stdout with its pods injected (`clusters.inject`), and reports per object on stderr. The
YAML is round-tripped with ruamel.yaml and the injection is applied to it as a JSON Patch
(`clusters.inject.patch`), so untouched parts keep their comments, key order and quoting.
Nothing is written when any pod is refused (exit 1): a pipeline into `kubectl apply -f -` then
applies nothing rather than half a set.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import click
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from clusters.inject.objects import InjectRefusedError, inject_object
from clusters.inject.patch import apply, diff
from clusters.inject.spec import InjectSettings
from fedgate import inject_config


def _yaml() -> YAML:
    y = YAML()  # round-trip: comments, key order and quoting survive
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap a long string the input had on one line
    return y


def inject_text(text: str, namespace: str, s: InjectSettings) -> tuple[str, list[str]]:
    """The injected YAML of `text` and the report lines; InjectRefusedError for a refused pod."""
    y = _yaml()
    # Empty documents (a stray `---`) are dropped: dumped back they would read `null`.
    docs = [d for d in y.load_all(text) if d is not None]
    report: list[str] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            continue
        plain: dict[str, Any] = json.loads(json.dumps(doc, default=str))
        outcome = inject_object(plain, namespace, s)
        report += [f"{ref}: {what}" for ref, what in outcome.report]
        if outcome.changed:
            docs[i] = apply(doc, diff(plain, outcome.obj))
    out = io.StringIO()
    y.dump_all(docs, out)
    return out.getvalue(), report


@click.command("inject")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path, allow_dash=True))
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Injector settings (YAML, the agent's --inject-config); flags override it.",
)
@click.option("--cluster", default=None, help="The cluster the pods run in.")
@click.option("--controller", "controller_address", default=None, help="Controller host:port.")
@click.option("--ca", "ca_address", default=None, help="The agent's CA host:port.")
@click.option("--image", default=None, help="The fedgate image of the injected containers.")
@click.option("--cluster-dns", default=None, help="The cluster DNS Service IP (kube-dns).")
@click.option(
    "--namespace",
    default="default",
    show_default=True,
    help="The namespace of objects that name none (where kubectl would create them).",
)
def inject(
    files: tuple[Path, ...],
    config_path: Path | None,
    cluster: str | None,
    controller_address: str | None,
    ca_address: str | None,
    image: str | None,
    cluster_dns: str | None,
    namespace: str,
) -> None:
    """Add the fedgate sidecar to the pods of Kubernetes manifests (stdin or FILES)."""
    try:
        settings = inject_config.load(
            config_path,
            cluster=cluster,
            controller_address=controller_address,
            ca_address=ca_address,
            image=image,
            cluster_dns=cluster_dns,
        )
    except (ValueError, TypeError) as e:
        raise click.UsageError(str(e)) from e
    outputs: list[str] = []
    for path in files or (Path("-"),):
        name = "<stdin>" if str(path) == "-" else str(path)
        try:
            text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
            injected, report = inject_text(text, namespace, settings)
        except OSError as e:
            raise click.ClickException(f"cannot read {name}: {e}") from e
        except YAMLError as e:
            raise click.ClickException(f"{name}: not valid YAML: {e}") from e
        except InjectRefusedError as e:
            raise click.ClickException(f"{name}: {e}") from e
        outputs.append(injected)
        for line in report:
            click.echo(f"{name}: {line}", err=True)
    click.echo("---\n".join(outputs), nl=False)
