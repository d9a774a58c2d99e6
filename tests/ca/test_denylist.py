"""The deny list: entry syntax, etcd key layout, decoding from config, enforcement in ca.verify."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca import denylist
from ca.authority import CertificateAuthority
from ca.bundle import TrustBundle, normalize_denial
from ca.errors import DeniedError, VerificationError
from ca.verify import verify_chain
from mesh import codec
from mesh.errors import CodecError
from mesh.model import Snapshot
from mesh.naming import SpiffeId

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
EAST = "east.fedgate.local"
CLIENT = f"spiffe://{EAST}/ns/demo/sa/client"


def test_entries_are_canonical_uris_of_an_identity_or_a_trust_domain() -> None:
    assert normalize_denial(f" {CLIENT} ") == CLIENT
    assert normalize_denial(f"spiffe://{EAST}/") == f"spiffe://{EAST}"
    for bad in ("east.fedgate.local", "spiffe://", "spiffe://EAST!", f"spiffe://{EAST}/ns/x"):
        with pytest.raises(ValueError, match="deny entry"):
            normalize_denial(bad)


def test_key_layout_and_value_round_trip() -> None:
    assert denylist.key_for(CLIENT) == f"/fedgate/config/denied/id/{EAST}/demo/client"
    assert denylist.key_for(f"spiffe://{EAST}") == f"/fedgate/config/denied/domain/{EAST}"
    d = denylist.new_denial(CLIENT, "stolen laptop", NOW)
    suffix = denylist.key_suffix(CLIENT)
    assert denylist.decode(suffix, denylist.encode(d)) == d
    # etcdctl put ... spiffe://... works too
    assert denylist.decode(suffix, CLIENT.encode()).entry == CLIENT
    with pytest.raises(ValueError, match="does not match"):
        denylist.decode(f"domain/{EAST}", CLIENT)
    with pytest.raises(ValueError, match="neither JSON"):
        denylist.decode(suffix, b"{oops")


def test_entries_from_config_skips_and_reports_malformed_ones() -> None:
    entries, problems = denylist.entries_from_config(
        {
            denylist.key_suffix(CLIENT): CLIENT,
            f"domain/{EAST}": denylist.encode(denylist.new_denial(f"spiffe://{EAST}", "", NOW)),
            "id/garbage": "nonsense",
        }
    )
    assert entries == (f"spiffe://{EAST}", CLIENT)
    assert len(problems) == 1
    assert "garbage" in problems[0]


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def test_verify_refuses_a_denied_identity_and_a_denied_domain() -> None:
    ca = CertificateAuthority.create(EAST, NOW)
    client = ca.issue(SpiffeId.parse(CLIENT), NOW)
    echo = ca.issue(SpiffeId(EAST, "demo", "echo"), NOW)
    bundle = TrustBundle.from_pem({EAST: [ca.root_pem]})
    assert verify_chain([_der(client.cert_pem)], bundle, NOW).uri == CLIENT

    one = bundle.with_denied([CLIENT])
    with pytest.raises(DeniedError, match=r"identity is denied .*sa/client"):
        verify_chain([_der(client.cert_pem)], one, NOW)
    assert verify_chain([_der(echo.cert_pem)], one, NOW).service_account == "echo"

    domain = bundle.with_denied([f"spiffe://{EAST}"])
    with pytest.raises(DeniedError, match="trust domain of"):
        verify_chain([_der(echo.cert_pem)], domain, NOW)
    # The deny list survives merging with bootstrap anchors.
    assert TrustBundle.from_pem({}).merged(domain).denied == domain.denied


def test_a_forged_chain_of_a_denied_identity_reports_the_forgery() -> None:
    rogue = CertificateAuthority.create(EAST, NOW)
    bundle = TrustBundle.from_pem({EAST: [CertificateAuthority.create(EAST, NOW).root_pem]})
    forged = rogue.issue(SpiffeId.parse(CLIENT), NOW)
    with pytest.raises(VerificationError, match="not signed by any root") as info:
        verify_chain([_der(forged.cert_pem)], bundle.with_denied([CLIENT]), NOW)
    assert not isinstance(info.value, DeniedError)


def test_bad_entries_make_with_denied_refuse_the_bundle() -> None:
    with pytest.raises(VerificationError, match="deny entry"):
        TrustBundle.from_pem({}).with_denied(["not-a-uri"])


def test_snapshot_codec_carries_the_deny_list() -> None:
    snap = Snapshot(version="v", clusters=(), services=(), denied=(f"spiffe://{EAST}", CLIENT))
    body = codec.snapshot_to_json(snap)
    assert body["denied"] == [f"spiffe://{EAST}", CLIENT]
    assert codec.snapshot_from_json(body).denied == snap.denied
    empty = codec.snapshot_to_json(Snapshot(version="v", clusters=(), services=()))
    assert "denied" not in empty  # peers that predate the field see the same JSON
    assert codec.snapshot_from_json(empty).denied == ()
    with pytest.raises(CodecError, match="not a spiffe"):
        codec.decode(codec.dumps({**body, "denied": ["x"]}), codec.snapshot_from_json, "snap")
