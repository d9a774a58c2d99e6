"""Run the fake API server standalone (for a rig): `python -m tests.kubefake --port 6443`.

`--fixtures DIR` preloads every `*.json` object in DIR (objects, or `<Kind>List`s); `--tokens
FILE` is a JSON `{"<token>": {"username": ..., "audiences": [...]}}` for TokenReview. It prints
the URL, then serves until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import threading
from pathlib import Path

from tests.kubefake.fake import FakeKubeAPI, TokenIdentity
from tests.kubefake.resources import RESOURCES


def preload(api: FakeKubeAPI, directory: Path) -> int:
    count = 0
    for path in sorted(directory.glob("*.json")):
        doc = json.loads(path.read_text())
        for obj in doc.get("items", [doc]) if isinstance(doc, dict) else []:
            kind = obj.get("kind") or doc.get("kind", "").removesuffix("List")
            res = next((r for r in RESOURCES if r.kind == kind), None)
            if res is not None and "metadata" in obj:
                api.store.create(res, obj)
                count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.kubefake", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fixtures", type=Path)
    parser.add_argument("--tokens", type=Path)
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    args = parser.parse_args(argv)
    reviews = {}
    if args.tokens:
        for token, v in json.loads(args.tokens.read_text()).items():
            reviews[token] = TokenIdentity(v["username"], tuple(v.get("audiences", ["fedgate"])))
    api = FakeKubeAPI(
        args.host, args.port, bookmark_interval=args.bookmark_interval, token_reviews=reviews
    )
    if args.fixtures:
        preload(api, args.fixtures)
    api.start()
    print(api.url, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with contextlib.suppress(KeyboardInterrupt):
        done.wait()
    api.stop()


if __name__ == "__main__":
    main()
