"""The Kubernetes source behind the agent: the agent publishes what the fake API server holds,
and `fedgate agent --source kubernetes` builds that source."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner
from structlog.testing import LogCapture

from clusters.agent import Agent
from clusters.kube.source import KubeClusterSource
from clusters.kube.tokenreview import TokenReviewAuthenticator
from clusters.kube.writeback import McsWriteBack
from clusters.source import FileClusterSource, FileTokenAuthenticator
from fedgate import native_logs, processes
from fedgate.agent_election import LeaderElectionOptions
from fedgate.cli import main
from fedgate.processes import SourceSettings, cluster_source, source_identity_and_writeback
from mesh.model import ClusterInfo, ServiceExport
from tests.clusters.kube_objects import NS, endpoint, endpoint_slice, pod, service, service_export
from tests.clusters.kube_rig import FAST, TD, until, write_kubeconfig
from tests.kubefake import FakeKubeAPI
from tests.kubefake.resources import ENDPOINTSLICES, PODS, SERVICEEXPORTS, SERVICES


class MemoryPublisher:
    def __init__(self) -> None:
        self.published: list[tuple[ServiceExport, ...]] = []

    async def publish(self, info: ClusterInfo, exports: Sequence[ServiceExport]) -> None:
        self.published.append(tuple(exports))

    async def aclose(self) -> None:
        pass


async def test_agent_publishes_the_clusters_exports_from_the_api(tmp_path: Path) -> None:
    with FakeKubeAPI() as api:
        s = api.store
        s.create(SERVICES, service("pay", ("http", 8080, "http")))
        s.create(SERVICEEXPORTS, service_export("pay"))
        s.create(PODS, pod("p1", "payments"))
        s.create(ENDPOINTSLICES, endpoint_slice("pay-a", "pay", endpoint("10.0.0.1", "p1")))
        config = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        source = KubeClusterSource.from_kubeconfig(config, "east", TD, settings=FAST, debounce=0.05)
        publisher = MemoryPublisher()
        agent = Agent(ClusterInfo("east", TD, None, ()), source, publisher)
        task = asyncio.create_task(agent.run())
        try:
            await until(lambda: agent.published, "the first publish")
            assert [e.address for e in publisher.published[-1][0].endpoints] == ["10.0.0.1"]
            s.delete(SERVICEEXPORTS, NS, "pay")
            await until(lambda: publisher.published[-1] == (), "the export withdrawn")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            source.close()


def test_cluster_source_builds_the_kind_asked_for(tmp_path: Path) -> None:
    config = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:1")
    kube, status, close = cluster_source(SourceSettings("kubernetes", config), Path(), "east", TD)
    try:
        assert isinstance(kube, KubeClusterSource)
        assert status() == []  # no informer runs until changes() is iterated
    finally:
        close()
    exports = tmp_path / "exports.json"
    file, status, close = cluster_source(SourceSettings(), exports, "east", TD)
    assert isinstance(file, FileClusterSource)
    assert status() == {"file": str(exports)}


def test_the_source_decides_token_authentication_and_write_back(
    tmp_path: Path, logs: LogCapture
) -> None:
    config = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:1")
    settings = SourceSettings("kubernetes", config)
    kube, _, close = cluster_source(settings, Path(), "east", TD)
    try:
        tokens, writeback = source_identity_and_writeback(settings, kube, None, "east")
        assert isinstance(tokens, TokenReviewAuthenticator)
        assert isinstance(writeback, McsWriteBack)
        assert not [e for e in logs.entries if e["event"] == "--tokens ignored"]
        # A tokens file given anyway (it was once required) grants nothing, and says so.
        given = tmp_path / "tokens.json"
        tokens, _ = source_identity_and_writeback(settings, kube, given, "east")
        assert isinstance(tokens, TokenReviewAuthenticator)
        [ignored] = [e for e in logs.entries if e["event"] == "--tokens ignored"]
        assert ignored["log_level"] == "warning"
        assert ignored["tokens"] == str(given)
        assert "TokenReview" in ignored["reason"]
    finally:
        close()
    file, _, _ = cluster_source(SourceSettings(), tmp_path / "exports.json", "east", TD)
    rig_tokens = tmp_path / "tokens.json"
    tokens, writeback = source_identity_and_writeback(SourceSettings(), file, rig_tokens, "east")
    assert isinstance(tokens, FileTokenAuthenticator)
    assert tokens.path == rig_tokens
    assert writeback is None


def agent_argv(tmp_path: Path) -> list[str]:
    """`fedgate agent` with every option but the source's (nothing listens at these)."""
    return [
        "agent",
        *("--cluster", "east", "--etcd", "127.0.0.1:1", "--ca-dir", str(tmp_path)),
        *("--ca-listen", "127.0.0.1:1", "--gateway-tunnel", "127.0.0.1:2"),
        *("--gateway-egress", "127.0.0.1:3", "--admin", "127.0.0.1:4"),
    ]


def test_agent_cli_checks_the_source_options(tmp_path: Path) -> None:
    base = agent_argv(tmp_path)
    exports, tokens = ["--exports", str(tmp_path / "x.json")], ["--tokens", str(tmp_path / "t")]
    runner = CliRunner()
    for missing in ([*tokens], [*exports]):
        result = runner.invoke(main, [*base, "--source", "file", *missing])
        assert result.exit_code == 2
        assert "--source file needs --exports and --tokens" in result.output
    result = runner.invoke(main, [*base, "--source", "kubernetes", *exports])
    assert result.exit_code == 2
    assert "--exports is for --source file" in result.output
    assert "--kubeconfig" in runner.invoke(main, ["agent", "--help"]).output


def test_agent_cli_runs_the_kubernetes_source_without_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI's parsing only: what it hands the agent's wiring (the tests above run that, and
    # the rig e2e runs the whole command); stderr stays pytest's.
    seen: list[tuple[object, ...]] = []
    monkeypatch.setattr(native_logs, "take_over_stderr", lambda: None)
    monkeypatch.setattr(processes, "agent", lambda *a, **kw: seen.append((*a, kw["source"])))
    config = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:1")
    argv = [*agent_argv(tmp_path), "--source", "kubernetes", "--kubeconfig", str(config)]
    runner = CliRunner()
    result = runner.invoke(main, argv)
    assert result.exit_code == 0, result.output
    # Given anyway, --tokens is handed on, and the wiring warns it is ignored (test above).
    result = runner.invoke(main, [*argv, "--tokens", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    without, given = seen
    assert (
        without[-1]
        == given[-1]
        == SourceSettings("kubernetes", config, None, LeaderElectionOptions())
    )
    assert (without[5], given[5]) == (None, tmp_path / "t")  # processes.agent's `tokens`
