"""Incremental, bounded reading of the FGH1 frames that open a tunnel stream (pure, no I/O).

The opener sends a `StreamHeader` frame, the other side answers with a `StreamReply` frame, and
everything after is opaque payload. `FrameReader` accumulates bytes until one frame is complete
and returns it with the bytes that followed. It never holds more than one frame plus the chunk
that completed it: `mesh.codec.split_frame` refuses an announced length above `MAX_HEADER`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.codec import (
    Json,
    StreamHeader,
    StreamReply,
    header_from_json,
    reply_from_json,
    split_frame,
)
from mesh.errors import CodecError


class FrameReader:
    """Feed bytes; get `(frame, rest)` once a whole frame is in, None until then.

    Raises `CodecError` on a bad magic, an oversized frame or a frame that is not JSON. After a
    frame (or an error) the reader is spent: feeding it again is a bug.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._done = False

    def feed(self, data: bytes) -> tuple[Json, bytes] | None:
        if self._done:
            raise RuntimeError("FrameReader already returned its frame")
        self._buf += data
        try:
            result = split_frame(self._buf)
        except CodecError:
            self._done = True
            raise
        if result is not None:
            self._done = True
            self._buf = b""
        return result


def read_header(reader: FrameReader, data: bytes) -> tuple[StreamHeader, bytes] | None:
    """One step of reading a stream header; CodecError if it is malformed."""
    got = reader.feed(data)
    if got is None:
        return None
    obj, rest = got
    return header_from_json(obj), rest


def read_reply(reader: FrameReader, data: bytes) -> tuple[StreamReply, bytes] | None:
    """One step of reading a stream reply; CodecError if it is malformed."""
    got = reader.feed(data)
    if got is None:
        return None
    obj, rest = got
    try:
        return reply_from_json(obj), rest
    except (TypeError, ValueError) as e:
        raise CodecError(f"stream reply: {e}") from e


@dataclass(frozen=True, slots=True)
class HeaderAccepted:
    header: StreamHeader
    rest: bytes


@dataclass(frozen=True, slots=True)
class HeaderRefused:
    status: int
    reason: str


class HeaderGate:
    """The server side's first step on a new stream: bytes in, a decision out, never raises.

    `feed` returns None until the header is complete, then `HeaderAccepted` (with the payload
    bytes that followed it) or `HeaderRefused` (400 with the reason) for anything malformed.
    """

    def __init__(self) -> None:
        self._reader = FrameReader()

    def feed(self, data: bytes) -> HeaderAccepted | HeaderRefused | None:
        try:
            got = read_header(self._reader, data)
        except CodecError as e:
            return HeaderRefused(400, f"malformed stream header: {e}")
        if got is None:
            return None
        return HeaderAccepted(*got)

    def eof(self) -> HeaderRefused:
        return HeaderRefused(400, "stream ended before its header")
