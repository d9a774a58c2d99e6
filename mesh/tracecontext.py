"""W3C Trace Context `traceparent`: parse, validate, format, and the ids of a new span.

`version "-" trace-id "-" parent-id "-" trace-flags`, lower-case hex (W3C Trace Context
level 1, section 3.2). A value that breaks a rule is *ignored*, not refused (section 3.2.2:
"the vendor MUST ... restart the trace"): `parse` returns None and the hop starts a new trace.
Versions above 00 are accepted by their first four fields (section 3.2.4, forward
compatibility); version ff is invalid. Parsing is bounded (`MAX_LENGTH`) since every value
comes from the network.

Pure: no clock, no randomness of its own (ids come from the caller's 16 and 8 random bytes).
What this module does not do: `tracestate` (carried by nobody here), or recording spans.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LENGTH = 256  # far above the 55 characters of version 00; a longer value is ignored
_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
SAMPLED = 0x01


@dataclass(frozen=True, slots=True)
class TraceParent:
    """One span's context as it travels: its trace, its own id (the callee's parent), flags."""

    trace_id: str  # 32 lower-case hex digits, not all zero
    span_id: str  # 16 lower-case hex digits, not all zero
    flags: int = SAMPLED

    def __post_init__(self) -> None:
        if not _is_id(self.trace_id, 32, _ZERO_TRACE):
            raise ValueError(f"trace id {self.trace_id[:40]!r} is not 32 non-zero hex digits")
        if not _is_id(self.span_id, 16, _ZERO_SPAN):
            raise ValueError(f"span id {self.span_id[:40]!r} is not 16 non-zero hex digits")
        if not 0 <= self.flags <= 0xFF:
            raise ValueError(f"trace flags {self.flags} do not fit one byte")

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def format(self) -> str:
        """The version 00 header value (we always send the version we implement)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def child(self, span_id: bytes) -> TraceParent:
        """The context of a new span in the same trace, with id `span_id` (8 random bytes)."""
        return TraceParent(self.trace_id, span_hex(span_id), self.flags)


def _is_id(text: str, length: int, zero: str) -> bool:
    return len(text) == length and text != zero and _HEX.issuperset(text)


def span_hex(raw: bytes) -> str:
    """16 hex digits from 8 random bytes; an all-zero draw (invalid) becomes ...01."""
    if len(raw) != 8:
        raise ValueError(f"a span id needs 8 bytes, got {len(raw)}")
    return raw.hex() if any(raw) else "0" * 15 + "1"


def new_root(trace_id: bytes, span_id: bytes, sampled: bool = True) -> TraceParent:
    """A new trace's first span, from 16 and 8 random bytes."""
    if len(trace_id) != 16:
        raise ValueError(f"a trace id needs 16 bytes, got {len(trace_id)}")
    trace = trace_id.hex() if any(trace_id) else "0" * 31 + "1"
    return TraceParent(trace, span_hex(span_id), SAMPLED if sampled else 0)


def parse(value: str | None) -> TraceParent | None:
    """The context a `traceparent` value carries, or None if absent or invalid (ignored)."""
    if not value or len(value) > MAX_LENGTH:
        return None
    value = value.strip(" \t")
    if len(value) < 55:
        return None
    version = value[:2]
    if value[2] != "-" or not _HEX.issuperset(version) or version == "ff":
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":
        return None  # a future version may append fields, always after a dash
    trace_id, span_id, flags = value[3:35], value[36:52], value[53:55]
    if value[35] != "-" or value[52] != "-" or not _HEX.issuperset(flags) or len(flags) != 2:
        return None
    if not _is_id(trace_id, 32, _ZERO_TRACE) or not _is_id(span_id, 16, _ZERO_SPAN):
        return None
    return TraceParent(trace_id, span_id, int(flags, 16))
