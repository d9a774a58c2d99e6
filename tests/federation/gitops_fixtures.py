"""Config documents and git repositories for the GitOps tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from clusters.rig import config_repo
from federation.gitops.load import SourceFile

FEDERATION = config_repo.federation_yaml([("east", "us-east"), ("west", "us-west")])


def policy(local: int = 70, remote: int = 30) -> str:
    return config_repo.echo_policy(local, remote)


FULL_POLICY = """\
apiVersion: fedgate.io/v1alpha1
kind: TrafficPolicy
metadata: {name: shop-api, namespace: shop}
spec:
  host: api.shop.svc.clusterset.local
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
  clusterWeights:
    - {cluster: east, weight: 50}
    - {cluster: west, weight: 50}
  subsetWeights:
    - {subset: v1, weight: 90}
    - {subset: v2, weight: 10}
  localityFailover: {spillOverThreshold: 60}
  retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,reset,503"}
  timeout: 2.5s
  connectionPool:
    tcp: {maxConnections: 100}
    http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000}
  outlierDetection:
    consecutive5xxErrors: 3
    interval: 5s
    baseEjectionTime: 1m
    maxEjectionPercent: 50
  fault:
    delay: {percentage: {value: 5}, fixedDelay: 1.5s}
    abort: {percentage: {value: 1.5}, httpStatus: 503}
  mirror: {cluster: west, subset: v2}
  mirrorPercentage: {value: 10}
  routes:
    - name: canary
      match:
        - headers: {X-Canary: {exact: "1"}}
        - uri: {prefix: /beta/}
      subsetWeights: [{subset: v2, weight: 100}]
      timeout: 10s
"""

AUTHZ = """\
apiVersion: fedgate.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-callers, namespace: demo}
spec:
  host: echo.demo.svc.clusterset.local
  rules:
    - from:
        - source:
            principals:
              - spiffe://east.fedgate.local/ns/demo/sa/client
              - spiffe://*.fedgate.local/ns/demo/sa/*
      to:
        - operation: {ports: [8080]}
"""


def files(**by_name: str) -> list[SourceFile]:
    """`files(federation_yaml=...)`: keyword names with `_yaml` -> `.yaml`, `__` -> `/`."""
    return [
        SourceFile(name.replace("__", "/").replace("_yaml", ".yaml"), text.encode())
        for name, text in by_name.items()
    ]


def git(repo: Path, *args: str) -> str:
    return config_repo.git(repo, *args)


class Origin:
    """A bare 'remote' repository and an operator's clone that commits and pushes to it."""

    def __init__(self, root: Path) -> None:
        self.url = root / "origin.git"
        self.work = root / "work"
        subprocess.run(
            ["git", "init", "--quiet", "--bare", "--initial-branch", "main", str(self.url)],
            check=True,
        )
        config_repo.init(self.work, {"federation.yaml": FEDERATION}, "federation")
        git(self.work, "remote", "add", "origin", str(self.url))
        self.push()

    def commit(self, message: str, **by_name: str | None) -> str:
        changes = {
            name.replace("__", "/").replace("_yaml", ".yaml"): text
            for name, text in by_name.items()
        }
        sha = config_repo.commit(self.work, changes, message)
        self.push()
        return sha

    def push(self, force: bool = False) -> None:
        git(self.work, "push", "--quiet", *(["--force"] if force else []), "origin", "main")

    def rewrite(self, back_to: str, message: str, **by_name: str | None) -> str:
        """Reset to `back_to`, commit, force-push: the old commits vanish from the branch."""
        git(self.work, "reset", "--quiet", "--hard", back_to)
        changes = {
            name.replace("__", "/").replace("_yaml", ".yaml"): text
            for name, text in by_name.items()
        }
        sha = config_repo.commit(self.work, changes, message)
        self.push(force=True)
        return sha
