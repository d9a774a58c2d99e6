"""The informer's reconnection logic, driven by a scripted client call (no network, no
threads, no real waiting): relists on 410, backs off on errors, resets after success, never
applies half an event."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

from clusters.kube.informer import Informer, InformerSettings, ListWatch
from tests.clusters.kube_objects import pod

SETTINGS = InformerSettings(backoff_initial=1.0, backoff_cap=8.0, healthy_watch=3600.0)


class Response:
    """What `_preload_content=False` returns: a urllib3 response, reduced to what is used."""

    def __init__(self, status: int, body: bytes = b"", chunks: tuple[bytes, ...] = ()) -> None:
        self.status, self.data, self._chunks = status, body, chunks

    def stream(self, amt: Any = None, decode_content: bool = False) -> Iterator[bytes]:
        yield from self._chunks

    def release_conn(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def listing(rv: str, *items: dict[str, Any]) -> Response:
    body = {
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": rv},
        "items": list(items),
    }
    return Response(200, json.dumps(body).encode())


def events(*lines: dict[str, Any] | bytes) -> Response:
    chunks = tuple(x if isinstance(x, bytes) else json.dumps(x).encode() + b"\n" for x in lines)
    return Response(200, chunks=chunks)


EXPIRED = {
    "type": "ERROR",
    "object": {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "reason": "Expired",
        "code": 410,
        "message": "too old resource version: 1 (5)",
    },
}


def p(name: str, rv: str) -> dict[str, Any]:
    obj = pod(name, "sa")
    obj["metadata"].update(uid=f"uid-{name}", resourceVersion=rv)
    return obj


class Script:
    """Answers the informer's calls in order; records (call kind, resourceVersion) and delays."""

    def __init__(self, *answers: Response | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str | None]] = []
        self.delays: list[float] = []
        self.informer: Informer | None = None

    def call(self, **kw: Any) -> Response:
        self.calls.append(("watch" if kw.get("watch") else "list", kw.get("resource_version")))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def wait(self, delay: float) -> None:
        self.delays.append(delay)
        if not self.answers:
            assert self.informer is not None
            self.informer.stop()

    def run(self, notify: Callable[[], None] = lambda: None) -> Informer:
        self.informer = Informer(
            ListWatch("Pod", self.call),
            threading.Lock(),
            notify,
            SETTINGS,
            random.Random(1),
            wait=self.wait,
        )
        self.informer.run()
        return self.informer


def test_410_relists_at_once_then_backs_off_if_it_repeats() -> None:
    script = Script(
        listing("5"),
        events(EXPIRED),
        listing("9"),
        events(EXPIRED),
        listing("12"),
        events({"type": "ADDED", "object": p("a", "13")}),
    )
    inf = script.run()
    assert script.calls == [
        ("list", None),
        ("watch", "5"),
        ("list", None),
        ("watch", "9"),
        ("list", None),
        ("watch", "12"),
    ]
    assert script.delays[0] == 0.0  # the first 410: relist at once
    assert 1.0 <= script.delays[1] < 2.0  # the relist's watch expired too: back off
    assert inf.cache.lists == 3
    assert set(inf.cache.objects) == {("shop", "a")}


def test_errors_back_off_exponentially_with_jitter_and_success_resets() -> None:
    refused = ConnectionRefusedError("refused")
    script = Script(
        refused,
        refused,
        ApiException(status=503, reason="Unavailable"),
        listing("5"),
        events({"type": "ADDED", "object": p("a", "6")}),
        refused,
    )
    inf = script.run()
    first, second, third, after_success, after_error = script.delays
    assert 1.0 <= first < 2.0
    assert 2.0 <= second < 4.0
    assert 4.0 <= third < 8.0
    assert 1.0 <= after_success < 2.0  # the watch delivered: backoff reset
    assert 2.0 <= after_error < 4.0
    assert len({first / 1, second / 2, third / 4}) == 3  # jittered, not lockstep
    assert inf.errors == 4
    # After the error the watch resumes from the last version seen, without a relist.
    assert script.calls[-1] == ("watch", "6")


def test_a_cut_stream_applies_whole_lines_only_and_resumes_from_the_last() -> None:
    added = json.dumps({"type": "ADDED", "object": p("a", "6")}).encode() + b"\n"
    bookmark = {
        "type": "BOOKMARK",
        "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "8"}},
    }
    script = Script(
        listing("5"),
        # One event split over three chunks, a bookmark, then half of an event and EOF.
        events(added[:10], added[10:20], added[20:], bookmark, b'{"type":"DELETED","obj'),
        events(),
    )
    notified: list[int] = []
    inf = script.run(lambda: notified.append(1))
    assert set(inf.cache.objects) == {("shop", "a")}  # the half DELETED was not applied
    assert script.calls[-1] == ("watch", "8")  # resumed after the bookmark
    # Notified for the first list (synced) and the ADDED; the bookmark changes nothing.
    assert (inf.cache.applied, inf.cache.duplicates, len(notified)) == (1, 0, 2)
