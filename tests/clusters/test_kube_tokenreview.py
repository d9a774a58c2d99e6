"""Workload identity from Kubernetes: the CA checks projected ServiceAccount tokens with
TokenReview (the faithful fake API server answers it), and the SVID names the reviewed account.

Three ways, as issue 13 asks: a valid token gets an SVID naming the reviewed account; an
invalid or wrong-audience token is refused with a logged reason; a request that claims another
namespace (its CSR asks for it) still gets the reviewed account's identity.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from structlog.testing import LogCapture

from ca.api import ca_pb2, ca_pb2_grpc
from ca.authority import CertificateAuthority
from ca.bundle import TrustBundle
from ca.client import obtain_svid
from ca.errors import IssuanceError
from ca.keys import new_key_and_csr
from ca.service import serve
from ca.tokens import ServiceAccount, TokenRefusedError, service_account_of
from ca.verify import utcnow, verify_chain
from clusters.kube.tokenreview import TokenReviewAuthenticator, account_of_review
from clusters.source import FileTokenAuthenticator, add_token
from mesh.naming import SpiffeId
from tests.ca.conftest import free_pair
from tests.clusters.kube_rig import TD, api_client
from tests.kubefake import FakeKubeAPI
from tests.kubefake.fake import TokenIdentity

PAYMENTS = "system:serviceaccount:shop:payments"
REVIEWS = {
    "good": TokenIdentity(PAYMENTS, ("fedgate",)),
    # A token projected for another audience (or a legacy Secret token, for the API server).
    "other-audience": TokenIdentity(PAYMENTS, ("https://kubernetes.default.svc",)),
    "a-user": TokenIdentity("alice@example.com", ("fedgate",)),
}


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(token_reviews=REVIEWS) as fake:
        yield fake


@pytest.fixture
async def ca_server(
    api: FakeKubeAPI, tmp_path: Path
) -> AsyncIterator[tuple[str, CertificateAuthority]]:
    """A CA whose bootstrap tokens are checked with the fake's TokenReview."""
    ca = CertificateAuthority.create(TD, utcnow())
    addr = free_pair()
    with api_client(tmp_path, api.url) as client:
        server = await serve(ca, TokenReviewAuthenticator(client), addr)
        try:
            yield addr, ca
        finally:
            await server.stop(None)


def refusals(logs: LogCapture) -> list[str]:
    return [str(e["reason"]) for e in logs.entries if e["event"] == "sign refused"]


async def test_a_valid_token_gets_an_svid_naming_the_reviewed_account(
    api: FakeKubeAPI, ca_server: tuple[str, CertificateAuthority]
) -> None:
    addr, ca = ca_server
    svid = await obtain_svid(addr, "good", ca.root_pem, TD)
    assert svid.spiffe_id == SpiffeId(TD, "shop", "payments")
    reviews = [q for q in api.requests if q.path.endswith("/tokenreviews")]
    assert [q.method for q in reviews] == ["POST"]


async def test_invalid_or_wrong_audience_tokens_are_refused_with_a_logged_reason(
    logs: LogCapture, ca_server: tuple[str, CertificateAuthority]
) -> None:
    addr, ca = ca_server
    for token in ("forged", "other-audience", "a-user"):
        with pytest.raises(IssuanceError, match="UNAUTHENTICATED"):
            await obtain_svid(addr, token, ca.root_pem, TD, attempts=1)
    forged, audience, user = refusals(logs)
    assert forged.startswith("token refused: not authenticated: [invalid bearer token")
    assert "is invalid for the target audiences ['fedgate']" in audience
    assert user == (
        "token refused: 'alice@example.com' is not a service account "
        "(system:serviceaccount:<ns>:<sa>)"
    )


async def test_a_request_claiming_another_namespace_gets_the_reviewed_identity(
    ca_server: tuple[str, CertificateAuthority],
) -> None:
    addr, ca = ca_server
    claimed = SpiffeId(TD, "kube-system", "admin")
    _, csr = new_key_and_csr(claimed)  # the CSR's SAN asks for kube-system/admin
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.root_pem)
    options = [("grpc.ssl_target_name_override", f"ca.{TD}")]
    async with grpc.aio.secure_channel(addr, credentials, options=options) as channel:
        response = await ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(
            ca_pb2.SignRequest(csr_pem=csr, token="good")
        )
    assert response.spiffe_id == SpiffeId(TD, "shop", "payments").uri
    chain = [
        c.public_bytes(Encoding.DER)
        for c in x509.load_pem_x509_certificates(response.cert_chain_pem)
    ]
    bundle = TrustBundle.from_pem({TD: [ca.root_pem]})
    assert verify_chain(chain, bundle, utcnow()) == SpiffeId(TD, "shop", "payments")


async def test_an_unreachable_api_server_is_unavailable_not_a_refusal(
    logs: LogCapture, tmp_path: Path
) -> None:
    ca = CertificateAuthority.create(TD, utcnow())
    addr = free_pair()
    with api_client(tmp_path, "http://127.0.0.1:1") as c:
        server = await serve(ca, TokenReviewAuthenticator(c), addr)
        try:
            with pytest.raises(IssuanceError, match="UNAVAILABLE"):
                await obtain_svid(addr, "good", ca.root_pem, TD, attempts=1)
            assert refusals(logs)[0].startswith("cannot authenticate the token now: TokenReview")
        finally:
            await server.stop(None)


def test_an_authenticated_review_without_our_audience_is_refused() -> None:
    # An API server that ignores spec.audiences answers with the token's own audiences (or
    # none): authenticated, but not for fedgate.
    user = SimpleNamespace(username=PAYMENTS)
    for granted in ([], None, ["https://kubernetes.default.svc"]):
        status = SimpleNamespace(authenticated=True, audiences=granted, user=user, error=None)
        with pytest.raises(TokenRefusedError, match="do not include 'fedgate'"):
            account_of_review(status, "fedgate")
    ok = SimpleNamespace(authenticated=True, audiences=["fedgate"], user=user, error=None)
    assert account_of_review(ok, "fedgate") == ServiceAccount("shop", "payments")


def test_service_account_usernames() -> None:
    assert service_account_of(PAYMENTS) == ServiceAccount("shop", "payments")
    for bad in ("system:serviceaccount:shop", "system:serviceaccount:a:b:c", "system:node:n1"):
        with pytest.raises(TokenRefusedError):
            service_account_of(bad)
    with pytest.raises(TokenRefusedError, match="RFC 1123"):
        service_account_of("system:serviceaccount:Shop:payments")


async def test_the_rig_token_file_is_the_file_sources_equivalent(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tokens = FileTokenAuthenticator(path)
    with pytest.raises(TokenRefusedError, match="unknown join token"):
        await tokens.authenticate("t1")
    add_token(path, "t1", "demo", "echo")  # re-read per request: a pod added later is known
    assert await tokens.authenticate("t1") == ServiceAccount("demo", "echo")
