"""Who a bootstrap token proves a workload to be: the `TokenAuthenticator` seam of the CA.

A workload's first SVID is authenticated by a token (`ca.service`'s bootstrap port). What the
token proves is a Kubernetes-style service account, `ServiceAccount(namespace, name)`; the CA
puts it in its own trust domain (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`). Nothing the
request says (its CSR's subject or SANs) takes part: the identity is the authenticator's answer.

Two implementations, one per cluster source, wired by fedgate/:

* the rig's join-token table (`tokens.json`, `clusters.source.FileTokenAuthenticator`);
* Kubernetes' TokenReview of a projected ServiceAccount token with audience `fedgate`, as
  Istio's CA does (`clusters.kube.tokenreview.TokenReviewAuthenticator`): the account comes
  from the review's `status.user.username` (`system:serviceaccount:<ns>:<sa>`, parsed here).

An authenticator raises `TokenRefusedError` with the reason a token is refused (logged by the
CA, and sent to the workload as UNAUTHENTICATED), or `AuthenticatorUnavailableError` when it
cannot decide now (the API server is unreachable: UNAVAILABLE, so the workload retries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ca.errors import IssuanceError
from mesh.errors import MeshError
from mesh.naming import SpiffeId, check_label

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The identity a token proves: a namespace and a service account in it."""

    namespace: str
    name: str

    def spiffe_id(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.name)


class TokenRefusedError(IssuanceError):
    """The token proves no identity; the message says why (logged, sent to the caller)."""


class AuthenticatorUnavailableError(IssuanceError):
    """The authenticator cannot decide now (its backend is unreachable); the caller retries."""


class TokenAuthenticator(Protocol):
    async def authenticate(self, token: str) -> ServiceAccount:
        """The account `token` proves. Raises TokenRefusedError (with the reason) or
        AuthenticatorUnavailableError."""
        ...


def service_account_of(username: str) -> ServiceAccount:
    """The account named by a ServiceAccount token's username, `system:serviceaccount:<ns>:<sa>`.

    Anything else (a user, a node, a malformed name) is refused: only service accounts get
    workload identities."""
    rest = username.removeprefix(SERVICE_ACCOUNT_PREFIX)
    parts = rest.split(":")
    if rest == username or len(parts) != 2:
        raise TokenRefusedError(
            f"{username!r} is not a service account (system:serviceaccount:<ns>:<sa>)"
        )
    try:
        return ServiceAccount(
            check_label(parts[0], "namespace"), check_label(parts[1], "service account")
        )
    except MeshError as e:
        raise TokenRefusedError(f"{username!r}: {e}") from e


class LookupTokens:
    """A `TokenAuthenticator` over a plain lookup (a table of join tokens, tests): a token the
    lookup does not know is refused. A SpiffeId answer gives its namespace and service account
    only: the CA issues in its own trust domain, whatever the table says."""

    def __init__(self, lookup: Callable[[str], SpiffeId | ServiceAccount | None]) -> None:
        self._lookup = lookup

    async def authenticate(self, token: str) -> ServiceAccount:
        found = self._lookup(token)
        if found is None:
            raise TokenRefusedError("unknown join token")
        if isinstance(found, SpiffeId):
            return ServiceAccount(found.namespace, found.service_account)
        return found
