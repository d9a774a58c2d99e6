"""`fedgate etcd provision` on a real etcd speaking TLS, as the management cluster's Job runs
it: users and roles created and auth enabled, agents confined to their prefix, a later run
adding the user of a cluster that joined, and the etcd flags of agent/controller working."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.cadir import init_ca_dir
from ca.verify import utcnow
from federation import keys
from federation.errors import StoreAuthError, StoreUnavailableError
from federation.etcd import etcd_client, store_errors
from fedgate import cli
from fedgate.etcdopts import EtcdClientOptions
from fedgate.manifests.render import render
from fedgate.manifests.settings import AGENT, ETCD_SERVER_NAME, ManifestSettings
from mesh.naming import ServiceKey
from tests.clusters.kube_objects import NS, endpoint, endpoint_slice, pod, service, service_export
from tests.clusters.kube_rig import write_kubeconfig
from tests.etcd_fixture import EtcdServer, find_etcd
from tests.helpers import free_port, until_sync
from tests.kubefake import FakeKubeAPI
from tests.kubefake.resources import ENDPOINTSLICES, PODS, SERVICEEXPORTS, SERVICES

pytestmark = pytest.mark.etcd


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_tls(directory: Path) -> None:
    """An etcd CA and a server certificate for ETCD_SERVER_NAME (not for 127.0.0.1: clients
    must verify the name the manifests give them, whatever address they dial)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("etcd-ca"))
        .issuer_name(_name("etcd-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedgate-etcd"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(ETCD_SERVER_NAME)]), False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "tls.crt").write_bytes(cert.public_bytes(pem))
    (directory / "tls.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


class TlsEtcd(EtcdServer):
    """The shared fixture's etcd with TLS on the client port."""

    def _command(self) -> list[str]:
        tls = self.data_dir / "tls"
        command = [
            arg.replace(
                f"http://127.0.0.1:{self.client_port}", f"https://127.0.0.1:{self.client_port}"
            )
            for arg in super()._command()
        ]
        return [
            *command,
            f"--cert-file={tls / 'tls.crt'}",
            f"--key-file={tls / 'tls.key'}",
        ]

    def health_check(self) -> tuple[str, ssl.SSLContext | None]:
        context = ssl.create_default_context(cafile=str(self.data_dir / "tls" / "ca.crt"))
        context.check_hostname = False  # the certificate names the Service, not 127.0.0.1
        return f"https://{self.endpoint}/health", context


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    binary = find_etcd()
    assert binary is not None
    directory = tmp_path_factory.mktemp("etcd-tls")
    (directory / "tls").mkdir()
    make_tls(directory / "tls")
    server = TlsEtcd(binary, directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def provision(server: EtcdServer, users: Path, clusters: str) -> str:
    result = CliRunner().invoke(
        cli.main,
        [
            "etcd",
            "provision",
            f"--etcd={server.endpoint}",
            f"--etcd-ca={server.data_dir / 'tls' / 'ca.crt'}",
            f"--etcd-server-name={ETCD_SERVER_NAME}",
            f"--users-dir={users}",
            f"--clusters={clusters}",
        ],
    )
    assert result.exit_code == 0, result.output
    return result.output


def options(server: EtcdServer, users: Path, user: str) -> EtcdClientOptions:
    """What `fedgate agent --etcd-ca ... --etcd-user ... --etcd-password-file ...` builds."""
    return EtcdClientOptions(
        ca=server.data_dir / "tls" / "ca.crt",
        server_name=ETCD_SERVER_NAME,
        user=user,
        password_file=users / user,
    )


async def put(server: EtcdServer, opts: EtcdClientOptions, key: str) -> None:
    async with etcd_client([server.endpoint], **opts.connect_kwargs()) as client:
        assert client.kv is not None
        with store_errors("put"):
            await client.kv.put(key, b"x")


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("etcd-users")
    for user in ("root", "controller", "reader", "agent-east", "agent-west"):
        (directory / user).write_text(f"{user}-secret\n")
    return directory


@pytest.fixture(scope="module")
def provisioned(tls_etcd: EtcdServer, users: Path) -> EtcdServer:
    assert "etcd auth enabled" in provision(tls_etcd, users, "east,west")
    return tls_etcd


def test_agents_are_confined_and_a_joining_cluster_is_added(
    provisioned: EtcdServer, users: Path
) -> None:
    east = options(provisioned, users, "agent-east")
    asyncio.run(put(provisioned, east, keys.cluster_prefix("east") + "x"))
    with pytest.raises(StoreAuthError):
        asyncio.run(put(provisioned, east, keys.cluster_prefix("west") + "x"))
    controller = options(provisioned, users, "controller")
    asyncio.run(put(provisioned, controller, keys.ROOT + "anything"))
    # No password, no access (auth is on).
    anonymous = EtcdClientOptions(ca=east.ca, server_name=ETCD_SERVER_NAME)
    with pytest.raises(StoreAuthError):
        asyncio.run(put(provisioned, anonymous, keys.cluster_prefix("east") + "y"))

    # north joins: its password is added to the users Secret and the Job runs again.
    (users / "agent-north").write_text("agent-north-secret\n")
    assert "added users ['agent-north']" in provision(provisioned, users, "east,west,north")
    north = options(provisioned, users, "agent-north")
    asyncio.run(put(provisioned, north, keys.cluster_prefix("north") + "x"))
    with pytest.raises(StoreAuthError):
        asyncio.run(put(provisioned, north, keys.cluster_prefix("east") + "x"))
    # And once more: nothing to do.
    assert "added users []" in provision(provisioned, users, "east,west,north")


async def get(server: EtcdServer, opts: EtcdClientOptions, key: str) -> bytes | None:
    async with etcd_client([server.endpoint], **opts.connect_kwargs()) as client:
        assert client.kv is not None
        with store_errors("get"):
            response = await client.kv.get(key)
        return bytes(response.kvs[0].value) if response.kvs else None


def controller_argv(server: EtcdServer, password_file: Path, tmp_path: Path) -> list[str]:
    """`fedgate controller` as the management cluster's Deployment runs it (its etcd flags)."""
    ca_dir = tmp_path / "control-ca"
    if not ca_dir.exists():
        init_ca_dir(ca_dir, "fedgate.local", utcnow())
    return [
        sys.executable,
        "-m",
        "fedgate",
        "controller",
        f"--etcd={server.endpoint}",
        f"--etcd-ca={server.data_dir / 'tls' / 'ca.crt'}",
        f"--etcd-server-name={ETCD_SERVER_NAME}",
        "--etcd-user=controller",
        f"--etcd-password-file={password_file}",
        f"--listen=127.0.0.1:{free_port()}",
        f"--admin=127.0.0.1:{free_port()}",
        f"--ca-dir={ca_dir}",
        f"--config-workdir={tmp_path / 'gitops'}",
        "--replica=controller-0",
        "--leader-ttl=2",
    ]


def test_the_controller_runs_as_its_etcd_user_over_tls(
    provisioned: EtcdServer, users: Path, tmp_path: Path
) -> None:
    reader = options(provisioned, users, "reader")
    log = (tmp_path / "controller.log").open("wb")
    process = subprocess.Popen(
        controller_argv(provisioned, users / "controller", tmp_path), stdout=log, stderr=log
    )
    try:
        leader = until_sync(
            lambda: asyncio.run(get(provisioned, reader, keys.LEADER_KEY)),
            within=30,
            what="the controller's leader record in etcd",
        )
        assert leader is not None
        assert b"controller-0" in leader
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()

    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    with (tmp_path / "refused.log").open("wb") as out:
        refused = subprocess.run(
            controller_argv(provisioned, wrong, tmp_path), stdout=out, stderr=out, timeout=60
        )
    assert refused.returncode != 0
    assert "authentication failed" in (tmp_path / "refused.log").read_text()


def test_a_wrong_server_name_is_refused(tls_etcd: EtcdServer, tmp_path: Path) -> None:
    wrong = EtcdClientOptions(ca=tls_etcd.data_dir / "tls" / "ca.crt", server_name="etcd.example")

    async def connect() -> None:
        async with etcd_client([tls_etcd.endpoint], connect_timeout=2.0, **wrong.connect_kwargs()):
            pass

    with pytest.raises(StoreUnavailableError, match="connect"):
        asyncio.run(connect())


def test_operator_tools_reach_the_tls_etcd_from_the_environment(
    provisioned: EtcdServer, users: Path
) -> None:
    """`fedgate status --etcd ...` (like every tool taking --etcd) logs in from FEDGATE_ETCD_*,
    as etcdctl does from ETCDCTL_*; without them the etcd refuses it."""
    env = {
        "FEDGATE_ETCD_CA": str(provisioned.data_dir / "tls" / "ca.crt"),
        "FEDGATE_ETCD_SERVER_NAME": ETCD_SERVER_NAME,
        "FEDGATE_ETCD_USER": "reader",
        "FEDGATE_ETCD_PASSWORD_FILE": str(users / "reader"),
    }
    args = ["status", f"--etcd={provisioned.endpoint}", "--json"]
    ok = CliRunner().invoke(cli.main, args, env=env)
    assert ok.exit_code == 0, ok.output
    assert "clusters" in json.loads(ok.output)
    anonymous = CliRunner().invoke(cli.main, args, env={**env, "FEDGATE_ETCD_USER": ""})
    assert anonymous.exit_code != 0


def rendered_agent_argv(server: EtcdServer, root: Path, kubeconfig: Path) -> list[str]:
    """The agent container's args from `fedgate manifests`, run as a local process: the pod's
    mount paths under `root`, its 0.0.0.0 listeners on free loopback ports, and a kubeconfig
    for the fake API server instead of the in-cluster ServiceAccount."""
    settings = ManifestSettings(
        cluster="east",
        gateway_address="203.0.113.10:15443",
        etcd=server.endpoint,
        controller="203.0.113.1:15012",
    )
    (deployment,) = [
        o for o in render(settings) if o["kind"] == "Deployment" and o["metadata"]["name"] == AGENT
    ]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    out = []
    for arg in args:
        arg = arg.replace("/var/run/fedgate/", f"{root}/")
        if "=0.0.0.0:" in arg:
            arg = f"{arg.split('=')[0]}=127.0.0.1:{free_port()}"
        out.append(arg)
    return [sys.executable, "-m", "fedgate", *out, f"--kubeconfig={kubeconfig}"]


def test_the_rendered_agent_publishes_its_cluster_through_the_tls_etcd(
    provisioned: EtcdServer, users: Path, tmp_path: Path
) -> None:
    """The agent's rendered command line, end to end: TLS to etcd as `agent-east`, the
    cluster's exports read from a (fake) API server, the catalog published under its prefix."""
    root = tmp_path / "run"
    (root / "etcd").mkdir(parents=True)
    (root / "etcd" / "ca.crt").write_bytes((provisioned.data_dir / "tls" / "ca.crt").read_bytes())
    (root / "etcd" / "password").write_text((users / "agent-east").read_text())
    init_ca_dir(root / "ca", "east.fedgate.local", utcnow())
    reader = options(provisioned, users, "reader")
    export = keys.export_key("east", ServiceKey(NS, "pay"))
    with FakeKubeAPI() as api:
        api.store.create(SERVICES, service("pay", ("http", 8080, "http")))
        api.store.create(SERVICEEXPORTS, service_export("pay"))
        api.store.create(PODS, pod("p1", "payments"))
        api.store.create(ENDPOINTSLICES, endpoint_slice("pay-a", "pay", endpoint("10.0.0.1", "p1")))
        argv = rendered_agent_argv(provisioned, root, write_kubeconfig(tmp_path / "kc", api.url))
        with (tmp_path / "agent.log").open("wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=log)
            try:
                published = until_sync(
                    lambda: asyncio.run(get(provisioned, reader, export)),
                    within=30,
                    what="the agent's export of shop/pay in etcd",
                )
                assert b"10.0.0.1" in published
                info = asyncio.run(get(provisioned, reader, keys.info_key("east")))
                assert info is not None
                assert b"203.0.113.10" in info  # the gateway address peers dial
            finally:
                process.terminate()
                process.wait(timeout=15)
    # A clean stop revokes the lease: the cluster leaves the catalog at once.
    assert asyncio.run(get(provisioned, reader, keys.info_key("east"))) is None
