"""Workload identity from Kubernetes: a projected ServiceAccount token, checked with TokenReview.

`TokenReviewAuthenticator` is the CA's `ca.tokens.TokenAuthenticator` when the agent reads a
Kubernetes cluster. As Istio's CA does, it sends the workload's token to the API server in a
`TokenReview` (authentication.k8s.io/v1) with `spec.audiences: ["fedgate"]`, and accepts it only
when the review says `authenticated`, the granted `status.audiences` include `fedgate` (so a
token minted for another audience, or a legacy Secret token, which is only for the API server,
is refused), and `status.user.username` is a service account, `system:serviceaccount:<ns>:<sa>`.
That username is the identity: nothing the workload sends besides the token counts.

A workload gets such a token from a projected volume:

    volumes:
    - name: fedgate-token
      projected:
        sources:
        - serviceAccountToken: {audience: fedgate, expirationSeconds: 3600, path: token}

The review is one blocking call of the synchronous client, so it runs in a worker thread
(`asyncio.to_thread`); it happens once per workload start (renewals are authenticated by the
current SVID), so there is no cache. An API server that cannot be asked (unreachable, 5xx, our
ServiceAccount lacking `create` on tokenreviews) is `AuthenticatorUnavailableError`: the workload
is told UNAVAILABLE and retries; only the review's own answer refuses a token.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from ca.tokens import (
    AuthenticatorUnavailableError,
    ServiceAccount,
    TokenRefusedError,
    service_account_of,
)

AUDIENCE = "fedgate"
# connect, read (seconds): the review answers within the workload's 5 s Sign deadline.
TIMEOUT = (2.0, 2.5)


def account_of_review(status: Any, audience: str) -> ServiceAccount:
    """The account a TokenReview's `status` (the client's V1TokenReviewStatus) grants, or
    TokenRefusedError with the reason."""
    if status is None:
        raise TokenRefusedError("the token review has no status")
    if not status.authenticated:
        raise TokenRefusedError(f"not authenticated: {status.error or 'no reason given'}")
    granted = list(status.audiences or [])
    if audience not in granted:
        raise TokenRefusedError(f"token audiences {granted} do not include {audience!r}")
    username = status.user.username if status.user is not None else None
    return service_account_of(username or "")


class TokenReviewAuthenticator:
    """`ca.tokens.TokenAuthenticator` over the Kubernetes TokenReview API."""

    def __init__(self, api_client: Any, audience: str = AUDIENCE) -> None:
        self._api = kubernetes.client.AuthenticationV1Api(api_client)
        self.audience = audience
        self.reviews = 0  # metrics
        self.failures = 0

    async def authenticate(self, token: str) -> ServiceAccount:
        return await asyncio.to_thread(self._review, token)

    def _review(self, token: str) -> ServiceAccount:
        body = kubernetes.client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=kubernetes.client.V1TokenReviewSpec(token=token, audiences=[self.audience]),
        )
        self.reviews += 1
        try:
            review = self._api.create_token_review(body, _request_timeout=TIMEOUT)
        except ApiException as e:
            self.failures += 1
            raise AuthenticatorUnavailableError(f"TokenReview failed: {e.status} {e.reason}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            self.failures += 1
            raise AuthenticatorUnavailableError(f"TokenReview failed: {e}") from e
        return account_of_review(review.status, self.audience)
