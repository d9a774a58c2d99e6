"""Federated trust bundles: trust domain -> the roots that may vouch for it, and only for it.

SPIFFE federation semantics: a root from `west.fedgate.local` vouches for `spiffe://west...`
identities and nothing else, so a compromised or careless west CA cannot mint an east identity.
Several roots per domain are allowed so a root can rotate without dropping connections.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from cryptography import x509

from ca.errors import VerificationError


@dataclass(frozen=True, slots=True)
class TrustBundle:
    roots: Mapping[str, tuple[x509.Certificate, ...]]

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

    def merged(self, other: TrustBundle) -> TrustBundle:
        out = {td: list(rs) for td, rs in self.roots.items()}
        for td, rs in other.roots.items():
            have = out.setdefault(td, [])
            have.extend(r for r in rs if r not in have)
        return TrustBundle(MappingProxyType({td: tuple(rs) for td, rs in out.items()}))

    def for_domain(self, trust_domain: str) -> tuple[x509.Certificate, ...]:
        return self.roots.get(trust_domain, ())

    def all_roots_pem(self) -> bytes:
        from ca.authority import cert_to_pem

        return b"".join(cert_to_pem(c) for rs in self.roots.values() for c in rs)

    def __len__(self) -> int:
        return sum(len(rs) for rs in self.roots.values())


EMPTY_BUNDLE = TrustBundle(MappingProxyType({}))
