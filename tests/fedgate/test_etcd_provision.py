"""`fedgate etcd provision` on a real etcd speaking TLS, as the management cluster's Job runs
it: users and roles created and auth enabled, agents confined to their prefix, a later run
adding the user of a cluster that joined, and the etcd flags of agent/controller working.

Over the 450-line aim: the rendered install's processes run against the one TLS etcd these tests
provision, so its fixtures and the end-to-end checks stay together.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import socket
import ssl
import subprocess
import sys
import urllib.request
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
from tests.kubefake.fake import TokenIdentity
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
    # The same command line with the right password ran above: only the password differs.
    # (Its log's last lines, the reason, are not asserted: fedgate.native_logs forwards stderr
    # through a thread, and a process that dies at start sometimes exits before they are out.)
    assert refused.returncode != 0


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


_ADDRESS = re.compile(r"(?:0\.0\.0\.0|[a-z0-9-]+\.fedgate-system\.svc):(\d+)")


def rendered(server: EtcdServer, controller: str = "203.0.113.1:15012") -> dict[str, list[str]]:
    """Each fedgate container's args of east's management install, by Deployment name (and
    under "inject.yaml" the injector settings the agent's ConfigMap holds)."""
    settings = ManifestSettings(
        cluster="east",
        role="management",
        gateway_address="203.0.113.10:15443",
        etcd=server.endpoint,
        controller=controller,
    )
    objects = render(settings)
    out = {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]["containers"][0]["args"]
        for o in objects
        if o["kind"] == "Deployment"
    }
    (inject,) = [o for o in objects if o["kind"] == "ConfigMap"]
    out["inject.yaml"] = [inject["data"]["inject.yaml"]]
    return out


def local(args: list[str], root: Path, ports: dict[int, int]) -> list[str]:
    """A container's args as a local process: the pod's mounts under `root`, its listeners and
    in-cluster Service addresses on the loopback ports `ports` maps their port numbers to."""

    def address(m: re.Match[str]) -> str:
        return f"127.0.0.1:{ports.setdefault(int(m.group(1)), free_port())}"

    out = [
        _ADDRESS.sub(address, arg.replace("/var/run/fedgate/", f"{root}/"))
        .replace("/var/lib/fedgate/", f"{root}/")
        .replace("/etc/fedgate/", f"{root}/")
        .replace("$(POD_NAME)", "controller-0")
        for arg in args
    ]
    return [sys.executable, "-m", "fedgate", *out]


def inject_mount(args: dict[str, list[str]], root: Path) -> None:
    """The agent's `fedgate-inject` ConfigMap, where `local` points --inject-config."""
    (root / "inject").mkdir(parents=True, exist_ok=True)
    (root / "inject" / "inject.yaml").write_text(args["inject.yaml"][0])


def control_mount(root: Path, control_root: Path) -> None:
    """The agent's `control` volume (fedgate-system's fedgate-bootstrap, control.pem only)."""
    (root / "control").mkdir(parents=True, exist_ok=True)
    (root / "control" / "control.pem").write_bytes(control_root.read_bytes())


def etcd_mount(server: EtcdServer, directory: Path, password: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "ca.crt").write_bytes((server.data_dir / "tls" / "ca.crt").read_bytes())
    (directory / "password").write_text(password.read_text())


def test_the_rendered_agent_publishes_its_cluster_through_the_tls_etcd(
    provisioned: EtcdServer, users: Path, tmp_path: Path
) -> None:
    """The agent's rendered command line, end to end: TLS to etcd as `agent-east`, the
    cluster's exports read from a (fake) API server, the catalog published under its prefix."""
    root = tmp_path / "run"
    etcd_mount(provisioned, root / "etcd", users / "agent-east")
    init_ca_dir(root / "ca", "east.fedgate.local", utcnow())
    init_ca_dir(tmp_path / "control-ca", "fedgate.local", utcnow())
    control_mount(root, tmp_path / "control-ca" / "root.pem")
    reader = options(provisioned, users, "reader")
    export = keys.export_key("east", ServiceKey(NS, "pay"))
    with FakeKubeAPI() as api:
        api.store.create(SERVICES, service("pay", ("http", 8080, "http")))
        api.store.create(SERVICEEXPORTS, service_export("pay"))
        api.store.create(PODS, pod("p1", "payments"))
        api.store.create(ENDPOINTSLICES, endpoint_slice("pay-a", "pay", endpoint("10.0.0.1", "p1")))
        kubeconfig = write_kubeconfig(tmp_path / "kc", api.url)
        args = rendered(provisioned)
        inject_mount(args, root)
        argv = [*local(args[AGENT], root, {}), f"--kubeconfig={kubeconfig}"]
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
    # A clean stop abandons the etcd lease rather than revoke it (a standby replica takes over
    # the keys, docs/kubernetes.md): with no other replica they expire with the lease's TTL.
    until_sync(
        lambda: asyncio.run(get(provisioned, reader, keys.info_key("east"))) is None,
        within=30,
        what="the stopped agent's keys expiring with its etcd lease",
    )


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def ca_port() -> int:
    """A port whose successor is free too: the CA renews on its port + 1."""
    while True:
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 1))
            return port


def test_a_rendered_install_comes_up(provisioned: EtcdServer, users: Path, tmp_path: Path) -> None:
    """Controller, agent and gateway from east's rendered install, as local processes: the
    gateway's projected token passes the agent CA's TokenReview (fake API server), it gets its
    SVID and its config stream from the controller (mTLS), and is ready, as its probe asks."""
    ports = {15013: ca_port()}
    ports[15012] = free_port()
    control, agent_root, gw_root = (tmp_path / n for n in ("controller", "agent", "gateway"))
    etcd_mount(provisioned, control / "etcd", users / "controller")
    etcd_mount(provisioned, agent_root / "etcd", users / "agent-east")
    init_ca_dir(control / "control-ca", "fedgate.local", utcnow())
    init_ca_dir(agent_root / "ca", "east.fedgate.local", utcnow())
    control_mount(agent_root, control / "control-ca" / "root.pem")
    identity = gw_root / "identity"
    identity.mkdir(parents=True)
    (identity / "token").write_text("gateway-token\n")
    (identity / "ca.pem").write_bytes((agent_root / "ca" / "root.pem").read_bytes())
    (identity / "control.pem").write_bytes((control / "control-ca" / "root.pem").read_bytes())
    (identity / "trust-domain").write_text("east.fedgate.local\n")
    args = rendered(provisioned, controller=f"127.0.0.1:{ports[15012]}")
    inject_mount(args, agent_root)
    gateway_sa = TokenIdentity("system:serviceaccount:fedgate-system:gateway", ("fedgate",))
    processes: list[subprocess.Popen[bytes]] = []
    with FakeKubeAPI(token_reviews={"gateway-token": gateway_sa}) as api:
        kubeconfig = write_kubeconfig(tmp_path / "kc", api.url)
        argvs = {
            "controller": local(args["fedgate-controller"], control, ports),
            "agent": [*local(args[AGENT], agent_root, ports), f"--kubeconfig={kubeconfig}"],
            "gateway": local(args["fedgate-gateway"], gw_root, ports),
        }
        try:
            for name, argv in argvs.items():
                log = (tmp_path / f"{name}.log").open("wb")
                processes.append(subprocess.Popen(argv, stdout=log, stderr=log))
                log.close()
            until_sync(lambda: ready(ports[15021]), within=60, what="the gateway ready")
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[15021]}/config") as r:
                config = json.loads(r.read())
            assert config["identity"] == "spiffe://east.fedgate.local/ns/fedgate-system/sa/gateway"
            assert config["version"]
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=15)


def test_the_rendered_etcd_member_starts(tmp_path: Path) -> None:
    """The StatefulSet's etcd command line, run by this machine's etcd (3.5, as the image):
    every flag exists and the TLS files are where it reads them. One member of the three, its
    peers' and its own names pointed at loopback, on free ports."""
    binary = find_etcd()
    assert binary is not None
    settings = ManifestSettings(cluster="east", role="management", gateway_address="x:1")
    (statefulset,) = [o for o in render(settings) if o["kind"] == "StatefulSet"]
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    client, peer, metrics = free_port(), free_port(), free_port()
    for name in ("server", "peer"):
        (tmp_path / name).mkdir()
        make_tls(tmp_path / name)
    args = []
    for arg in container["args"]:
        arg = arg.replace("$(POD_NAME)", "fedgate-etcd-0").replace("/etc/etcd/", f"{tmp_path}/")
        arg = arg.replace("/var/lib/etcd/", f"{tmp_path}/")
        arg = re.sub(r"[a-z0-9.-]+\.svc:2379", f"127.0.0.1:{client}", arg)
        arg = re.sub(r"[a-z0-9.-]+\.svc:2380", f"127.0.0.1:{peer}", arg)
        arg = arg.replace("0.0.0.0:2379", f"127.0.0.1:{client}")
        arg = arg.replace("0.0.0.0:2380", f"127.0.0.1:{peer}").replace(
            "0.0.0.0:2381", f"127.0.0.1:{metrics}"
        )
        if arg.startswith("--initial-cluster="):  # alone: no quorum to wait for
            arg = "--initial-cluster=" + arg.split("=", 1)[1].split(",")[0]
        args.append(arg)
    assert container["command"] == ["etcd"]
    log = (tmp_path / "etcd.log").open("wb")
    process = subprocess.Popen([binary, *args], stdout=log, stderr=log)
    try:
        probe = container["readinessProbe"]["httpGet"]["path"]
        url = f"http://127.0.0.1:{metrics}{probe}"

        def healthy() -> bool:
            assert process.poll() is None, (tmp_path / "etcd.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    return b'"health":"true"' in r.read()
            except OSError:
                return False

        until_sync(healthy, within=30, what="the rendered etcd member healthy")
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
