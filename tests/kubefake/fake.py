"""`FakeKubeAPI`: the faithful fake API server (server.py) with its test hooks and TokenReview.

Start it in-process (`with FakeKubeAPI() as api:`), point a kubeconfig's `server` at `api.url`,
and drive it with the unmodified `kubernetes` client. Objects are written either over HTTP or
directly through `api.store` (which emits the same watch events). TokenReview answers from the
`token_reviews` table, then from `token_lookup` (e.g. the rig's growing tokens.json).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.kubefake.access import CUSTOM, Rule
from tests.kubefake.resources import Obj
from tests.kubefake.server import Request, _Server
from tests.kubefake.store import Store


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """What a TokenReview of a token answers: the user and the audiences the token is for."""

    username: str  # e.g. system:serviceaccount:<ns>:<sa>
    audiences: tuple[str, ...] = ("https://kubernetes.default.svc",)
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)


class FakeKubeAPI:
    """The fake API server and its test hooks; `url` is what a kubeconfig's `server` names."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        store: Store | None = None,
        bookmark_interval: float = 60.0,
        bearer_tokens: set[str] | None = None,
        token_reviews: dict[str, TokenIdentity] | None = None,
        token_lookup: Callable[[str], TokenIdentity | None] | None = None,
        split_events: bool = False,
    ) -> None:
        self.store = store or Store()
        self.bookmark_interval = bookmark_interval
        self.split_events = split_events  # write each watch event as two chunks
        self.bearer_tokens = bearer_tokens
        self.token_reviews = dict(token_reviews or {})
        # Asked about tokens the table lacks (e.g. a rig whose tokens file grows as pods start).
        self.token_lookup = token_lookup
        self.denied: set[Rule] = set()  # SelfSubjectAccessReview answers allowed: false
        self.crds: set[str] = set(CUSTOM)  # installed CRDs (by name), all to begin with
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.epoch = 0  # bumped on stop(): open watches end
        self._host, self._port = host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    def start(self) -> None:
        self._server = _Server(self, (self._host, self._port))
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"kubefake:{self._port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every connection (open watches end abruptly)."""
        if self._server is None:
            return
        with self.store.cond:
            self.epoch += 1
            self.store.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._server.kill_connections()
        assert self._thread is not None
        self._thread.join(5)
        self._server = self._thread = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> FakeKubeAPI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # hooks (thin aliases, so tests read as what they simulate)
    def drop_watches(self, *, partial: bool = False) -> None:
        self.store.drop_watches(partial=partial)

    def compact(self) -> None:
        self.store.compact()

    def bookmark_now(self) -> None:
        self.store.bookmark_now()

    def deny(self, verb: str, resource: str, group: str = "", subresource: str = "") -> None:
        """Make SelfSubjectAccessReviews of this permission answer `allowed: false` (verb "*":
        every verb)."""
        with self.lock:
            self.denied.add((verb, group, resource, subresource))

    def remove_crd(self, name: str) -> None:
        """Uninstall a CRD (e.g. "serviceimports.multicluster.x-k8s.io"): unlisted, its
        resources 404."""
        with self.lock:
            self.crds.discard(name)

    def watch_requests(self, plural: str) -> list[Request]:
        with self.lock:
            return [
                q
                for q in self.requests
                if q.path.endswith("/" + plural) and q.query.get("watch") in ("1", "true")
            ]

    def list_requests(self, plural: str) -> list[Request]:
        with self.lock:
            return [
                q
                for q in self.requests
                if q.path.endswith("/" + plural) and q.query.get("watch") is None
            ]

    def review(self, review: Obj) -> Obj:
        """Answer a TokenReview as kube-apiserver does for a ServiceAccount token."""
        spec = review.get("spec") or {}
        token, wanted = spec.get("token", ""), list(spec.get("audiences") or [])
        ident = self.token_reviews.get(token)
        if ident is None and self.token_lookup is not None:
            ident = self.token_lookup(token)
        out: Obj = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
        }
        if ident is None:
            out["status"] = {
                "user": {},
                "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]",
            }
            return out
        granted = [a for a in ident.audiences if not wanted or a in wanted]
        if not granted:
            out["status"] = {
                "user": {},
                "error": "[invalid bearer token, token audiences "
                f"{list(ident.audiences)!r} is invalid for the target audiences "
                f"{wanted!r}]",
            }
            return out
        user: Obj = {
            "username": ident.username,
            "uid": ident.uid or f"uid-{ident.username}",
            "groups": list(ident.groups) or _groups(ident.username),
        }
        if ident.extra:
            user["extra"] = ident.extra
        out["status"] = {"authenticated": True, "user": user, "audiences": granted}
        return out


def _groups(username: str) -> list[str]:
    parts = username.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        return [
            "system:serviceaccounts",
            f"system:serviceaccounts:{parts[2]}",
            "system:authenticated",
        ]
    return ["system:authenticated"]
