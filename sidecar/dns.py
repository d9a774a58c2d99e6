"""DNS for clusterset names: a bounded RFC 1035 codec, the answer logic, and a UDP driver.

The pod's resolver points at the sidecar (127.0.0.1:53). This server answers only the
`clusterset.local` zone, from the sidecar's current route table:

- `A <svc>.<ns>.svc.clusterset.local` for a known service -> its VIP, TTL 5 s (short, so a VIP
  change reaches clients quickly); `ANY` gets the same answer;
- any other type (`AAAA`, ...) for a known name -> NOERROR with no answer (NODATA);
- an unknown name in the zone -> NXDOMAIN;
- any other name -> REFUSED: there is no upstream forwarding in this version.

The codec (`decode_message`/`encode_message`) accepts a header, at most one question, and
resource records; names may use compression pointers (RFC 1035 §4.1.4), which must point
strictly backwards (so no loop is possible) and are followed at most `MAX_POINTERS` times.
Every malformed, oversized or unsupported message raises `DnsFormatError` and nothing else.
What this module does not do: TCP (answers never need truncation), EDNS(0) (an OPT record is
parsed and ignored, and the response carries none, as RFC 6891 §7 allows), DNSSEC, caching.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import structlog

from mesh.errors import MeshError
from mesh.naming import ServiceKey
from sidecar.errors import DnsFormatError

_log = structlog.get_logger("fedgate.sidecar.dns")

MAX_MESSAGE = 4096  # the largest EDNS(0) payload a stub normally advertises
MAX_RECORDS = 64  # answer + authority + additional records in one message
MAX_NAME = 255  # RFC 1035 §3.1, wire length including length octets
MAX_LABEL = 63
MAX_POINTERS = 16
TTL = 5

TYPE_A = 1
TYPE_AAAA = 28
TYPE_ANY = 255
CLASS_IN = 1
CLASS_ANY = 255

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
ZONE = "clusterset.local"

_HEADER = struct.Struct("!HHHHHH")
_QTAIL = struct.Struct("!HH")
_RRTAIL = struct.Struct("!HHIH")


@dataclass(frozen=True, slots=True)
class Header:
    id: int
    qr: bool = False
    opcode: int = 0
    aa: bool = False
    tc: bool = False
    rd: bool = False
    ra: bool = False
    rcode: int = NOERROR

    def flags(self) -> int:
        return (
            (self.qr << 15)
            | ((self.opcode & 0xF) << 11)
            | (self.aa << 10)
            | (self.tc << 9)
            | (self.rd << 8)
            | (self.ra << 7)
            | (self.rcode & 0xF)
        )

    @classmethod
    def from_flags(cls, ident: int, flags: int) -> Header:
        return cls(
            id=ident,
            qr=bool(flags >> 15 & 1),
            opcode=flags >> 11 & 0xF,
            aa=bool(flags >> 10 & 1),
            tc=bool(flags >> 9 & 1),
            rd=bool(flags >> 8 & 1),
            ra=bool(flags >> 7 & 1),
            rcode=flags & 0xF,
        )


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # dotted, no trailing dot, case preserved ("" is the root)
    qtype: int
    qclass: int = CLASS_IN


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    rtype: int
    rclass: int
    ttl: int
    data: bytes

    @classmethod
    def a(cls, name: str, address: str, ttl: int = TTL) -> Record:
        parts = address.split(".")
        if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
            raise ValueError(f"{address!r} is not an IPv4 address")
        return cls(name, TYPE_A, CLASS_IN, ttl, bytes(int(p) for p in parts))


@dataclass(frozen=True, slots=True)
class Message:
    header: Header
    question: Question | None = None
    answers: tuple[Record, ...] = ()
    authority: tuple[Record, ...] = ()
    additional: tuple[Record, ...] = ()


# --- decoding ----------------------------------------------------------------------------------


def _read_name(buf: bytes, offset: int) -> tuple[str, int]:
    """Decode a possibly compressed name at `offset`; return (name, offset after it)."""
    labels: list[str] = []
    wire_len = 1
    pos, end, hops = offset, -1, 0
    segment = offset  # where the labels being read began; every jump must land before it
    while True:
        if pos >= len(buf):
            raise DnsFormatError("name runs past the end of the message")
        length = buf[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= len(buf):
                raise DnsFormatError("truncated compression pointer")
            target = (length & 0x3F) << 8 | buf[pos + 1]
            # §4.1.4: a pointer refers to a *prior* occurrence. Requiring each jump to land before
            # the segment it leaves makes positions strictly decrease, so no loop is possible.
            if target >= segment:
                raise DnsFormatError(f"compression pointer at {pos} does not point backwards")
            hops += 1
            if hops > MAX_POINTERS:
                raise DnsFormatError(f"more than {MAX_POINTERS} compression pointers in a name")
            if end < 0:
                end = pos + 2
            pos = segment = target
            continue
        if length & 0xC0:
            raise DnsFormatError(f"unsupported label type 0x{length & 0xC0:02x}")
        if length == 0:
            return ".".join(labels), (end if end >= 0 else pos + 1)
        raw = buf[pos + 1 : pos + 1 + length]
        if len(raw) != length:
            raise DnsFormatError("label runs past the end of the message")
        if any(b <= 0x20 or b >= 0x7F or b == 0x2E for b in raw):
            raise DnsFormatError("label is not printable ASCII without dots")
        wire_len += length + 1
        if wire_len > MAX_NAME:
            raise DnsFormatError(f"name longer than {MAX_NAME} octets")
        labels.append(raw.decode("ascii"))
        pos += length + 1


def _read_record(buf: bytes, offset: int) -> tuple[Record, int]:
    name, pos = _read_name(buf, offset)
    if pos + _RRTAIL.size > len(buf):
        raise DnsFormatError("truncated resource record")
    rtype, rclass, ttl, rdlength = _RRTAIL.unpack_from(buf, pos)
    pos += _RRTAIL.size
    data = buf[pos : pos + rdlength]
    if len(data) != rdlength:
        raise DnsFormatError("resource record data runs past the end of the message")
    if rtype == TYPE_A and rclass == CLASS_IN and rdlength != 4:
        raise DnsFormatError(f"A record with {rdlength} bytes of data")
    return Record(name, rtype, rclass, ttl, data), pos + rdlength


def decode_message(buf: bytes) -> Message:
    """Parse one DNS message; DnsFormatError for anything malformed or beyond our limits."""
    if len(buf) > MAX_MESSAGE:
        raise DnsFormatError(f"message of {len(buf)} bytes exceeds {MAX_MESSAGE}")
    if len(buf) < _HEADER.size:
        raise DnsFormatError(f"message of {len(buf)} bytes is shorter than a header")
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(buf)
    if qdcount > 1:
        raise DnsFormatError(f"{qdcount} questions; exactly one is supported")
    if ancount + nscount + arcount > MAX_RECORDS:
        raise DnsFormatError(f"more than {MAX_RECORDS} resource records")
    pos = _HEADER.size
    question = None
    if qdcount:
        name, pos = _read_name(buf, pos)
        if pos + _QTAIL.size > len(buf):
            raise DnsFormatError("truncated question")
        qtype, qclass = _QTAIL.unpack_from(buf, pos)
        pos += _QTAIL.size
        question = Question(name, qtype, qclass)
    sections: list[tuple[Record, ...]] = []
    for count in (ancount, nscount, arcount):
        records = []
        for _ in range(count):
            record, pos = _read_record(buf, pos)
            records.append(record)
        sections.append(tuple(records))
    if pos != len(buf):
        raise DnsFormatError(f"{len(buf) - pos} trailing bytes after the last record")
    return Message(Header.from_flags(ident, flags), question, *sections)


# --- encoding ----------------------------------------------------------------------------------


def _encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.split(".") if name else ():
        raw = label.encode("ascii")
        if not 0 < len(raw) <= MAX_LABEL:
            raise DnsFormatError(f"label {label!r} must be 1..{MAX_LABEL} octets")
        out += bytes((len(raw),)) + raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise DnsFormatError(f"name {name[:40]!r}... longer than {MAX_NAME} octets")
    return bytes(out)


def encode_message(msg: Message) -> bytes:
    """Serialise `msg`; an answer owner name equal to the question's becomes a pointer."""
    records = msg.answers + msg.authority + msg.additional
    if len(records) > MAX_RECORDS:
        raise DnsFormatError(f"more than {MAX_RECORDS} resource records")
    h = msg.header
    out = bytearray(
        _HEADER.pack(
            h.id,
            h.flags(),
            1 if msg.question else 0,
            len(msg.answers),
            len(msg.authority),
            len(msg.additional),
        )
    )
    qname = None
    if msg.question is not None:
        qname = msg.question.name
        out += _encode_name(qname) + _QTAIL.pack(msg.question.qtype, msg.question.qclass)
    for r in records:
        if qname is not None and r.name == qname:
            out += b"\xc0\x0c"  # the question name always starts right after the header
        else:
            out += _encode_name(r.name)
        out += _RRTAIL.pack(r.rtype, r.rclass, r.ttl, len(r.data)) + r.data
    if len(out) > MAX_MESSAGE:
        raise DnsFormatError(f"message of {len(out)} bytes exceeds {MAX_MESSAGE}")
    return bytes(out)


# --- answering ---------------------------------------------------------------------------------

Lookup = Callable[[ServiceKey], "str | None"]


def _in_zone(name: str) -> bool:
    lowered = name.lower()
    return lowered == ZONE or lowered.endswith("." + ZONE)


def answer(query: Message, lookup: Lookup, ttl: int = TTL) -> Message | None:
    """The response to `query`, or None when it must not be answered (it is a response)."""
    h = query.header
    if h.qr:
        return None

    def reply(rcode: int, answers: tuple[Record, ...] = (), authoritative: bool = False) -> Message:
        header = Header(h.id, qr=True, opcode=h.opcode, aa=authoritative, rd=h.rd, rcode=rcode)
        return Message(header, query.question, answers)

    q = query.question
    if h.opcode != 0:
        return reply(NOTIMP)
    if q is None:
        return reply(FORMERR)
    if q.qclass not in (CLASS_IN, CLASS_ANY) or not _in_zone(q.name):
        return reply(REFUSED)
    try:
        key = ServiceKey.parse_fqdn(q.name)
    except MeshError:
        return reply(NXDOMAIN, authoritative=True)
    vip = lookup(key)
    if vip is None:
        return reply(NXDOMAIN, authoritative=True)
    if q.qtype not in (TYPE_A, TYPE_ANY):
        return reply(NOERROR, authoritative=True)  # NODATA: the name exists, not this type
    return reply(NOERROR, (Record.a(q.name, vip, ttl),), authoritative=True)


def respond(data: bytes, lookup: Lookup, ttl: int = TTL) -> bytes | None:
    """Bytes in, bytes out: the response datagram, or None to stay silent."""
    try:
        query = decode_message(data)
    except DnsFormatError:
        # Answer FORMERR only when the header is readable and claims to be a query, so a
        # spoofed garbage "response" can never start a ping-pong between two servers.
        if len(data) < _HEADER.size or data[2] & 0x80:
            return None
        ident, flags = struct.unpack_from("!HH", data)
        rd = bool(flags >> 8 & 1)
        return encode_message(
            Message(Header(ident, qr=True, opcode=flags >> 11 & 0xF, rd=rd, rcode=FORMERR))
        )
    response = answer(query, lookup, ttl)
    return encode_message(response) if response is not None else None


# --- UDP driver --------------------------------------------------------------------------------


class DnsServer(asyncio.DatagramProtocol):
    """Serves `respond` on one UDP socket. Start with `DnsServer.start`."""

    def __init__(self, lookup: Lookup, ttl: int = TTL) -> None:
        self._lookup = lookup
        self._ttl = ttl
        self._transport: asyncio.DatagramTransport | None = None
        self.queries = 0
        self.dropped = 0

    @classmethod
    async def start(cls, host: str, port: int, lookup: Lookup, ttl: int = TTL) -> DnsServer:
        loop = asyncio.get_running_loop()
        _, server = await loop.create_datagram_endpoint(
            lambda: cls(lookup, ttl), local_addr=(host, port)
        )
        return server

    @property
    def address(self) -> tuple[str, int]:
        assert self._transport is not None, "not started"
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.queries += 1
        try:
            out = respond(data, self._lookup, self._ttl)
        except Exception:  # a bug must cost one query, never the pod's name resolution
            self.dropped += 1
            _log.exception("dns query failed", peer=str(addr))
            return
        if out is None:
            self.dropped += 1
            return
        assert self._transport is not None
        self._transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        _log.warning("dns socket error", error=str(exc))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
