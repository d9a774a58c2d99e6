"""The config stream's session logic, both halves, pure (no I/O, no clock).

xDS-style rules (as Envoy's state-of-the-world ADS, one resource type):
- The client's first request names its node and the version it already runs ("" at start).
- The server sends a response only when its snapshot's version differs from the last version
  it sent on this stream (or, before sending anything, from the version the client runs).
- The client answers every response: ACK = that response's version + nonce; NACK = the last
  version it accepted + the response's nonce + error_detail. A NACKed version is not resent;
  the next different snapshot is.
- Answers are matched to responses by nonce. An answer may arrive after a newer response was
  sent (it still tells which version the client accepted or refused); a request naming no
  unanswered nonce is stale and ignored.
- Deltas (federation.api.delta): a client whose hello sets `accept_delta` may get a response
  whose `base_version` names the version it is assumed to run (the last version sent on the
  stream, else the version it announced). A client that runs another version answers with
  `resync` instead of ACK/NACK; the server then sends the full snapshot of its current version.
- Staleness (docs/controller.md, "Stalled streams"): every response names the server's
  current version, and an idle stream whose hello set `heartbeat` gets a heartbeat naming it
  (never answered; a proxy from before heartbeats would NACK one, so it gets none). The client
  notes since when the server's current version has been neither the one it runs nor the one
  it last refused, without the client accepting any new version meanwhile (`trailing_for`: a
  stream that keeps moving under sustained churn is slow, not stalled); its driver drops a
  stream that trails too long and opens a new one whose hello sets `full`, so the server
  sends the whole snapshot whatever it thinks the client runs. A refused version never counts
  as trailing: a proxy that NACKs keeps its last good config without reconnecting in a loop.

The drivers are `federation.api.client.ConfigClient` and `federation.server`; this module only
decides what to send and what a message means, so both halves are tested back to back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from federation.api.config_pb2 import ConfigRequest, ConfigResponse, Node
from federation.api.delta import DeltaBaseError, apply_delta
from mesh.codec import decode, snapshot_from_json
from mesh.errors import CodecError
from mesh.model import Snapshot

MAX_UNANSWERED = 16  # responses remembered per stream while awaiting their ACK/NACK
Validator = Callable[[Snapshot], None]  # raises ValueError to NACK a decodable snapshot


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Who is asking for config: `id` unique per proxy, its `cluster`, and `kind`."""

    id: str
    cluster: str
    kind: str = "sidecar"

    def to_proto(self) -> Node:
        return Node(id=self.id, cluster=self.cluster, kind=self.kind)

    @classmethod
    def from_proto(cls, node: Node) -> NodeInfo:
        return cls(id=node.id, cluster=node.cluster, kind=node.kind)


# --- client half ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    snapshot: Snapshot
    ack: ConfigRequest


@dataclass(frozen=True, slots=True)
class Rejected:
    error: str
    nack: ConfigRequest


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The server is alive and runs `current`: nothing to answer."""

    current: str


@dataclass(frozen=True, slots=True)
class ResyncNeeded:
    """A delta against a version we do not run: ask for the full snapshot."""

    base: str
    request: ConfigRequest


class ClientSession:
    """Decodes responses, keeps the last good snapshot, and says what to answer."""

    def __init__(
        self, node: NodeInfo, validate: Validator | None = None, *, accept_delta: bool = True
    ) -> None:
        self._node = node
        self._validate = validate
        self._accept_delta = accept_delta
        self.latest: Snapshot | None = None
        self.rejected = ""  # the last version refused (NACKed) since the last one accepted
        self.deltas = 0  # metric: snapshots received as deltas
        self._trailing_since: float | None = None
        # The server on this stream names its current version (and so sends heartbeats): a
        # controller from before issue 15 does neither, and its silence means nothing.
        self.server_reports = False

    @property
    def version(self) -> str:
        return self.latest.version if self.latest is not None else ""

    def hello(self, *, full: bool = False) -> ConfigRequest:
        """The first request of a stream: resending our version spares an unchanged server;
        `full` asks for the whole snapshot anyway (after a stalled stream)."""
        self._trailing_since = None  # a new stream: whatever the last one said is moot
        self.server_reports = False
        return ConfigRequest(
            node=self._node.to_proto(),
            version_info=self.version,
            accept_delta=self._accept_delta,
            full=full,
            heartbeat=True,
        )

    def observe(self, current: str, now: float) -> None:
        """The server says its current version is `current` (every response does)."""
        self.server_reports = self.server_reports or bool(current)
        if not current or current in (self.version, self.rejected):
            self._trailing_since = None
        elif self._trailing_since is None:
            self._trailing_since = now

    def trailing_for(self, now: float) -> float:
        """Seconds since the server's current version was first not ours (0: up to date)."""
        return 0.0 if self._trailing_since is None else max(0.0, now - self._trailing_since)

    def receive(self, response: ConfigResponse) -> Accepted | Rejected | ResyncNeeded | Heartbeat:
        if response.heartbeat:
            return Heartbeat(response.current_version)
        try:
            snapshot: Snapshot
            if response.base_version:
                if self.latest is None or self.latest.version != response.base_version:
                    raise DeltaBaseError(response.base_version)
                snapshot = apply_delta(self.latest, response.snapshot)
                self.deltas += 1
            else:
                snapshot = decode(response.snapshot, snapshot_from_json, "snapshot")
            if snapshot.version != response.version_info:
                raise CodecError(
                    f"snapshot version {snapshot.version!r} is not the response's "
                    f"version_info {response.version_info!r}"
                )
            if self._validate is not None:
                self._validate(snapshot)
        except DeltaBaseError:
            resync = ConfigRequest(
                node=self._node.to_proto(),
                version_info=self.version,
                response_nonce=response.nonce,
                resync=True,
            )
            return ResyncNeeded(response.base_version, resync)
        except (CodecError, ValueError) as e:
            nack = ConfigRequest(
                node=self._node.to_proto(),
                version_info=self.version,
                response_nonce=response.nonce,
                error_detail=str(e) or type(e).__name__,
            )
            self.rejected = response.version_info
            return Rejected(nack.error_detail, nack)
        if self.latest is None or snapshot.version != self.latest.version:
            self._trailing_since = None  # progress: a stream that moves is not stalled
        self.latest = snapshot
        self.rejected = ""
        ack = ConfigRequest(
            node=self._node.to_proto(),
            version_info=response.version_info,
            response_nonce=response.nonce,
        )
        return Accepted(snapshot, ack)


# --- server half ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    version: str


@dataclass(frozen=True, slots=True)
class Nack:
    rejected: str  # the version the client refused
    kept: str  # the version it keeps running
    error: str


@dataclass(frozen=True, slots=True)
class Stale:
    nonce: str


@dataclass(frozen=True, slots=True)
class Resync:
    """The client could not apply a delta: offer it the current snapshot again, in full."""

    kept: str


Payload = bytes | Callable[[], bytes]  # a full snapshot, possibly encoded only when needed
DeltaSource = Callable[[str], "bytes | None"]  # base version -> delta payload, None if unknown


class ServerSession:
    """One stream, server side: which snapshot to send and what each request means."""

    def __init__(self, hello: ConfigRequest) -> None:
        self.node = NodeInfo.from_proto(hello.node)
        self.client_version = hello.version_info  # what the client runs, as far as we know
        self.accepts_delta = hello.accept_delta
        self.deltas = 0  # metric: responses sent as deltas
        self._full = hello.full  # the client asked for the whole snapshot, whatever it runs
        self.heartbeats = hello.heartbeat  # it understands heartbeats (older proxies NACK them)
        self._sent_version: str | None = None
        self._count = 0
        # Responses not answered yet, oldest first. A newer snapshot may go out before the
        # answer to the previous one arrives; that answer is still an ACK/NACK of its version.
        self._unanswered: dict[str, str] = {}

    def offer(
        self, version: str, payload: Payload, delta: DeltaSource | None = None
    ) -> ConfigResponse | None:
        """The response carrying snapshot `version`, or None if nothing is new.

        With `delta` and a client that accepts deltas, the response is a delta against the
        version the client is assumed to run, when `delta` can produce one.
        """
        known = self._sent_version if self._sent_version is not None else self.client_version
        if self._full:  # a client recovering from a stalled stream: no delta, no shortcut
            known, self._full = "", False
        if version == known:
            return None
        self._count += 1
        nonce = str(self._count)
        self._sent_version = version
        self._unanswered[nonce] = version
        if len(self._unanswered) > MAX_UNANSWERED:  # a client that never answers: forget oldest
            del self._unanswered[next(iter(self._unanswered))]
        if self.accepts_delta and delta is not None and known:
            body = delta(known)
            if body is not None:
                self.deltas += 1
                return ConfigResponse(
                    version_info=version, nonce=nonce, snapshot=body, base_version=known
                )
        full = payload if isinstance(payload, bytes) else payload()
        return ConfigResponse(version_info=version, nonce=nonce, snapshot=full)

    def heartbeat(self, current: str) -> ConfigResponse:
        """Tells an idle stream's client the current version; it is never answered."""
        return ConfigResponse(heartbeat=True, current_version=current)

    def receive(self, request: ConfigRequest) -> Ack | Nack | Stale | Resync:
        version = self._unanswered.get(request.response_nonce)
        if version is None:
            return Stale(request.response_nonce)
        if request.resync:
            # The client runs `version_info`, not the delta's base: what is in flight is moot.
            # The next offer is against what it runs (a delta if we still have that version,
            # else the full snapshot).
            self._unanswered.clear()
            self.client_version = request.version_info
            self._sent_version = None
            return Resync(request.version_info)
        # The client answers in order: this answer settles every older response too.
        for nonce in list(self._unanswered):
            del self._unanswered[nonce]
            if nonce == request.response_nonce:
                break
        self.client_version = request.version_info
        if request.error_detail:
            return Nack(rejected=version, kept=request.version_info, error=request.error_detail)
        return Ack(request.version_info)
