"""Wiring of the agent's leader election (`fedgate agent --source kubernetes`).

Options as kube-controller-manager names them (`--leader-elect`, `--leader-elect-lease-duration`,
...), parsed once here. The election (`clusters.kube.lease`) switches the agent's
`GatedPublisher` and its `LeaderTasks` (`clusters.leadership`): only the leader publishes the
catalog and runs the MCS write-back; every replica serves the CA and the webhook. The file
source (the rig) runs one agent per cluster and no election.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from clusters.kube.election import (
    DEFAULT_LEASE_DURATION,
    DEFAULT_RENEW_DEADLINE,
    DEFAULT_RETRY_PERIOD,
    ElectionSettings,
)
from clusters.kube.lease import LeaseElection
from clusters.leadership import GatedPublisher, LeaderTasks

DEFAULT_LEASE = "fedgate-system/fedgate-agent"


@dataclass(frozen=True, slots=True)
class LeaderElectionOptions:
    """`lease`: `<namespace>/<name>` of the Lease; `identity`: this replica's name (the pod's
    hostname is its name); durations in seconds."""

    enabled: bool = True
    lease: str = DEFAULT_LEASE
    identity: str = ""
    lease_duration: float = DEFAULT_LEASE_DURATION
    renew_deadline: float = DEFAULT_RENEW_DEADLINE
    retry_period: float = DEFAULT_RETRY_PERIOD

    def __post_init__(self) -> None:
        namespace, slash, name = self.lease.partition("/")
        if not (namespace and slash and name):
            raise ValueError(f"--leader-elect-lease wants <namespace>/<name>, got {self.lease!r}")
        self.settings()  # fail at the edge on unordered durations

    def settings(self) -> ElectionSettings:
        return ElectionSettings(self.lease_duration, self.renew_deadline, self.retry_period)


def elect(
    options: LeaderElectionOptions,
    api_client: Any,
    publisher: GatedPublisher,
    leader_tasks: LeaderTasks,
    *,
    release_on_cancel: bool = True,
) -> LeaseElection:
    """The election that switches `publisher` and `leader_tasks` (run it as a task)."""

    async def on_change(leading: bool) -> None:
        await publisher.set_leading(leading)
        await leader_tasks.set_leading(leading)

    namespace, _, name = options.lease.partition("/")
    identity = options.identity or socket.gethostname()
    return LeaseElection(
        api_client,
        namespace,
        name,
        identity,
        on_change,
        options.settings(),
        release_on_cancel=release_on_cancel,
    )
