"""The HTTP side of the faithful fake Kubernetes API server: the real list/watch wire protocol.

What a client sees is what kube-apiserver sends (see docs/kubernetes.md and the fixtures):

* LIST `GET <prefix>[/namespaces/<ns>]/<plural>` answers `{kind: <Kind>List, apiVersion,
  metadata: {resourceVersion}, items}`; built-in items carry no kind/apiVersion, custom ones do.
* WATCH (`?watch=1`) answers 200 with a chunked stream of newline-delimited JSON events
  `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`. Without resourceVersion (or
  with "0") it starts with a synthetic ADDED per existing object; from a version N it replays
  the history after N; from a version older than the retained history it sends one ERROR event
  carrying a 410 `Expired` Status and ends the stream, as the watch cache does. With
  `allowWatchBookmarks=true` it sends BOOKMARK events (an object of the watched kind holding only
  `metadata.resourceVersion`) every `bookmark_interval` and on `bookmark_now()`.
  `timeoutSeconds` ends the stream cleanly. Lists and watches take `labelSelector` and
  `fieldSelector` (`metadata.name`, `metadata.namespace`).
* Cluster-scoped resources (namespaces, mutatingwebhookconfigurations) live under
  `<prefix>/<plural>[/<name>]`; `/api/v1/namespaces/<name>` is the Namespace itself.
* GET, POST, PUT, DELETE of single objects; PATCH with `application/apply-patch+yaml`
  (server-side apply, `fieldManager` required, `force`) on objects and their `/status`;
  POST tokenreviews answered from a token table; POST selfsubjectaccessreviews (allowed unless
  `deny()`ed) and GET customresourcedefinitions (the served custom resources' CRDs, less those
  `remove_crd()` took away, whose resources then 404), both in access.py; `/version`.
* Errors are `Status` objects with the real reasons (NotFound, AlreadyExists, Conflict,
  Unauthorized, BadRequest, UnsupportedMediaType).

Test hooks (`FakeKubeAPI`): `drop_watches()` closes every open watch mid-stream, without the
terminating chunk (optionally after half an event line); `compact()` forgets history;
`stop()`/`start()`/`restart()` take the listener and every connection down and bring it back on
the same port with the store intact (etcd survives an apiserver restart); `requests` records
every request line for assertions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import yaml

from tests.kubefake import access, selectors
from tests.kubefake import resources as r
from tests.kubefake.apply import ApplyConflictError
from tests.kubefake.resources import Obj, Resource
from tests.kubefake.store import Store, StoreError

if TYPE_CHECKING:
    from tests.kubefake.fake import FakeKubeAPI

APPLY_PATCH = "application/apply-patch+yaml"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, api: FakeKubeAPI, addr: tuple[str, int]) -> None:
        self.api = api
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up (or a test hook killing the connection) is not a server error.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def kill_connections(self) -> None:
        with self.lock:
            conns = list(self.connections)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


# What kube-apiserver's /version answers (every field of version.Info).
VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-kubefake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T07:28:49Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


class _DroppedError(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests assert on `requests`, not on stderr

    # --- plumbing -----------------------------------------------------------------------

    def _send_json(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, body: Obj) -> None:
        self._send_json(body["code"], body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        tokens = self.server.api.bearer_tokens
        if tokens is None:
            return True
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:] in tokens:
            return True
        self._error(r.status(401, "Unauthorized", "Unauthorized"))
        return False

    def _route(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        api = self.server.api
        with api.lock:
            api.requests.append(Request(method, url.path, query))
        if not self._authorized():
            return
        try:
            self._dispatch(method, url.path, query)
        except StoreError as e:
            self._error(e.body)
        except ApplyConflictError as e:
            self._error(r.status(409, "Conflict", str(e)))
        except ValueError as e:
            self._error(r.status(400, "BadRequest", str(e)))

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    # --- routing ------------------------------------------------------------------------

    def _dispatch(self, method: str, path: str, query: dict[str, str]) -> None:
        if path in ("/version", "/version/") and method == "GET":  # the client asks with a /
            self._send_json(200, VERSION)
            return
        if path == r.TOKENREVIEW_PATH and method == "POST":
            self._send_json(201, self.server.api.review(json.loads(self._body())))
            return
        if self._access(method, path):
            return
        parts = path.strip("/").split("/")
        # /api/v1/... or /apis/<group>/<version>/...
        n = 2 if parts[:1] == ["api"] else 3
        prefix, rest = "/" + "/".join(parts[:n]), parts[n:]
        namespace = None
        if len(rest) >= 2 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
            if prefix == r.NAMESPACES.prefix and rest in ([], ["status"]):
                # /api/v1/namespaces/<name>[/status]: the Namespace itself, not a scope
                rest, namespace = ["namespaces", namespace, *rest], None
        res = r.by_path(prefix, rest[0]) if rest else None
        if res is not None and not res.namespaced and namespace is not None:
            res = None  # a cluster-scoped resource has no namespaced path
        if res is not None and not res.builtin and access.crd_name(res) not in self._installed():
            res = None  # its CRD is not installed
        if res is None or len(rest) > 3 or (len(rest) == 3 and rest[2] != "status"):
            self._error(
                r.status(404, "NotFound", "the server could not find the requested resource")
            )
            return
        store = self.server.api.store
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        if name is None:
            if method == "GET" and query.get("watch") in ("1", "true"):
                self._watch(res, namespace, query)
            elif method == "GET":
                items, rv = store.list(
                    res,
                    namespace,
                    selectors.parse(query.get("labelSelector")),
                    selectors.parse_fields(query.get("fieldSelector")),
                )
                if res.builtin:
                    items = [
                        {k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                        for o in items
                    ]
                self._send_json(
                    200,
                    {
                        "kind": f"{res.kind}List",
                        "apiVersion": res.api_version,
                        "metadata": {"resourceVersion": str(rv)},
                        "items": items,
                    },
                )
            elif method == "POST" and (namespace is not None or not res.namespaced):
                self._send_json(201, store.create(res, json.loads(self._body()), namespace))
            else:
                self._error(r.status(405, "MethodNotAllowed", f"{method} is not supported here"))
            return
        ns = namespace or ""
        if method == "GET":
            self._send_json(200, store.get(res, ns, name))
        elif method == "PUT":
            obj = json.loads(self._body())
            obj.setdefault("metadata", {}).update(name=name, namespace=ns)
            self._send_json(200, store.update(res, obj, subresource=sub))
        elif method == "DELETE":
            self._send_json(200, store.delete(res, ns, name))
        elif method == "PATCH":
            self._patch(res, ns, name, sub, query)
        else:
            self._error(r.status(405, "MethodNotAllowed", f"{method} is not supported here"))

    def _access(self, method: str, path: str) -> bool:
        """SelfSubjectAccessReview and the CRDs (access.py); False for any other path."""
        api = self.server.api
        if path == access.SSAR_PATH and method == "POST":
            with api.lock:
                denied = set(api.denied)
            self._send_json(201, access.review(json.loads(self._body()), denied))
            return True
        crds = access.CRD_PREFIX + "/" + access.CRD_PLURAL
        if method != "GET" or not (path == crds or path.startswith(crds + "/")):
            return False
        installed = self._installed()
        name = path[len(crds) + 1 :]
        if not name:
            self._send_json(200, access.crd_list(installed, api.store.rv))
        elif name in installed:
            obj = access.crd(access.CUSTOM[name])
            kind = {"kind": "CustomResourceDefinition", "apiVersion": "apiextensions.k8s.io/v1"}
            self._send_json(200, {**kind, **obj})
        else:
            message = f'{access.CRD_PLURAL}.apiextensions.k8s.io "{name}" not found'
            details = {"name": name, "group": "apiextensions.k8s.io", "kind": access.CRD_PLURAL}
            self._error(r.status(404, "NotFound", message, details))
        return True

    def _installed(self) -> set[str]:
        api = self.server.api
        with api.lock:
            return set(api.crds)

    def _patch(self, res: Resource, ns: str, name: str, sub: str, query: dict[str, str]) -> None:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        body = self._body()
        if ctype != APPLY_PATCH:
            self._error(
                r.status(
                    415,
                    "UnsupportedMediaType",
                    f"the fake serves only {APPLY_PATCH} patches, not {ctype!r}",
                )
            )
            return
        manager = query.get("fieldManager")
        if not manager:
            raise ValueError(
                'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required '
                "value: is required for apply patch"
            )
        config = yaml.safe_load(body)
        if not isinstance(config, dict):
            raise ValueError("apply patch body is not an object")
        meta = config.get("metadata") or {}
        if meta.get("name") not in (None, name):
            raise ValueError(f"metadata.name {meta.get('name')!r} does not match the URL {name!r}")
        force = query.get("force") in ("true", "1")
        obj, created = self.server.api.store.apply(
            res, ns, name, config, manager, subresource=sub, force=force
        )
        self._send_json(201 if created else 200, obj)

    # --- watch --------------------------------------------------------------------------

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _event(self, type_: str, obj: Obj) -> None:
        line = json.dumps({"type": type_, "object": obj}).encode() + b"\n"
        if self.server.api.split_events:  # as a proxy may re-chunk: lines span chunks
            half = len(line) // 2
            self._chunk(line[:half])
            self._chunk(line[half:])
        else:
            self._chunk(line)

    def _watch(self, res: Resource, namespace: str | None, query: dict[str, str]) -> None:
        api, store = self.server.api, self.server.api.store
        selector = selectors.parse(query.get("labelSelector"))
        fields = selectors.parse_fields(query.get("fieldSelector"))
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        since = query.get("resourceVersion") or "0"
        initial: list[tuple[str, Obj]] = []
        with store.cond:
            drops, marks, epoch = store.drops, store.bookmarks, api.epoch
            if since == "0":
                items, cursor = store.list(res, namespace, selector, fields)
                initial = [("ADDED", o) for o in items]
            else:
                cursor = int(since)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for type_, obj in initial:
                self._event(type_, obj)
            next_mark = time.monotonic() + api.bookmark_interval
            while True:
                with store.cond:
                    wake = min(deadline, next_mark)
                    store.cond.wait_for(
                        functools.partial(_woken, store, api, (cursor, drops, marks, epoch, wake)),
                        timeout=max(0.0, wake - time.monotonic()),
                    )
                    if store.drops != drops or api.epoch != epoch:
                        raise _DroppedError(store.drop_partial)
                    try:
                        events = store.events_after(cursor, res, namespace, selector, fields)
                    except StoreError as e:
                        self._event("ERROR", e.body)
                        break
                    cursor = store.rv
                    mark = bookmarks and (store.bookmarks != marks or time.monotonic() >= next_mark)
                    marks = store.bookmarks
                for type_, obj in events:
                    self._event(type_, obj)
                if mark:
                    next_mark = time.monotonic() + api.bookmark_interval
                    meta = {"resourceVersion": str(cursor)}
                    self._event(
                        "BOOKMARK",
                        {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta},
                    )
                if time.monotonic() >= deadline:
                    break
            self.wfile.write(b"0\r\n\r\n")
        except _DroppedError as e:
            if e.args[0]:
                self._chunk(b'{"type":"MODIFIED","object":{"kind":')
            self.close_connection = True
            with contextlib.suppress(OSError):  # the peer may be gone already
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            self.close_connection = True


def _woken(store: Store, api: FakeKubeAPI, state: tuple[int, int, int, int, float]) -> bool:
    cursor, drops, marks, epoch, wake = state
    return (
        store.rv > cursor
        or store.drops != drops
        or store.bookmarks != marks
        or api.epoch != epoch
        or time.monotonic() >= wake
    )
