"""The GitOps sync: follow a branch, validate every new head completely, apply it atomically.

One round:

    fetch the branch (forced) -> head
    head == applied commit (etcd)     -> up to date
    head == last rejected commit      -> still rejected (not re-validated, not re-logged)
    read head's files, validate all   -> issues? record the rejection, keep the applied config
                                      -> else apply everything in ONE etcd transaction

Failures keep the applied config untouched: a repository that cannot be fetched (gone,
unreachable, timed out) is logged and counted and retried every poll, the config in etcd stays
what the last good commit made it. A force push is just another head: if it validates it is
applied (the log says history was rewritten), if not it is rejected like any bad commit. A
rejection is recorded in etcd (/fedgate/config/rejection) for `fedgate config status`, logged
with every issue, and counted; a newer commit is validated afresh, and applying one clears the
rejection.

Only the controller leader may run this (`run()` behind leader election): two syncs would not
corrupt anything (each apply is a guarded transaction) but would race to record rejections.
`trigger()` asks the running loop for a round now (a webhook) and returns its outcome. `fence`
(the election's `fence()`) adds the leader compare to every apply transaction; a fence that
raises (not leading) or fails makes the round `store-failed`, nothing written.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from federation.errors import FederationError, StoreError
from federation.gitops.checks import PortProtocols
from federation.gitops.errors import GitError, SyncNotRunningError
from federation.gitops.git import GitRepository, redact
from federation.gitops.store import (
    CommitRecord,
    ConfigStore,
    Rejection,
    TransactionTooLargeError,
)
from federation.gitops.validate import ValidationResult, validate_files

_log = structlog.get_logger("fedgate.federation.gitops")

DEFAULT_POLL_INTERVAL = 15.0


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """Where the config lives: a repository (path or URL), its branch, a directory in it."""

    repository: str
    branch: str = "main"
    path: str = ""  # the config's directory inside the repository ("" = all of it)
    poll_interval: float = DEFAULT_POLL_INTERVAL
    workdir: Path = Path("/var/lib/fedgate/gitops")  # the private clone
    fetch_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    """What one round did: `result` is one of the RESULTS below."""

    result: str
    sha: str = ""
    detail: str = ""
    issues: int = 0


RESULTS = ("applied", "up-to-date", "rejected", "still-rejected", "fetch-failed", "store-failed")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class GitOpsSync:
    """Follows `repo` and keeps `store` (etcd) at the newest valid commit."""

    def __init__(
        self,
        repo: GitRepository,
        store: ConfigStore,
        *,
        path: str = "",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        fence: Callable[[], Sequence[Any]] = tuple,
        now: Callable[[], str] = _now,
        ports: Callable[[], PortProtocols] = dict,
    ) -> None:
        self._repo = repo
        self._store = store
        self._path = path
        self._poll = poll_interval
        self._fence = fence
        self._now = now
        self._ports = ports  # the catalog's port protocols, for federation.gitops.checks
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future[SyncOutcome]] = []
        self._running = False
        self._lock = asyncio.Lock()
        self._rejected_sha = ""
        self.last: SyncOutcome | None = None
        # metrics (Prometheus later): rounds by result, and the last applied commit
        self.counts: dict[str, int] = dict.fromkeys(RESULTS, 0)
        self.applied_sha = ""

    @classmethod
    def from_settings(cls, settings: SyncSettings, store: ConfigStore, **kwargs: Any) -> GitOpsSync:
        repo = GitRepository(
            settings.repository,
            settings.branch,
            settings.workdir,
            fetch_timeout=settings.fetch_timeout,
        )
        return cls(repo, store, path=settings.path, poll_interval=settings.poll_interval, **kwargs)

    @property
    def rejections(self) -> int:
        return self.counts["rejected"]

    def status(self) -> dict[str, Any]:
        """For the admin port's /config."""
        return {
            "repository": redact(self._repo.url),
            "branch": self._repo.branch,
            "path": self._path,
            "running": self._running,
            "appliedCommit": self.applied_sha,
            "rejectedCommit": self._rejected_sha,
            "last": None
            if self.last is None
            else {"result": self.last.result, "sha": self.last.sha, "detail": self.last.detail},
            "rounds": dict(self.counts),
        }

    async def run(self) -> None:
        """Sync now, then every `poll_interval` seconds or on `trigger()`, until cancelled."""
        self._running = True
        try:
            while True:
                self._wake.clear()
                waiters, self._waiters = self._waiters, []
                outcome = await self.sync_once()
                for w in waiters:
                    if not w.done():
                        w.set_result(outcome)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll):
                        await self._wake.wait()
        finally:
            self._running = False
            for w in self._waiters:
                if not w.done():
                    w.set_exception(SyncNotRunningError("the sync loop stopped"))
            self._waiters = []

    async def trigger(self) -> SyncOutcome:
        """Run a round as soon as possible (a webhook) and return its outcome."""
        if not self._running:
            raise SyncNotRunningError("the GitOps sync is not running on this replica")
        waiter: asyncio.Future[SyncOutcome] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        return await waiter

    async def sync_once(self) -> SyncOutcome:
        """One round (see the module docstring); never raises for git, store or config errors."""
        async with self._lock:
            outcome = await self._round()
        self.counts[outcome.result] += 1
        self.last = outcome
        return outcome

    async def _round(self) -> SyncOutcome:
        log = _log.bind(repository=redact(self._repo.url), branch=self._repo.branch)
        try:
            head = await self._repo.fetch()
        except GitError as e:
            log.warning(
                "cannot fetch the config repository; keeping the applied config", error=str(e)
            )
            return SyncOutcome("fetch-failed", detail=str(e))
        try:
            state = await self._store.state()
        except StoreError as e:
            log.warning("cannot read the applied config", error=str(e))
            return SyncOutcome("store-failed", head, str(e))
        self.applied_sha = state.commit.sha if state.commit else ""
        if head == self.applied_sha:
            return SyncOutcome("up-to-date", head)
        # Rejected already (by this replica, or by the previous leader: the record says so).
        if head in (self._rejected_sha, state.rejection.sha if state.rejection else ""):
            self._rejected_sha = head
            return SyncOutcome("still-rejected", head)
        try:
            info = await self._repo.commit_info(head)
            files, problems = await self._repo.files(head, self._path)
        except GitError as e:
            log.warning("cannot read the commit", sha=head, error=str(e))
            return SyncOutcome("fetch-failed", head, str(e))
        result = validate_files(files, problems, self._ports())
        if result.config is None:
            return await self._reject(head, result, log)
        record = CommitRecord(head, self._repo.branch, info.subject, self._now())
        try:
            diff = await self._store.apply(result.config, record, self._fence())
        except TransactionTooLargeError as e:
            issue = {"file": "", "document": 0, "line": 0, "field": "", "reason": str(e)}
            return await self._record(head, (issue,), log, str(e))
        except FederationError as e:  # StoreError, or the fence's NotLeaderError
            log.warning("cannot apply the config; will retry", sha=head, error=str(e))
            return SyncOutcome("store-failed", head, str(e))
        rewritten = bool(self.applied_sha) and not await self._repo.is_ancestor(
            self.applied_sha, head
        )
        with contextlib.suppress(GitError):
            await self._repo.pin(head)
        log.info(
            "config applied",
            sha=head,
            previous=self.applied_sha or None,
            history_rewritten=rewritten,
            subject=info.subject,
            added=len(diff.added),
            changed=len(diff.changed),
            removed=len(diff.removed),
            documents=result.documents,
        )
        self.applied_sha = head
        self._rejected_sha = ""
        return SyncOutcome("applied", head, "history rewritten" if rewritten else "")

    async def _reject(self, sha: str, result: ValidationResult, log: Any) -> SyncOutcome:
        for issue in result.issues:
            log.warning(
                "config issue",
                sha=sha,
                file=issue.file,
                document=issue.document,
                line=issue.line,
                field=issue.field,
                reason=issue.reason,
            )
        summary = f"{len(result.issues)} issue(s), first: {result.issues[0]}"
        return await self._record(sha, tuple(i.to_json() for i in result.issues), log, summary)

    async def _record(
        self, sha: str, issues: tuple[dict[str, Any], ...], log: Any, summary: str
    ) -> SyncOutcome:
        log.error(
            "config commit rejected; keeping the applied config",
            sha=sha,
            applied=self.applied_sha or None,
            issues=len(issues),
            first=summary,
        )
        try:
            await self._store.record_rejection(Rejection(sha, self._now(), issues, len(issues)))
        except StoreError as e:
            # Not remembered as rejected: the next round validates again and records it then.
            log.warning("cannot record the rejection", sha=sha, error=str(e))
            return SyncOutcome("rejected", sha, summary, len(issues))
        self._rejected_sha = sha
        return SyncOutcome("rejected", sha, summary, len(issues))
