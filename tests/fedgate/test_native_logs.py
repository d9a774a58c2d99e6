"""Every log line is JSON: `fedgate.native_logs`' parser on gRPC C-core lines, and a real
controller (real etcd, a GitOps poll running git, refused TLS handshakes) whose whole log
parses line by line as JSON, with each refused handshake logged once with its peer."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ca.authority import CertificateAuthority
from ca.verify import utcnow
from clusters.rig import config_repo
from fedgate import rates
from fedgate.native_logs import CoreLines, CoreMessage, HandshakeFailed, JsonLine, StrayText
from mesh.naming import DEFAULT_FEDERATION_DOMAIN
from tests.etcd_fixture import EtcdServer
from tests.helpers import free_port, until_sync

# What grpcio 1.85's C core writes for one refused handshake, with the handshaker tracer on.
REFUSED = """\
I1206 10:52:32.438072   25326 ssl_transport_security.cc:2563] Handshake failed with error \
SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: \
Invalid certificate verification context
I1206 10:52:32.438136   25326 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: Ssl \
handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000c0:SSL \
routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification \
context: OK
=== Source Location Trace: ===
src/core/util/status_helper.cc:68
 shutdown=false index=2, args={endpoint=0x7f68f8001b60, args={grpc.internal.endpoint_local_\
address=ipv4:127.0.0.1:41217, grpc.internal.endpoint_peer_address=ipv4:127.0.0.1:55754, grpc.x=1}}
I1206 10:52:32.438179   25326 channel_trace.h:396] handshake manager 0x7f68f8002000: Failed \
with error: UNKNOWN: Ssl handshake failed (TSI_PROTOCOL_FAILURE)
=== Source Location Trace: ===
src/core/util/status_helper.cc:68
"""
SUCCEEDED = """\
I1206 10:53:36.286843   29406 trace.cc:91] gRPC Tracers: handshaker
I1206 10:53:36.299994   29450 handshaker.cc:80] handshake_manager 0x7f3ab40020b0: adding \
handshaker endpoint_info [0x7f3] at index 0
I1206 10:53:36.300152   29450 handshaker.cc:155] CallNextHandshakerLocked: error=OK \
shutdown=false index=0, args={endpoint=0x1}
"""


def parse(text: str, *, traced: bool = True) -> list[object]:
    lines = CoreLines(traced=traced)
    out: list[object] = []
    for line in text.splitlines():
        out += lines.feed(line)
    return out + lines.flush()


def test_a_refused_handshake_is_one_record_with_its_peer_and_reason() -> None:
    [record] = parse(REFUSED)
    assert isinstance(record, HandshakeFailed)
    assert (record.peer, record.local) == ("127.0.0.1:55754", "127.0.0.1:41217")
    assert record.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert record.error.startswith("UNKNOWN: Ssl handshake failed (TSI_PROTOCOL_FAILURE)")


def test_without_the_tracer_the_ssl_line_reports_the_failure_without_a_peer() -> None:
    ssl_line = REFUSED.splitlines()[0]
    assert parse(ssl_line, traced=False) == [
        HandshakeFailed("", "", "PEER_DID_NOT_RETURN_A_CERTIFICATE", ssl_line.split("] ", 1)[1])
    ]


def test_tracer_lines_of_handshakes_that_went_on_or_never_began_are_dropped() -> None:
    assert parse(SUCCEEDED) == []
    # A client's connect that failed: no endpoint, no handshake (gRPC tells the caller).
    refused_connect = (
        "I1206 10:59:38.000001   7 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: "
        "Failed to connect to remote host: Connection refused shutdown=false index=0, args={}"
    )
    assert parse(refused_connect) == []


def test_other_lines_keep_their_level_json_passes_and_stray_text_is_one_record() -> None:
    text = (
        "E1206 10:00:00.000001   7 chttp2_transport.cc:12] something broke\n"
        '{"event": "from a child", "level": "info"}\n'
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "ValueError: boom\n"
    )
    assert parse(text) == [
        CoreMessage("error", "chttp2_transport.cc:12", "something broke"),
        JsonLine('{"event": "from a child", "level": "info"}'),
        StrayText(
            'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
            "ValueError: boom"
        ),
    ]


def test_a_crash_before_logging_is_set_up_still_reaches_stderr_as_json() -> None:
    code = (
        "from fedgate import native_logs\n"
        "native_logs.take_over_stderr()\n"
        "import sys\n"
        "print('plain text', file=sys.stderr)\n"
        "raise ValueError('boom')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1
    [line] = done.stderr.splitlines()  # the burst is one event, drained at exit
    entry = json.loads(line)
    assert entry["event"] == "stderr"
    assert entry["text"].startswith("plain text\nTraceback")
    assert entry["text"].endswith("ValueError: boom")


# --- a real controller ---------------------------------------------------------------------


@pytest.fixture
def controller(etcd_server: EtcdServer, tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """`fedgate controller` following a git repository every 0.1 s; (gRPC port, admin port,
    its log)."""
    ca_dir = tmp_path / "ca"
    CertificateAuthority.create(DEFAULT_FEDERATION_DOMAIN, utcnow()).save(ca_dir)
    repo = config_repo.create(tmp_path, [("east", "east")])
    grpc_port, admin_port = free_port(), free_port()
    log = tmp_path / "controller.log"
    argv = [sys.executable, "-m", "fedgate", "controller", "--etcd", etcd_server.endpoint,
            "--listen", f"127.0.0.1:{grpc_port}", "--admin", f"127.0.0.1:{admin_port}",
            "--ca-dir", str(ca_dir), "--config-repo", str(repo), "--config-poll", "0.1",
            "--config-workdir", str(tmp_path / "work"), "--leader-ttl", "2"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield grpc_port, admin_port, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def sync_rounds(admin_port: int) -> float:
    """GitOps sync rounds so far (each runs git at least once); 0 while not serving."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(rates.parse(text, 0.0).named("fedgate_gitops_sync_rounds_total").values())


def refuse(port: int, hello: bytes | None) -> int:
    """A connection the controller refuses (plain text, or TLS without a client certificate);
    the client's port."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        local = int(sock.getsockname()[1])
        if hello is not None:
            sock.sendall(hello)
            sock.recv(100)
            return local
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with ctx.wrap_socket(sock) as tls:
                tls.sendall(b"x")
                tls.recv(100)  # TLS 1.3: the server's refusal arrives after our handshake
        except (ssl.SSLError, OSError):
            pass
        return local


def entries(log: Path) -> list[dict[str, Any]]:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a log line that is not JSON: {line!r}")
    assert all(isinstance(e, dict) for e in parsed)
    return parsed


def test_every_line_of_the_controllers_log_is_json(controller: tuple[int, int, Path]) -> None:
    grpc_port, admin_port, log = controller
    # Git forked while gRPC runs (the etcd watch and lease keepalive): 20 rounds of it.
    until_sync(
        lambda: sync_rounds(admin_port), 30, check=lambda n: n >= 20, what="20 GitOps rounds"
    )
    plain = refuse(grpc_port, b"GET / HTTP/1.1\r\n\r\n")
    no_cert = refuse(grpc_port, None)
    until_sync(
        lambda: [e for e in entries(log) if e["event"] == "grpc handshake failed"],
        10,
        check=lambda found: (
            {e["peer"] for e in found} >= {f"127.0.0.1:{plain}", f"127.0.0.1:{no_cert}"}
        ),
        what="both refused handshakes logged",
    )
    refused = {e["peer"]: e for e in entries(log) if e["event"] == "grpc handshake failed"}
    assert refused[f"127.0.0.1:{no_cert}"]["reason"] == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert refused[f"127.0.0.1:{plain}"]["reason"] == "HTTP_REQUEST"
    assert all(e["component"] == "controller" for e in refused.values())
    text = log.read_text()
    assert "fork_posix" not in text
    assert text.count(f"127.0.0.1:{no_cert}") == 1  # once, not once per layer that saw it
