"""`fedgate ca ...` through click: init, inspect, the rotation steps, deny/allow on real etcd."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner

from ca import cadir
from ca.authority import CertificateAuthority
from ca.verify import utcnow
from federation import denied
from federation.etcd import etcd_client
from fedgate.cli import main
from mesh.naming import SpiffeId
from tests.etcd_fixture import EtcdServer

TD = "east.fedgate.local"
CLIENT = f"spiffe://{TD}/ns/demo/sa/client"


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["ca", *args])
    return res.exit_code, res.output


def test_init_inspect_and_the_rotation_steps(tmp_path: Path) -> None:
    d = tmp_path / "east"
    code, out = run("init", "--trust-domain", TD, "--out", str(d), "--max-svid-ttl", "20s")
    assert code == 0, out
    assert cadir.load_ca_dir(d).plan.max_svid_ttl.total_seconds() == 20
    code, out = run("init", "--trust-domain", TD, "--out", str(d))
    assert code == 1
    assert "already holds a CA" in out

    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(CertificateAuthority.load(d).issue(SpiffeId.parse(CLIENT), utcnow()).cert_pem)
    code, out = run("inspect", "--json", str(leaf), "--roots", str(d))
    assert code == 0, out
    shown = json.loads(out)
    assert shown["verified"] == CLIENT
    assert shown["chain"][0]["uris"] == [CLIENT]
    assert 3500 < shown["chain"][0]["secondsLeft"] <= 3600

    code, out = run("rotate", "--ca-dir", str(d), "--prepare-only")
    assert code == 0, out
    assert "step 1" in out
    code, out = run("inspect", str(d))  # both roots are published now
    assert out.count("] CA") == 2
    code, out = run("rotate", "--ca-dir", str(d), "--activate", "--grace", "1s")
    assert code == 0, out
    assert "step 3" in out
    # The old root's SVID is refused once verified against the new root only.
    new_root = tmp_path / "new.pem"
    new_root.write_bytes((d / "root.pem").read_bytes())
    code, out = run("inspect", str(leaf), "--roots", str(new_root))
    assert code == 1
    assert "REFUSED" in out
    code, out = run("rotate", "--ca-dir", str(d), "--prune")
    assert code == 0
    assert "nothing to prune" in out  # retirement is 20 s + 1 s away


def test_clear_errors(tmp_path: Path) -> None:
    code, out = run("rotate")
    assert code == 2
    assert "give --ca-dir" in out
    code, out = run("rotate", "--ca-dir", str(tmp_path / "missing"))
    assert code == 1
    assert "does not exist" in out
    code, out = run("deny", "--etcd", "127.0.0.1:1", "--identity", "x", "--cluster", "y")
    assert code == 2
    assert "exactly one of" in out
    code, out = run("deny", "--etcd", "127.0.0.1:1", "--identity", "not-a-uri")
    assert code == 2
    assert "not a spiffe:// URI" in out
    code, out = run("deny", "--etcd", "127.0.0.1:1", "--identity", CLIENT)
    assert code == 1
    assert "etcd at 127.0.0.1:1" in out


def test_deny_allow_list_on_etcd_and_the_ca_follows(etcd_server: EtcdServer) -> None:
    ep = etcd_server.endpoint
    code, out = run("deny", "--etcd", ep, "--identity", CLIENT, "--reason", "leaked key")
    assert code == 0, out
    code, out = run("deny", "--etcd", ep, "--trust-domain", "west.fedgate.local")
    assert code == 0, out
    code, out = run("deny", "--etcd", ep, "--cluster", "nowhere")
    assert code == 1
    assert "publishes no info" in out
    code, out = run("denied", "--etcd", ep)
    assert CLIENT in out
    assert "leaked key" in out

    async def follow_once() -> frozenset[str]:
        seen: list[frozenset[str]] = []
        got = asyncio.Event()

        def install(entries: frozenset[str]) -> None:
            seen.append(entries)
            got.set()

        async with etcd_client([ep]) as client:
            task = asyncio.create_task(denied.follow(client, install, interval=0.05))
            try:
                async with asyncio.timeout(5):
                    await got.wait()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return seen[-1]

    assert asyncio.run(follow_once()) == {CLIENT, "spiffe://west.fedgate.local"}
    code, out = run("allow", "--etcd", ep, "--identity", CLIENT)
    assert code == 0, out
    code, out = run("allow", "--etcd", ep, "--identity", CLIENT)
    assert code == 1
    assert "was not denied" in out
    run("allow", "--etcd", ep, "--trust-domain", "west.fedgate.local")
    assert asyncio.run(follow_once()) == frozenset()
