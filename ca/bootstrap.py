"""What a workload starts with before it has an identity: a join token and trust anchors.

In the rig these are files the rig writes into the pod's directory (as Kubernetes would mount a
projected service-account token and the `fedgate-ca-root` ConfigMap):
`token`, `ca.pem` (the cluster root, which vouches for the CA service and the cluster's own
workloads), `control.pem` (the root of the federation's control plane, which vouches for the
controller) and `trust-domain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ca.bundle import TrustBundle
from ca.errors import CAError


@dataclass(frozen=True, slots=True)
class Bootstrap:
    token: str
    cluster_root_pem: bytes
    control_root_pem: bytes
    trust_domain: str

    def __repr__(self) -> str:  # the token is a credential
        return f"Bootstrap(trust_domain={self.trust_domain})"

    @property
    def anchors(self) -> TrustBundle:
        return TrustBundle.from_pem({self.trust_domain: [self.cluster_root_pem]})

    @classmethod
    def load(cls, directory: Path) -> Bootstrap:
        try:
            return cls(
                token=(directory / "token").read_text().strip(),
                cluster_root_pem=(directory / "ca.pem").read_bytes(),
                control_root_pem=(directory / "control.pem").read_bytes(),
                trust_domain=(directory / "trust-domain").read_text().strip(),
            )
        except OSError as e:
            raise CAError(f"cannot read bootstrap identity in {directory}: {e}") from e

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        token = directory / "token"
        token.touch(mode=0o600)
        token.write_text(self.token + "\n")
        (directory / "ca.pem").write_bytes(self.cluster_root_pem)
        (directory / "control.pem").write_bytes(self.control_root_pem)
        (directory / "trust-domain").write_text(self.trust_domain + "\n")
