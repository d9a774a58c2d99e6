"""Assembling one cluster's objects in apply order, and writing them as YAML."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

from fedgate.manifests import injector, management, member, rbac
from fedgate.manifests.common import Obj
from fedgate.manifests.settings import ManifestError, ManifestSettings

# deploy/ at the root of the source tree (fedgate/manifests/render.py -> ../../deploy), or
# where the image keeps a copy (Dockerfile) when fedgate is installed from a wheel.
_CHECKOUT = Path(__file__).resolve().parents[2] / "deploy"
DEPLOY_DIR = _CHECKOUT if _CHECKOUT.is_dir() else Path("/usr/local/share/fedgate/deploy")
CRD_FILES = (
    "crds/multicluster.x-k8s.io_serviceexports.yaml",
    "crds/multicluster.x-k8s.io_serviceimports.yaml",
)


def crds(deploy_dir: Path = DEPLOY_DIR) -> list[Obj]:
    """The MCS API CRDs, as vendored from kubernetes-sigs/mcs-api (v0.4.1, v1alpha1)."""
    out: list[Obj] = []
    for name in CRD_FILES:
        try:
            out.append(yaml.safe_load((deploy_dir / name).read_text()))
        except OSError as e:
            raise ManifestError(
                f"cannot read {name} under {deploy_dir} (run from a fedgate checkout, or pass "
                f"--deploy-dir): {e}"
            ) from e
    return out


def render(settings: ManifestSettings, deploy_dir: Path = DEPLOY_DIR) -> list[Obj]:
    """Every object of `settings.cluster`'s install, CRDs and namespace first."""
    objects = [*crds(deploy_dir), rbac.namespace(), *rbac.accounts(settings), *rbac.agent_rbac()]
    objects += member.agent(settings) + member.gateway(settings)
    objects += injector.objects(settings)
    if settings.management:
        objects += management.etcd(settings) + management.controller(settings)
    return objects


def to_yaml(objects: Iterable[Obj]) -> str:
    return "".join(
        "---\n" + yaml.safe_dump(o, sort_keys=False, default_flow_style=False) for o in objects
    )
