"""Atomic file replacement and advisory locking, for the small files fedgate keeps on disk.

Readers (an agent polling a CA directory or exports.json, a second CLI invocation reading the
rig's state) must never see a half-written file, so every write goes to a temporary file in
the same directory, is fsynced, then renamed over the target (rename is atomic within one
filesystem). Read-modify-write updates hold an exclusive flock on a lock file (`locked`: a
`<name>.lock` beside the file it guards), so two writers cannot lose each other's update.

It lives in `ca/` because that is the lowest layer that may do I/O (`mesh/` does none) and both
CA directories (`ca.cadir`) and the rig (`clusters/`) need it. It knows nothing about what the
files contain.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` (text is UTF-8) atomically, creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_file` (created, with its parents, if missing)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a", encoding="utf-8") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def locked(path: Path) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive advisory lock for a read-modify-write of `path` (on `<name>.lock`)."""
    return exclusive_lock(path.with_name(path.name + ".lock"))
