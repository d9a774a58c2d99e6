"""`fedgate agent --source kubernetes --control-root`: the real agent process keeps the bootstrap
ConfigMaps and the webhook's caBundle in the fake API server, and follows a root rotation
(no periodic resync can explain the update: it comes from the CA directory's reload)."""

from __future__ import annotations

import base64
import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from ca.cadir import CaDirectory, init_ca_dir, prepare_rotation
from ca.verify import utcnow
from clusters.inject.admission import CONFIGURATION_NAME, webhook_configuration
from clusters.kube.bootstrap import CONFIG_MAP
from fedgate.cli import main
from tests.ca.conftest import free_pair
from tests.clusters.kube_rig import write_kubeconfig
from tests.etcd_fixture import EtcdServer, etcd_server
from tests.helpers import free_port, until_sync
from tests.kubefake import FakeKubeAPI
from tests.kubefake.resources import CONFIGMAPS, MUTATINGWEBHOOKS, NAMESPACES
from tests.kubefake.store import StoreError

pytestmark = pytest.mark.etcd

TD = "east.fedgate.test"
__all__ = ["etcd_server"]  # fixture


def _state(api: FakeKubeAPI, ns: str) -> tuple[str | None, str]:
    """(the ConfigMap's ca.pem, the webhook's decoded caBundle)."""
    try:
        ca = api.store.get(CONFIGMAPS, ns, CONFIG_MAP)["data"]["ca.pem"]
    except StoreError:
        ca = None
    hook = api.store.get(MUTATINGWEBHOOKS, "", CONFIGURATION_NAME)["webhooks"][0]
    return ca, base64.b64decode(hook["clientConfig"].get("caBundle", "")).decode()


def test_the_agent_keeps_the_config_maps_and_ca_bundle_through_a_rotation(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    ca_dir = tmp_path / "ca"
    init_ca_dir(ca_dir, TD, utcnow())
    control = init_ca_dir(tmp_path / "control", "control.fedgate.test", utcnow())
    (tmp_path / "control.pem").write_bytes(control.root_pem)
    with FakeKubeAPI() as api:
        api.store.create(
            NAMESPACES, {"metadata": {"name": "shop", "labels": {"fedgate.io/inject": "enabled"}}}
        )
        api.store.create(NAMESPACES, {"metadata": {"name": "plain"}})
        api.store.create(MUTATINGWEBHOOKS, webhook_configuration(None))
        argv = [
            *(sys.executable, "-m", "fedgate", "agent", "--cluster", "east"),
            *("--etcd", etcd_server.endpoint, "--ca-dir", str(ca_dir)),
            *("--ca-listen", free_pair(), "--source", "kubernetes"),
            *("--kubeconfig", str(write_kubeconfig(tmp_path / "kubeconfig", api.url))),
            *("--control-root", str(tmp_path / "control.pem")),
            *("--gateway-tunnel", "127.0.0.1:15443", "--gateway-egress", "127.0.0.1:15008"),
            *("--admin", f"127.0.0.1:{free_port()}"),
        ]
        with stopped_cleanly(argv, tmp_path / "agent.log") as agent:
            before = "".join(CaDirectory(ca_dir).state.published_pem(utcnow()))
            until_sync(
                lambda: _state(api, "shop") == (before, before) or None,
                30,
                what="the ConfigMap and the caBundle at start",
            )
            cm = api.store.get(CONFIGMAPS, "shop", CONFIG_MAP)
            assert cm["data"]["control.pem"] == control.root_pem.decode()
            assert cm["data"]["trust-domain"] == TD
            with pytest.raises(StoreError):
                api.store.get(CONFIGMAPS, "plain", CONFIG_MAP)
            prepare_rotation(ca_dir, utcnow())  # `fedgate ca rotate`'s first step
            after = "".join(CaDirectory(ca_dir).state.published_pem(utcnow()))
            assert after != before
            # Well inside the writer's 60 s resync: the rotation's poke wrote it.
            until_sync(
                lambda: _state(api, "shop") == (after, after) or None,
                20,
                what="the rotated roots written",
            )
            assert agent.poll() is None


@contextlib.contextmanager
def stopped_cleanly(argv: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` (output to `log_path`); on exit SIGTERM it and require exit status 0."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
    assert code == 0, log_path.read_text()[-3000:]


def test_control_root_is_refused_with_the_file_source(tmp_path: Path) -> None:
    argv = [
        *("agent", "--cluster", "east", "--etcd", "127.0.0.1:1", "--ca-dir", str(tmp_path)),
        *("--ca-listen", "127.0.0.1:1", "--gateway-tunnel", "127.0.0.1:2"),
        *("--gateway-egress", "127.0.0.1:3", "--admin", "127.0.0.1:4"),
        *("--exports", str(tmp_path / "x.json"), "--tokens", str(tmp_path / "t")),
        *("--control-root", str(tmp_path / "control.pem")),
    ]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2
    assert "--control-root is for --source kubernetes" in result.output
