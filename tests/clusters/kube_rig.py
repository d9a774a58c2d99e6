"""Shared pieces for tests driving the fake API server with the unmodified `kubernetes` client:
a kubeconfig pointing at the fake, a client for it, the bounded poll helper, and a recorder for
a source's published values."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from clusters.kube.informer import InformerSettings
from clusters.kube.source import KubeClusterSource
from mesh.model import ServiceExport
from tests import helpers
from tests.kubefake import FakeKubeAPI

TD = "east.fedgate.local"
# Fast retries so tests see recoveries quickly; the logic is the production one.
FAST = InformerSettings(watch_timeout=30.0, backoff_initial=0.02, backoff_cap=0.2)


def write_kubeconfig(path: Path, server: str, token: str | None = None) -> Path:
    user: dict[str, Any] = {"token": token} if token else {}
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "agent", "user": user}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
                "current-context": "fake",
            }
        )
    )
    return path


@contextlib.contextmanager
def api_client(directory: Path, server: str) -> Iterator[Any]:
    """An unmodified `kubernetes` ApiClient for the fake at `server` (kubeconfig in
    `directory`), closed on exit."""
    config = write_kubeconfig(directory / "kubeconfig", server)
    client = kubernetes.config.new_client_from_config(config_file=str(config))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    """A running fake API server (import the fixture into a test module to use it)."""
    with FakeKubeAPI() as fake:
        yield fake


@pytest.fixture
def client(api: FakeKubeAPI, tmp_path: Path) -> Iterator[Any]:
    """An unmodified `kubernetes` client for `api`."""
    with api_client(tmp_path, api.url) as c:
        yield c


async def until(predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """`tests.helpers.until` with the informers' longer default bound."""
    await helpers.until(predicate, within, what=what)


class Recorder:
    """Consumes `source.changes()` in a task, keeping every published value."""

    def __init__(self, source: KubeClusterSource) -> None:
        self.source = source
        self.values: list[tuple[ServiceExport, ...]] = []
        self._task = asyncio.create_task(self._consume(), name="kube-source-recorder")

    async def _consume(self) -> None:
        async for value in self.source.changes():
            self.values.append(value)

    @property
    def latest(self) -> tuple[ServiceExport, ...] | None:
        if self._task.done() and self._task.exception() is not None:
            raise AssertionError("the source died") from self._task.exception()
        return self.values[-1] if self.values else None

    def export(self, name: str) -> ServiceExport | None:
        return next((x for x in self.latest or () if x.key.name == name), None)

    def addresses(self, name: str) -> set[str]:
        x = self.export(name)
        return set() if x is None else {e.address for e in x.endpoints}

    def stats(self, kind: str) -> dict[str, object]:
        return next(s for s in self.source.stats() if s["kind"] == kind)

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
