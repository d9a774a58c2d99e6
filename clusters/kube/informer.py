"""The informer driver: one thread per watched resource, list then watch, into an ObjectCache.

Threading model. The `kubernetes` client is synchronous (urllib3), and a watch is a response
that stays open for minutes, so each watched resource gets one daemon thread that lists, then
watches, and applies what it reads to its `ObjectCache` under a lock shared by all the
informers of a source. The asyncio side is told only that something changed (`notify`, which
the source turns into `loop.call_soon_threadsafe(event.set)`), and reads the caches itself when
it publishes. So nothing queues between the threads and the loop: a burst of events coalesces
into one wake-up, memory is bounded by the caches, and the event loop never blocks on the
network. Four resources make four threads, which is cheap; `asyncio.to_thread` would tie up
the default executor with never-ending calls instead.

The calls are the client's generated list functions with `_preload_content=False`, and the
watch stream is read line by line here, rather than through `kubernetes.watch.Watch`, because
`Watch.stream` hides the response (so a blocked read could not be interrupted at shutdown; here
`stop()` shuts the socket down), deserialises every object into a model we would turn back into
JSON, silently retries once from a stale version after a 410, and in client 37 raises KeyError
on an ERROR event when `deserialize=False`.

Informer semantics (client-go's reflector): LIST, then WATCH from the list's resourceVersion
with `allowWatchBookmarks=true` and a server-side `timeoutSeconds` drawn from [t, 2t) so that
watches do not all expire together; the read timeout is that plus a margin, so a dead peer is
noticed. Every event and bookmark advances the resume version. A clean close (timeout, server
going away) resumes the watch from that version; `410 Gone`/`Expired` (as an ERROR event or an
HTTP status) relists at once; any other error retries after a jittered exponential backoff,
reset by a successful list or a watch that delivered something. A half-received event line at
a dropped connection is discarded, never applied.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from clusters.kube.cache import Backoff, ObjectCache

_log = logging.getLogger("fedgate.clusters.kube")

GONE = 410


class KubeApiError(Exception):
    """A non-success answer from the API server (HTTP status or watch ERROR event)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code


@dataclass(frozen=True, slots=True)
class InformerSettings:
    watch_timeout: float = 300.0  # server-side timeoutSeconds of a watch, jittered up to 2x
    read_margin: float = 30.0  # the client read timeout is the watch timeout plus this
    connect_timeout: float = 5.0
    backoff_initial: float = 0.2
    backoff_cap: float = 30.0
    # A watch that lasted this long was healthy even if it delivered nothing: its clean end
    # (timeoutSeconds on a quiet resource) resets the backoff instead of growing it.
    healthy_watch: float = 10.0


@dataclass(frozen=True, slots=True)
class ListWatch:
    """How to list and watch one resource: a generated `list_*` function of the client."""

    kind: str
    call: Callable[..., Any]
    label_selector: str | None = None
    field_selector: str | None = None  # e.g. metadata.name=<name>: one name in every namespace


def _api_error(code: int, body: str | bytes | dict[str, Any]) -> KubeApiError:
    status: Any = body
    if isinstance(body, str | bytes):
        try:
            status = json.loads(body)
        except ValueError:
            status = {"message": str(body[:200])}
    if not isinstance(status, dict):
        status = {}
    return KubeApiError(
        int(status.get("code") or code), str(status.get("reason") or ""), str(status.get("message"))
    )


def _lines(resp: Any) -> Iterator[bytes]:
    """Complete lines of a streamed response; a trailing partial line is dropped.

    Chunk boundaries need not fall on line ends (a proxy may re-chunk), and a large object may
    span many chunks: pieces are joined only once its line is complete.
    """
    pending: list[bytes] = []
    for chunk in resp.stream(amt=None, decode_content=False):
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        *lines, rest = b"".join((*pending, chunk)).split(b"\n")
        pending = [rest]
        yield from (line for line in lines if line.strip())


class Informer:
    def __init__(
        self,
        lw: ListWatch,
        lock: threading.Lock,
        notify: Callable[[], None],
        settings: InformerSettings,
        rng: random.Random | None = None,
        *,
        wait: Callable[[float], object] | None = None,
    ) -> None:
        self.lw = lw
        self.cache = ObjectCache(lw.kind)
        self.watches = 0
        self.errors = 0
        self._lock = lock
        self._notify = notify
        self._settings = settings
        self._rng = rng or random.Random()
        self._stopping = threading.Event()
        # How the thread waits out a delay; tests pass a fake that records it.
        self._wait: Callable[[float], object] = wait or self._stopping.wait
        self._resp: Any = None
        self._thread = threading.Thread(target=self._run, name=f"informer:{lw.kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, interrupting a blocked read by shutting its socket down."""
        self._stopping.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception as e:  # already closed: nothing to interrupt
                _log.debug("%s: shutting the watch down: %r", self.lw.kind, e)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, object]:
        c = self.cache
        return {
            "kind": c.kind,
            "synced": c.synced,
            "objects": len(c.objects),
            "resourceVersion": c.resource_version,
            "lists": c.lists,
            "watches": self.watches,
            "applied": c.applied,
            "duplicates": c.duplicates,
            "errors": self.errors,
        }

    def run(self) -> None:
        """The thread's body (tests call it directly with a scripted `call`)."""
        self._run()

    def _run(self) -> None:
        s = self._settings
        backoff = Backoff(s.backoff_initial, s.backoff_cap, rng=self._rng)
        relist, gone_again = True, False
        while not self._stopping.is_set():
            try:
                if relist:
                    self._list()
                    relist = False
                    backoff.reset()
                if self._watch():
                    backoff.reset()
                    gone_again = False
                delay = backoff.next()
                _log.debug(
                    "%s: watch closed, resuming at %s", self.lw.kind, self.cache.resource_version
                )
            except KubeApiError as e:
                if e.code == GONE:
                    _log.info("%s: %s; relisting", self.lw.kind, e)
                    # Relist at once, unless the last relist's watch expired too (no hot loop).
                    relist, delay = True, backoff.next() if gone_again else 0.0
                    gone_again = True
                else:
                    delay = self._failed(e, backoff)
            except Exception as e:  # network and protocol errors: retried, never fatal
                delay = self._failed(e, backoff)
            self._wait(delay)

    def _failed(self, e: Exception, backoff: Backoff) -> float:
        if self._stopping.is_set():
            return 0.0
        self.errors += 1
        delay = backoff.next()
        _log.warning("%s: list/watch failed, retrying in %.2f s: %r", self.lw.kind, delay, e)
        return delay

    def _kwargs(self, timeout: float) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "_preload_content": False,
            "_request_timeout": (self._settings.connect_timeout, timeout),
        }
        if self.lw.label_selector:
            kw["label_selector"] = self.lw.label_selector
        if self.lw.field_selector:
            kw["field_selector"] = self.lw.field_selector
        return kw

    def _call(self, **kwargs: Any) -> Any:
        try:
            return self.lw.call(**kwargs)
        except ApiException as e:  # the client raises for some statuses even when streaming
            raise _api_error(int(e.status or 500), e.body or b"") from e

    def _list(self) -> None:
        resp = self._call(**self._kwargs(self._settings.watch_timeout))
        try:
            data = resp.data
        finally:
            resp.release_conn()
        if resp.status != 200:
            raise _api_error(resp.status, data)
        body = json.loads(data)
        with self._lock:
            first = not self.cache.synced
            changes = self.cache.replace(
                body.get("items") or [], body["metadata"]["resourceVersion"]
            )
        _log.info(
            "%s: listed %d objects (%d changes)",
            self.lw.kind,
            len(body.get("items") or []),
            changes,
        )
        if changes or first:
            self._notify()

    def _watch(self) -> bool:
        """Watch until the stream ends; True if it delivered anything or lasted long enough."""
        started = time.monotonic()
        timeout = int(self._settings.watch_timeout * (1.0 + self._rng.random())) or 1
        resp = self._call(
            watch=True,
            resource_version=self.cache.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            **self._kwargs(timeout + self._settings.read_margin),
        )
        self._resp = resp
        self.watches += 1
        delivered = False
        try:
            if self._stopping.is_set():
                return False
            if resp.status != 200:
                raise _api_error(resp.status, resp.data)
            for line in _lines(resp):
                event = json.loads(line)
                type_, obj = event.get("type"), event.get("object") or {}
                if type_ == "ERROR":
                    raise _api_error(int(obj.get("code") or 500), obj)
                with self._lock:
                    changed = self.cache.apply(str(type_), obj)
                delivered = True
                if changed:
                    self._notify()
            return delivered or time.monotonic() - started >= self._settings.healthy_watch
        finally:
            self._resp = None
            resp.release_conn()
