"""`fedgate etcd provision` on a real etcd speaking TLS, as the management cluster's Job runs
it: users and roles created and auth enabled, agents confined to their prefix, a later run
adding the user of a cluster that joined, and the etcd flags of agent/controller working."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation import keys
from federation.errors import StoreAuthError, StoreUnavailableError
from federation.etcd import etcd_client, store_errors
from fedgate import cli
from fedgate.cli_etcd import EtcdClientOptions
from fedgate.manifests.settings import ETCD_SERVER_NAME
from tests.etcd_fixture import EtcdServer, find_etcd

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


def test_provision_then_extend(tls_etcd: EtcdServer, tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.mkdir()
    for user in ("root", "controller", "reader", "agent-east", "agent-west"):
        (users / user).write_text(f"{user}-secret\n")
    assert "etcd auth enabled" in provision(tls_etcd, users, "east,west")

    east = options(tls_etcd, users, "agent-east")
    asyncio.run(put(tls_etcd, east, keys.cluster_prefix("east") + "x"))
    with pytest.raises(StoreAuthError):
        asyncio.run(put(tls_etcd, east, keys.cluster_prefix("west") + "x"))
    controller = options(tls_etcd, users, "controller")
    asyncio.run(put(tls_etcd, controller, keys.ROOT + "anything"))
    # No password, no access (auth is on).
    with pytest.raises(StoreAuthError):
        asyncio.run(
            put(
                tls_etcd,
                EtcdClientOptions(ca=east.ca, server_name=ETCD_SERVER_NAME),
                keys.cluster_prefix("east") + "y",
            )
        )

    # north joins: its password is added to the users Secret and the Job runs again.
    (users / "agent-north").write_text("agent-north-secret\n")
    assert "added users ['agent-north']" in provision(tls_etcd, users, "east,west,north")
    north = options(tls_etcd, users, "agent-north")
    asyncio.run(put(tls_etcd, north, keys.cluster_prefix("north") + "x"))
    with pytest.raises(StoreAuthError):
        asyncio.run(put(tls_etcd, north, keys.cluster_prefix("east") + "x"))
    # And once more: nothing to do.
    assert "added users []" in provision(tls_etcd, users, "east,west,north")


def test_a_wrong_server_name_is_refused(tls_etcd: EtcdServer, tmp_path: Path) -> None:
    wrong = EtcdClientOptions(ca=tls_etcd.data_dir / "tls" / "ca.crt", server_name="etcd.example")

    async def connect() -> None:
        async with etcd_client([tls_etcd.endpoint], connect_timeout=2.0, **wrong.connect_kwargs()):
            pass

    with pytest.raises(StoreUnavailableError, match="connect"):
        asyncio.run(connect())
