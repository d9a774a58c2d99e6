"""Following a git branch with the git CLI, in a private bare clone, with bounded timeouts.

The sync never touches the operator's checkout: it keeps its own bare repository (`workdir`)
and fetches the branch into `refs/fedgate/remote` with a forced refspec, so a force push
(history rewritten) is fetched like any other move of the branch. Commits the sync applied are
pinned under `refs/fedgate/applied` and automatic gc is off, so the applied commit stays
readable even after the remote dropped it. Files are read straight from a commit's tree
(`ls-tree` + `cat-file --batch`): there is no worktree that could hold stale or untracked files.

Every command runs in its own process group with a timeout; on expiry the whole group
(git and its transport helpers) is killed and `GitError` says which command timed out.
Credential prompts are disabled (a private repository needs credentials configured for git
itself: a credential helper, an SSH key, a token in the URL); only the file, git, http(s) and
ssh transports are allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from federation.gitops.errors import GitError
from federation.gitops.load import (
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_TOTAL_BYTES,
    SourceFile,
    is_config_path,
)

FETCH_TIMEOUT = 60.0
LOCAL_TIMEOUT = 20.0
REMOTE_REF = "refs/fedgate/remote"
APPLIED_REF = "refs/fedgate/applied"
_BRANCH = re.compile(r"^(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]+(?<!\.lock)(?<![/.])$")
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_STDERR_TAIL = 600


def _git_env() -> dict[str, str]:
    env = dict(os.environ)  # PATH, HOME and the operator's credential configuration
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ALLOW_PROTOCOL="file:git:http:https:ssh",
        GIT_SSH_COMMAND=env.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes"),
        LC_ALL="C",
    )
    return env


def normalise_source(url: str) -> str:
    """An absolute path for a local repository, else the URL unchanged. Refuses option-like
    values (`-...`), which git would parse as options."""
    if not url or url.startswith("-"):
        raise GitError(f"repository {url!r} is not a path or URL")
    colon, slash = url.find(":"), url.find("/")
    if "://" in url or (colon > 0 and (slash == -1 or colon < slash)):
        return url  # a URL, or scp-like `[user@]host:path` as git reads it
    return str(Path(url).expanduser().absolute())


def redact(text: str) -> str:
    """`text` with URL credentials hidden (`https://user:token@host/` -> `https://***@host/`)."""
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@", r"\1***@", text)


@dataclass(frozen=True, slots=True)
class CommitInfo:
    sha: str
    subject: str
    committed_at: str  # RFC 3339


class GitRepository:
    """The branch `branch` of the repository at `url`, mirrored into the bare repo `workdir`."""

    def __init__(
        self,
        url: str,
        branch: str,
        workdir: Path,
        *,
        fetch_timeout: float = FETCH_TIMEOUT,
        local_timeout: float = LOCAL_TIMEOUT,
        git: str = "git",
    ) -> None:
        if not _BRANCH.match(branch):
            raise GitError(f"branch {branch!r} is not a valid branch name")
        self.url = normalise_source(url)
        self.branch = branch
        self.workdir = workdir
        self._fetch_timeout = fetch_timeout
        self._local_timeout = local_timeout
        self._git = git
        self._ready = False

    async def _run(
        self, *args: str, limit: float | None = None, stdin: bytes | None = None
    ) -> bytes:
        limit = limit if limit is not None else self._local_timeout
        argv = [self._git, "-C", str(self.workdir), *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=_git_env(),
                start_new_session=True,  # its own process group, killed whole on timeout
            )
        except OSError as e:
            raise GitError(f"cannot run {self._git}: {e}") from e
        try:
            async with asyncio.timeout(limit):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise GitError(f"git {args[0]} timed out after {limit:g} s") from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        if proc.returncode != 0:
            text = err.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
            raise GitError(f"git {args[0]} failed (exit {proc.returncode}): {redact(text)}")
        return out

    async def _init(self) -> None:
        if self._ready:
            return
        if not (self.workdir / "HEAD").is_file():
            self.workdir.mkdir(parents=True, exist_ok=True)
            await self._run("init", "--bare", "--quiet")
        await self._run("config", "gc.auto", "0")  # keep every commit we applied readable
        self._ready = True

    async def fetch(self) -> str:
        """Fetch the branch (force: history may be rewritten) and return its head commit."""
        await self._init()
        await self._run(
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--",
            self.url,
            f"+refs/heads/{self.branch}:{REMOTE_REF}",
            limit=self._fetch_timeout,
        )
        return await self.resolve(REMOTE_REF)

    async def resolve(self, ref: str) -> str:
        out = await self._run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        sha = out.decode().strip()
        if not _SHA.match(sha):
            raise GitError(f"{ref} does not name a commit")
        return sha

    async def commit_info(self, sha: str) -> CommitInfo:
        out = await self._run("log", "-1", "--format=%H%x00%cI%x00%s", _checked(sha), "--")
        full, committed, subject = out.decode("utf-8", "replace").rstrip("\n").split("\0", 2)
        return CommitInfo(full, subject, committed)

    async def is_ancestor(self, old: str, new: str) -> bool:
        """Whether `old` is in `new`'s history (False after a force push rewrote it)."""
        try:
            await self._run("merge-base", "--is-ancestor", _checked(old), _checked(new))
        except GitError:
            return False
        return True

    async def has_commit(self, sha: str) -> bool:
        try:
            await self._run("cat-file", "-e", f"{_checked(sha)}^{{commit}}")
        except GitError:
            return False
        return True

    async def pin(self, sha: str) -> None:
        """Keep `sha` reachable in the private clone (the last applied commit)."""
        await self._run("update-ref", APPLIED_REF, _checked(sha))

    async def files(
        self, sha: str, path: str = ""
    ) -> tuple[list[SourceFile], list[tuple[str, str]]]:
        """Config files of commit `sha` under `path` (paths relative to the repository root), and
        problems (path, reason): symbolic links, oversized files."""
        root = path.strip("/")
        args = ["ls-tree", "-r", "-z", "-l", "--full-tree", _checked(sha)]
        if root and root != ".":
            args += ["--", root]
        listing = await self._run(*args)
        wanted: list[tuple[str, str]] = []  # (object id, path)
        problems: list[tuple[str, str]] = []
        total = 0
        for entry in listing.split(b"\0"):
            if not entry:
                continue
            meta, _, raw_path = entry.partition(b"\t")
            mode, kind, oid, size = meta.decode().split()
            name = raw_path.decode("utf-8", "replace")
            rel = name[len(root) + 1 :] if root and root != "." else name
            if kind != "blob" or not is_config_path(rel):
                continue
            if mode == "120000":
                problems.append((name, "is a symbolic link; config files must be regular files"))
                continue
            if int(size) > MAX_FILE_BYTES:
                problems.append((name, f"is {size} bytes, over the limit of {MAX_FILE_BYTES}"))
                continue
            total += int(size)
            if total > MAX_TOTAL_BYTES or len(wanted) >= MAX_FILES:
                raise GitError(
                    f"commit {sha[:12]} holds more than {MAX_FILES} config files or "
                    f"{MAX_TOTAL_BYTES} bytes of them"
                )
            wanted.append((oid, name))
        if not wanted:
            return [], problems
        batch = await self._run(
            "cat-file", "--batch", stdin=b"".join(oid.encode() + b"\n" for oid, _ in wanted)
        )
        return _split_batch(batch, wanted), problems


def _checked(sha: str) -> str:
    if not _SHA.match(sha):
        raise GitError(f"{sha!r} is not a full commit id")
    return sha


def _split_batch(batch: bytes, wanted: list[tuple[str, str]]) -> list[SourceFile]:
    """Parse `git cat-file --batch` output: `<oid> <type> <size>\\n<data>\\n` per object."""
    files: list[SourceFile] = []
    pos = 0
    for oid, name in wanted:
        end = batch.index(b"\n", pos)
        header = batch[pos:end].decode().split()
        if len(header) != 3 or header[0] != oid or header[1] != "blob":
            raise GitError(f"unexpected cat-file output for {name}: {' '.join(header)}")
        size = int(header[2])
        files.append(SourceFile(str(PurePosixPath(name)), batch[end + 1 : end + 1 + size]))
        pos = end + 1 + size + 1
    return files
