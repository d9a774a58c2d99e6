"""A cluster CA's directory on disk: its roots, which one issues, and its rotation plan.

Layout (one directory per cluster CA; in the rig `<rig-dir>/ca/<cluster>/`):

```
trust-domain          the CA's trust domain, one line
ca.json               the rotation plan (`ca.rotation.RootPlan`): every root's state, the
                      longest SVID lifetime the CA issues (`maxSvidTtlSeconds`)
roots/<id>.pem        every root of the plan, by id (SHA-256 fingerprint, 16 hex digits)
roots/<id>.key        its private key (mode 0600)
root.pem, root.key    a copy of the ACTIVE root: what single-root tools and a pod's bootstrap
                      read; replaced atomically when a rotation activates a new root
```

A directory holding only `trust-domain`, `root.pem` and `root.key` (the first layout, and what
`CertificateAuthority.save` writes) is read as one active root with the default maximum TTL;
the first rotation writes `ca.json` and `roots/` beside it.

Every change is made under an exclusive lock (`.lock`) and written atomically (temporary file,
fsync, rename), `ca.json` last, so a reader never sees a plan naming a root whose files are not
there yet. A running agent notices changes by polling `CaDirectory.changed()` (a stat of
`ca.json` and `root.pem`) or on SIGHUP. What this module does not do: decide when to move on
(`fedgate ca rotate` does), publish roots (the agent) or issue certificates (`ca.authority`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.authority import (
    DEFAULT_ROOT_TTL,
    DEFAULT_SVID_TTL,
    CertificateAuthority,
    cert_to_pem,
    key_to_pem,
    root_id,
)
from ca.errors import RotationError
from ca.files import atomic_write, exclusive_lock
from ca.rotation import DEFAULT_GRACE, RootPlan, plan_from_json, plan_to_json

MANIFEST = "ca.json"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    if not directory.is_dir():
        raise RotationError(f"{directory} is not a CA directory (it does not exist)")
    with exclusive_lock(directory / ".lock"):
        yield


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise RotationError(f"cannot read root certificate {path}: {e}") from e


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise RotationError(f"cannot read root key {path}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RotationError(f"root key {path} is not an EC key")
    return key


@dataclass(frozen=True, slots=True)
class CaState:
    """One consistent read of a CA directory."""

    trust_domain: str
    plan: RootPlan
    certs: Mapping[str, x509.Certificate]  # every root of the plan, by id
    issuer: CertificateAuthority  # the active root, with its key

    def published(self, now: dt.datetime) -> tuple[x509.Certificate, ...]:
        return tuple(self.certs[r.id] for r in self.plan.published(now))

    def published_pem(self, now: dt.datetime) -> tuple[str, ...]:
        return tuple(cert_to_pem(c).decode() for c in self.published(now))


def init_ca_dir(
    directory: Path,
    trust_domain: str,
    now: dt.datetime,
    *,
    max_svid_ttl: dt.timedelta = DEFAULT_SVID_TTL,
    root_ttl: dt.timedelta = DEFAULT_ROOT_TTL,
) -> CertificateAuthority:
    """Create a CA directory with one fresh active root; refuses an existing CA."""
    if (directory / "root.key").exists() or (directory / MANIFEST).exists():
        raise RotationError(f"{directory} already holds a CA (rotate it instead)")
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create(trust_domain, now, root_ttl)
    with _locked(directory):
        _write_root(directory, ca)
        atomic_write(directory / "trust-domain", (trust_domain + "\n").encode())
        _install_active(directory, ca)
        _write_plan(directory, RootPlan.single(ca.root_id, now, max_svid_ttl))
    return ca


def _write_root(directory: Path, ca: CertificateAuthority) -> None:
    roots = directory / "roots"
    roots.mkdir(exist_ok=True)
    atomic_write(roots / f"{ca.root_id}.key", key_to_pem(ca._key), mode=0o600)
    atomic_write(roots / f"{ca.root_id}.pem", ca.root_pem)


def _install_active(directory: Path, ca: CertificateAuthority) -> None:
    atomic_write(directory / "root.key", key_to_pem(ca._key), mode=0o600)
    atomic_write(directory / "root.pem", ca.root_pem)


def _write_plan(directory: Path, plan: RootPlan) -> None:
    body = json.dumps(plan_to_json(plan), indent=2, sort_keys=True) + "\n"
    atomic_write(directory / MANIFEST, body.encode())


def load_ca_dir(directory: Path) -> CaState:
    """Read a CA directory (either layout); RotationError says what is missing or wrong."""
    try:
        trust_domain = (directory / "trust-domain").read_text().strip()
    except OSError as e:
        raise RotationError(f"{directory} is not a CA directory: {e}") from e
    manifest = directory / MANIFEST
    if not manifest.exists():  # the single-root layout
        cert = _read_cert(directory / "root.pem")
        key = _read_key(directory / "root.key")
        ca = CertificateAuthority(trust_domain, key, cert)
        plan = RootPlan.single(ca.root_id, cert.not_valid_before_utc, DEFAULT_SVID_TTL)
        return CaState(trust_domain, plan, MappingProxyType({ca.root_id: cert}), ca)
    try:
        plan = plan_from_json(json.loads(manifest.read_text()))
    except (OSError, ValueError) as e:
        raise RotationError(f"cannot read {manifest}: {e}") from e
    certs = {r.id: _read_cert(directory / "roots" / f"{r.id}.pem") for r in plan.roots}
    for rid, cert in certs.items():
        if root_id(cert) != rid:
            raise RotationError(f"roots/{rid}.pem holds root {root_id(cert)}, not {rid}")
    active = plan.active.id
    issuer = CertificateAuthority(
        trust_domain, _read_key(directory / "roots" / f"{active}.key"), certs[active]
    )
    return CaState(trust_domain, plan, MappingProxyType(certs), issuer)


def _migrate(directory: Path, state: CaState) -> None:
    """Give a single-root directory its `roots/` and `ca.json` (caller holds the lock)."""
    if (directory / MANIFEST).exists():
        return
    _write_root(directory, state.issuer)
    _write_plan(directory, state.plan)


def prepare_rotation(
    directory: Path, now: dt.datetime, root_ttl: dt.timedelta = DEFAULT_ROOT_TTL
) -> str:
    """Step 1: add a new pending root (published, not issuing). Returns its id."""
    with _locked(directory):
        state = load_ca_dir(directory)
        _migrate(directory, state)
        new = CertificateAuthority.create(state.trust_domain, now, root_ttl)
        plan = state.plan.prepare(new.root_id, now)
        _write_root(directory, new)
        _write_plan(directory, plan)
        return new.root_id


def activate_rotation(
    directory: Path, root: str, now: dt.datetime, grace: dt.timedelta = DEFAULT_GRACE
) -> RootPlan:
    """Step 2: switch issuance to pending `root`; the old root retires later by itself."""
    with _locked(directory):
        state = load_ca_dir(directory)
        plan = state.plan.activate(root, now, grace)
        new = CertificateAuthority(
            state.trust_domain, _read_key(directory / "roots" / f"{root}.key"), state.certs[root]
        )
        # Plan first: a reader that sees the new root.pem also sees it active in ca.json.
        _write_plan(directory, plan)
        _install_active(directory, new)
        return plan


def abort_rotation(directory: Path) -> str:
    """Drop the pending root (before activation only). Returns its id."""
    with _locked(directory):
        state = load_ca_dir(directory)
        pending = state.plan.pending
        plan = state.plan.abort()
        _write_plan(directory, plan)
        assert pending is not None
        _remove_root_files(directory, pending.id)
        return pending.id


def prune_retired(directory: Path, now: dt.datetime) -> tuple[str, ...]:
    """Step 3 (housekeeping): forget roots past their retirement and delete their files."""
    with _locked(directory):
        state = load_ca_dir(directory)
        if not (directory / MANIFEST).exists():
            return ()
        plan, gone = state.plan.prune(now)
        if gone:
            _write_plan(directory, plan)
            for rid in gone:
                _remove_root_files(directory, rid)
        return gone


def _remove_root_files(directory: Path, rid: str) -> None:
    for suffix in (".pem", ".key"):
        with contextlib.suppress(FileNotFoundError):
            (directory / "roots" / f"{rid}{suffix}").unlink()


def anchors_pem(directory: Path, now: dt.datetime) -> bytes:
    """Every root the CA publishes at `now`: what a new workload's bootstrap should trust."""
    return "".join(load_ca_dir(directory).published_pem(now)).encode()


class CaDirectory:
    """A running CA's view of its directory, reloaded when the files change.

    `changed()` is a cheap stat; `reload()` reads everything again and keeps the old state if
    the directory is mid-edit or broken (the error is returned for the caller to log).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.state = load_ca_dir(directory)
        self._stamp = self._stat()

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for name in (MANIFEST, "root.pem"):
            try:
                st = os.stat(self.directory / name)
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                out.append((0, 0, 0))
        return tuple(out)

    def changed(self) -> bool:
        return self._stat() != self._stamp

    def reload(self) -> RotationError | None:
        stamp = self._stat()
        try:
            state = load_ca_dir(self.directory)
        except RotationError as e:
            return e
        if state.trust_domain != self.state.trust_domain:
            return RotationError(
                f"trust domain changed from {self.state.trust_domain} to {state.trust_domain}"
            )
        self.state = state
        self._stamp = stamp
        return None
