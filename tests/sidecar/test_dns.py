"""DNS codec round trips, answers, fuzzing, and the UDP server surviving garbage."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.naming import ServiceKey
from sidecar.dns import (
    CLASS_IN,
    FORMERR,
    MAX_MESSAGE,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    TYPE_A,
    TYPE_AAAA,
    DnsServer,
    Header,
    Message,
    Question,
    Record,
    answer,
    decode_message,
    encode_message,
    respond,
)
from sidecar.errors import DnsFormatError

PAYMENTS = ServiceKey("shop", "payments")
NAME = "payments.shop.svc.clusterset.local"
VIPS = {PAYMENTS: "240.0.0.10"}


def lookup(key: ServiceKey) -> str | None:
    return VIPS.get(key)


def query(name: str, qtype: int = TYPE_A, ident: int = 0x1234, **flags: object) -> bytes:
    header = Header(ident, rd=True, **flags)  # type: ignore[arg-type]
    return encode_message(Message(header, Question(name, qtype)))


# --- codec ---------------------------------------------------------------------------------

labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
names = st.lists(labels, min_size=0, max_size=6).map(".".join)
records = st.builds(
    Record,
    name=names,
    rtype=st.integers(0, 0xFFFF).filter(lambda t: t != TYPE_A),
    rclass=st.integers(0, 0xFFFF),
    ttl=st.integers(0, 2**31 - 1),
    data=st.binary(max_size=40),
)
a_records = st.builds(
    lambda n, ip: Record.a(n, ip),
    names,
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
)
messages = st.builds(
    Message,
    header=st.builds(
        Header,
        id=st.integers(0, 0xFFFF),
        qr=st.booleans(),
        opcode=st.integers(0, 15),
        aa=st.booleans(),
        tc=st.booleans(),
        rd=st.booleans(),
        ra=st.booleans(),
        rcode=st.integers(0, 15),
    ),
    question=st.none() | st.builds(Question, names, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
    answers=st.lists(a_records | records, max_size=4).map(tuple),
    authority=st.lists(records, max_size=2).map(tuple),
    additional=st.lists(records, max_size=2).map(tuple),
)


@given(messages)
def test_round_trip(msg: Message) -> None:
    assert decode_message(encode_message(msg)) == msg


def test_answer_name_is_compressed_to_the_question() -> None:
    q = Question(NAME, TYPE_A)
    wire = encode_message(Message(Header(1, qr=True), q, (Record.a(NAME, "240.0.0.10"),)))
    assert wire.count(b"clusterset") == 1
    assert b"\xc0\x0c" in wire


@given(st.binary(max_size=600))
@settings(max_examples=500)
def test_fuzz_decoder_raises_only_its_own_error(data: bytes) -> None:
    with contextlib.suppress(DnsFormatError):
        decode_message(data)


@given(st.data())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_queries(data: st.DataObject) -> None:
    wire = bytearray(query(NAME))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    for candidate in (bytes(wire), bytes(wire[:cut])):
        with contextlib.suppress(DnsFormatError):
            decode_message(candidate)
        respond(candidate, lookup)  # never raises


def _header(qd: int = 1, an: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 7, 0x0100, qd, an, 0, 0)


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (_header() + b"\xc0\x0c\x00\x01\x00\x01", "does not point backwards"),  # self pointer
        (_header() + b"\xc0\x20\x00\x01\x00\x01", "does not point backwards"),  # forward
        (_header() + b"\x03abc\xc0\x0c\x00\x01\x00\x01", "does not point backwards"),  # a->self
        (_header() + b"\x40abc\x00\x00\x01\x00\x01", "unsupported label type"),
        (_header() + b"\x05ab", "past the end"),
        (_header() + b"\x01a\x00\x00", "truncated question"),
        (_header(qd=2), "questions"),
        (_header() + b"\x01a\x00\x00\x01\x00\x01extra", "trailing bytes"),
        (_header(an=1) + b"\x01a\x00\x00\x01\x00\x01\xc0\x0c\x00\x01\x00\x01\0\0\0\5\0\3abc", "A"),
        (
            _header()
            + b"\x3f"
            + b"a" * 63
            + b"\x3f"
            + b"b" * 63
            + b"\x3f"
            + b"c" * 63
            + b"\x3f"
            + b"d" * 63
            + b"\x00\x00\x01\x00\x01",
            "longer than 255",
        ),
        (_header() + b"\x01a\x00" + b"\x00" * MAX_MESSAGE, "exceeds"),
        (b"\x00\x01", "shorter than a header"),
        (_header() + b"\x02a.\x00\x00\x01\x00\x01", "printable"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(wire: bytes, why: str) -> None:
    with pytest.raises(DnsFormatError, match=why):
        decode_message(wire)


def test_pointer_chains_are_followed_backwards() -> None:
    # Question "a" at offset 12; the answer's owner is "b" + a pointer back to it: "b.a".
    wire = (
        _header(an=1)
        + b"\x01a\x00\x00\x01\x00\x01"
        + b"\x01b\xc0\x0c"
        + struct.pack("!HHIH", 1, 1, 5, 4)
        + b"\x01\x02\x03\x04"
    )
    msg = decode_message(wire)
    assert msg.question == Question("a", TYPE_A, CLASS_IN)
    assert msg.answers[0].name == "b.a"


# --- answers -------------------------------------------------------------------------------


def _answer(wire: bytes) -> Message:
    out = respond(wire, lookup)
    assert out is not None
    return decode_message(out)


def test_known_service_a_record_with_ttl_5() -> None:
    msg = _answer(query(NAME, ident=99))
    assert msg.header.id == 99
    assert msg.header.qr
    assert msg.header.aa
    assert msg.header.rd
    assert msg.header.rcode == NOERROR
    assert msg.answers == (Record(NAME, TYPE_A, CLASS_IN, 5, bytes([240, 0, 0, 10])),)


def test_names_match_case_insensitively_and_keep_the_query_case() -> None:
    name = "Payments.SHOP.svc.ClusterSet.local"
    msg = _answer(query(name))
    assert msg.question is not None
    assert msg.question.name == name
    assert msg.answers[0].data == bytes([240, 0, 0, 10])


def test_aaaa_for_a_known_name_is_nodata() -> None:
    msg = _answer(query(NAME, TYPE_AAAA))
    assert msg.header.rcode == NOERROR
    assert msg.answers == ()


@pytest.mark.parametrize(
    "name", ["cart.shop.svc.clusterset.local", "svc.clusterset.local", "a.b.c.svc.clusterset.local"]
)
def test_unknown_clusterset_names_are_nxdomain(name: str) -> None:
    assert _answer(query(name)).header.rcode == NXDOMAIN


@pytest.mark.parametrize("name", ["example.com", "payments.shop.svc.cluster.local", ""])
def test_other_names_are_refused(name: str) -> None:
    msg = _answer(query(name))
    assert msg.header.rcode == REFUSED
    assert not msg.header.aa


def test_non_query_opcode_is_notimp() -> None:
    assert _answer(query(NAME, opcode=2)).header.rcode == NOTIMP


def test_responses_are_never_answered() -> None:
    assert respond(query(NAME, qr=True), lookup) is None


def test_malformed_query_gets_formerr_with_its_id() -> None:
    msg = _answer(struct.pack("!HHHHHH", 4242, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c")
    assert msg.header.id == 4242
    assert msg.header.rcode == FORMERR


def test_garbage_shorter_than_a_header_is_ignored() -> None:
    assert respond(b"\x01", lookup) is None


def test_answer_ignores_a_response() -> None:
    assert answer(Message(Header(1, qr=True), Question(NAME, TYPE_A)), lookup) is None


# --- the UDP server ----------------------------------------------------------------------


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue(maxsize=100)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.replies.put_nowait(data)


async def test_server_answers_and_survives_garbage() -> None:
    server = await DnsServer.start("127.0.0.1", 0, lookup)
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(_Client, remote_addr=server.address)
    try:
        garbage = [b"", b"\xff" * 3, b"\x00" * 12 + b"\xc0", bytes(range(256)) * 20, b"\x80" * 40]
        for g in garbage:
            transport.sendto(g)
        transport.sendto(query(NAME, ident=7))
        async with asyncio.timeout(5):
            while True:
                msg = decode_message(await client.replies.get())
                if msg.header.id == 7:
                    break
        assert msg.answers[0].data == bytes([240, 0, 0, 10])
        assert server.queries >= len(garbage)  # asyncio does not send the empty datagram
    finally:
        transport.close()
        server.close()
