"""Federated trust bundles: trust domain -> the roots that may vouch for it, and only for it.

SPIFFE federation semantics: a root from `west.fedgate.local` vouches for `spiffe://west...`
identities and nothing else, so a compromised or careless west CA cannot mint an east identity.
Several roots per domain are allowed so a root can rotate without dropping connections.

A bundle also carries the federation's deny list (`denied`): exact SPIFFE IDs
(`spiffe://east.fedgate.local/ns/demo/sa/client`) or whole trust domains
(`spiffe://east.fedgate.local`). `ca.verify` refuses a denied identity after its chain verified,
so every verifier that already takes a bundle enforces revocation without a second code path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from cryptography import x509

from ca.errors import VerificationError
from mesh.errors import MeshError
from mesh.naming import SpiffeId

SPIFFE = "spiffe://"


def normalize_denial(entry: str) -> str:
    """A deny-list entry in canonical form; ValueError naming what is wrong.

    `spiffe://<td>` denies a trust domain; `spiffe://<td>/ns/<ns>/sa/<sa>` one identity.
    """
    text = entry.strip()
    if not text.startswith(SPIFFE):
        raise ValueError(f"deny entry {entry!r} is not a spiffe:// URI")
    if "/" not in text[len(SPIFFE) :].rstrip("/"):
        domain = text[len(SPIFFE) :].rstrip("/")
        try:
            SpiffeId(domain, "x", "x")  # validates the trust domain's syntax
        except MeshError as e:
            raise ValueError(f"deny entry {entry!r}: {e}") from e
        return SPIFFE + domain
    try:
        return SpiffeId.parse(text).uri
    except MeshError as e:
        raise ValueError(f"deny entry {entry!r}: {e}") from e


def denial_of(spiffe_id: SpiffeId, denied: frozenset[str]) -> str | None:
    """The entry of `denied` that matches `spiffe_id` (exact ID first), or None."""
    if spiffe_id.uri in denied:
        return spiffe_id.uri
    domain = SPIFFE + spiffe_id.trust_domain
    return domain if domain in denied else None


@dataclass(frozen=True, slots=True)
class TrustBundle:
    roots: Mapping[str, tuple[x509.Certificate, ...]]
    denied: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_pem(cls, bundle: Mapping[str, Iterable[str | bytes]]) -> TrustBundle:
        parsed: dict[str, tuple[x509.Certificate, ...]] = {}
        for trust_domain, pems in bundle.items():
            certs: list[x509.Certificate] = []
            for pem in pems:
                data = pem.encode() if isinstance(pem, str) else pem
                try:
                    certs.extend(x509.load_pem_x509_certificates(data))
                except ValueError as e:
                    raise VerificationError(f"bad root PEM for {trust_domain}: {e}") from e
            parsed[trust_domain] = tuple(certs)
        return cls(MappingProxyType(parsed))

    def with_denied(self, denied: Iterable[str]) -> TrustBundle:
        """This bundle with deny list `denied` (replacing the current one); VerificationError
        if an entry is malformed, so a bad push is refused whole."""
        try:
            entries = frozenset(normalize_denial(d) for d in denied)
        except ValueError as e:
            raise VerificationError(str(e)) from e
        return replace(self, denied=entries)

    def merged(self, other: TrustBundle) -> TrustBundle:
        out = {td: list(rs) for td, rs in self.roots.items()}
        for td, rs in other.roots.items():
            have = out.setdefault(td, [])
            have.extend(r for r in rs if r not in have)
        return TrustBundle(
            MappingProxyType({td: tuple(rs) for td, rs in out.items()}),
            self.denied | other.denied,
        )

    def for_domain(self, trust_domain: str) -> tuple[x509.Certificate, ...]:
        return self.roots.get(trust_domain, ())

    def denial(self, spiffe_id: SpiffeId) -> str | None:
        """The deny-list entry refusing `spiffe_id`, or None if it is not denied."""
        return denial_of(spiffe_id, self.denied)

    def all_roots_pem(self) -> bytes:
        from ca.authority import cert_to_pem

        return b"".join(cert_to_pem(c) for rs in self.roots.values() for c in rs)

    def __len__(self) -> int:
        return sum(len(rs) for rs in self.roots.values())


EMPTY_BUNDLE = TrustBundle(MappingProxyType({}))
