"""The rig's GitOps config repository: a plain git repository in the rig directory.

`fedgate rig up` creates it with a Federation document naming the rig's clusters and the
TrafficPolicy for echo.demo (local 70 / remote 30), and the controller follows its `main`
branch. Changing the federation is then what an operator does: edit, `git commit`; `commit()`
does exactly that for the demo and the tests. Nothing here talks to etcd or the controller.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from clusters.rig.errors import RigError

BRANCH = "main"
FEDERATION_FILE = "federation.yaml"
ECHO_POLICY_FILE = "policies/echo.yaml"
_IDENTITY = ("-c", "user.name=fedgate rig", "-c", "user.email=rig@fedgate.local")
GIT_TIMEOUT = 20.0


def repo_dir(rigdir: Path) -> Path:
    return rigdir / "config-repo"


def federation_yaml(clusters: Sequence[tuple[str, str]]) -> str:
    """A Federation document for clusters given as (name, region)."""
    lines = [
        "apiVersion: fedgate.io/v1alpha1",
        "kind: Federation",
        "metadata:",
        "  name: rig",
        "spec:",
        "  domain: fedgate.local",
        "  defaults:",
        "    transport: quic",
        "  clusters:",
    ]
    for name, region in clusters:
        lines += [f"    - name: {name}", f"      locality: {{region: {region}}}"]
    return "\n".join(lines) + "\n"


def echo_policy(local: int, remote: int) -> str:
    return f"""\
apiVersion: fedgate.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: echo
  namespace: demo
spec:
  host: echo.demo.svc.clusterset.local
  clusterWeights:
    - cluster: local
      weight: {local}
    - cluster: remote
      weight: {remote}
"""


def git(repo: Path, *args: str) -> str:
    try:
        res = subprocess.run(
            ["git", *_IDENTITY, "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RigError(f"git {args[0]} in {repo}: {e}") from e
    if res.returncode != 0:
        raise RigError(f"git {' '.join(args)} in {repo} failed: {res.stderr.strip()}")
    return res.stdout


def init(repo: Path, files: Mapping[str, str], message: str = "Initial config") -> str:
    """A new repository on branch `main` holding `files`, committed; returns the commit id."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "--quiet", "--initial-branch", BRANCH)
    return commit(repo, files, message)


def commit(repo: Path, files: Mapping[str, str | None], message: str) -> str:
    """Write (or, for None, delete) `files` and commit them all; returns the commit id."""
    for name, text in files.items():
        path = repo / name
        if text is None:
            path.unlink(missing_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


def create(rigdir: Path, clusters: Sequence[tuple[str, str]]) -> Path:
    """The rig's initial config repository (replacing a previous rig's)."""
    repo = repo_dir(rigdir)
    shutil.rmtree(repo, ignore_errors=True)
    init(
        repo,
        {FEDERATION_FILE: federation_yaml(clusters), ECHO_POLICY_FILE: echo_policy(70, 30)},
        "Rig config: echo.demo local 70 / remote 30",
    )
    return repo
