"""The CA directory on disk: init, the single-root layout, rotation steps, reload on change."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca import cadir
from ca.authority import CertificateAuthority, root_id
from ca.bundle import TrustBundle
from ca.errors import RotationError
from ca.keys import new_key_and_csr
from ca.verify import verify_chain
from mesh.naming import SpiffeId

TD = "east.fedgate.local"
T0 = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
TTL = dt.timedelta(seconds=20)


def s(n: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=n)


def test_init_writes_the_layout_with_private_keys_0600(tmp_path: Path) -> None:
    ca = cadir.init_ca_dir(tmp_path / "east", TD, T0, max_svid_ttl=TTL)
    d = tmp_path / "east"
    assert (d / "trust-domain").read_text().strip() == TD
    assert (d / "root.pem").read_bytes() == ca.root_pem
    for key in (d / "root.key", d / "roots" / f"{ca.root_id}.key"):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    state = cadir.load_ca_dir(d)
    assert state.plan.max_svid_ttl == TTL
    assert state.issuer.root_id == ca.root_id
    # The single-root loader still reads it (probes and tools use root.pem/root.key).
    assert CertificateAuthority.load(d).root_id == ca.root_id
    with pytest.raises(RotationError, match="already holds a CA"):
        cadir.init_ca_dir(d, TD, T0)


def test_single_root_layout_is_read_and_migrated_on_first_rotation(tmp_path: Path) -> None:
    old = CertificateAuthority.create(TD, T0)
    old.save(tmp_path)  # the first layout: no ca.json, no roots/
    state = cadir.load_ca_dir(tmp_path)
    assert state.plan.active.id == old.root_id
    new_id = cadir.prepare_rotation(tmp_path, s(1))
    assert (tmp_path / cadir.MANIFEST).exists()
    state = cadir.load_ca_dir(tmp_path)
    assert [root_id(c) for c in state.published(s(1))] == [old.root_id, new_id]
    assert state.issuer.root_id == old.root_id  # pending does not issue yet


def test_rotation_steps_on_disk(tmp_path: Path) -> None:
    first = cadir.init_ca_dir(tmp_path, TD, T0, max_svid_ttl=TTL)
    watcher = cadir.CaDirectory(tmp_path)
    assert not watcher.changed()

    new_id = cadir.prepare_rotation(tmp_path, s(1))
    assert watcher.changed()
    assert watcher.reload() is None
    assert len(watcher.state.published(s(1))) == 2
    anchors = x509.load_pem_x509_certificates(cadir.anchors_pem(tmp_path, s(1)))
    assert {root_id(c) for c in anchors} == {first.root_id, new_id}

    plan = cadir.activate_rotation(tmp_path, new_id, s(10), grace=dt.timedelta(seconds=5))
    old = plan.entry(first.root_id)
    assert old is not None
    assert old.retire_at == s(35)
    assert root_id(x509.load_pem_x509_certificate((tmp_path / "root.pem").read_bytes())) == new_id
    assert watcher.changed()
    assert watcher.reload() is None
    assert watcher.state.issuer.root_id == new_id

    # An SVID of the new root verifies against the published pair.
    ident = SpiffeId(TD, "demo", "echo")
    _, csr = new_key_and_csr()
    leaf = watcher.state.issuer.sign_csr(csr, ident, s(11), TTL)
    bundle = TrustBundle.from_pem({TD: list(watcher.state.published_pem(s(11)))})
    der = x509.load_pem_x509_certificate(leaf).public_bytes(Encoding.DER)
    assert verify_chain([der], bundle, s(11)) == ident

    assert [root_id(c) for c in watcher.state.published(s(36))] == [new_id]
    assert cadir.prune_retired(tmp_path, s(36)) == (first.root_id,)
    assert not (tmp_path / "roots" / f"{first.root_id}.key").exists()
    assert cadir.prune_retired(tmp_path, s(37)) == ()


def test_abort_removes_the_pending_root(tmp_path: Path) -> None:
    cadir.init_ca_dir(tmp_path, TD, T0)
    rid = cadir.prepare_rotation(tmp_path, s(1))
    assert cadir.abort_rotation(tmp_path) == rid
    assert not (tmp_path / "roots" / f"{rid}.pem").exists()
    with pytest.raises(RotationError, match="no rotation is pending"):
        cadir.abort_rotation(tmp_path)


def test_broken_directory_keeps_the_last_good_state(tmp_path: Path) -> None:
    ca = cadir.init_ca_dir(tmp_path, TD, T0)
    watcher = cadir.CaDirectory(tmp_path)
    (tmp_path / cadir.MANIFEST).write_text("{not json")
    assert watcher.changed()
    error = watcher.reload()
    assert isinstance(error, RotationError)
    assert watcher.state.issuer.root_id == ca.root_id


def test_a_root_file_that_does_not_match_its_id_is_refused(tmp_path: Path) -> None:
    ca = cadir.init_ca_dir(tmp_path, TD, T0)
    other = CertificateAuthority.create(TD, T0)
    (tmp_path / "roots" / f"{ca.root_id}.pem").write_bytes(other.root_pem)
    with pytest.raises(RotationError, match="holds root"):
        cadir.load_ca_dir(tmp_path)


def test_not_a_ca_directory(tmp_path: Path) -> None:
    with pytest.raises(RotationError, match="not a CA directory"):
        cadir.load_ca_dir(tmp_path)
