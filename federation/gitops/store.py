"""The applied config in etcd: one transaction per commit, the commit record, the last rejection.

```
/fedgate/config/policies/<ns>/<svc>           TrafficPolicy JSON (mesh.codec)
/fedgate/config/authorization/<ns>/<name>     AuthorizationPolicy JSON (mesh.codec)
/fedgate/config/federation                    the Federation document, normalised (JSON)
/fedgate/config/commit                        {"sha", "branch", "subject", "appliedAt"}
/fedgate/config/rejection                     {"sha", "rejectedAt", "issues": [...]} (last one)
```

`apply` makes exactly these keys hold one commit's config, in ONE transaction that also writes
the commit record and clears the rejection; it is guarded by the revision it read, so a rival
writer (a deposed leader) makes it retry, never interleave. Keys under /fedgate/config/ that
GitOps does not manage (the identity issue's `denied/`) are never read into the diff, written or
deleted. etcd caps operations per transaction (`--max-txn-ops`, 128 by default): only changed
keys are written, and a commit changing more is refused with `TransactionTooLargeError` rather
than split (splitting would expose half a commit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from etcd3aio import Etcd3Client, prefix_range_end

from federation import keys
from federation.errors import StoreConflictError
from federation.etcd import store_errors
from federation.gitops.errors import GitOpsError
from federation.gitops.validate import DesiredConfig
from federation.store import DEFAULT_TIMEOUT, TXN_ATTEMPTS, kv_service, unchanged_since
from mesh.codec import (
    authorization_to_json,
    dumps,
    loads,
    policy_to_json,
)
from mesh.errors import CodecError
from mesh.model import AuthorizationPolicy

_log = structlog.get_logger("fedgate.federation.gitops")

CONFIG_PREFIX = keys.ROOT + "config/"
POLICIES_PREFIX = keys.POLICIES_PREFIX
AUTHORIZATION_PREFIX = keys.AUTHORIZATION_PREFIX
FEDERATION_KEY = keys.FEDERATION_KEY
COMMIT_KEY = CONFIG_PREFIX + "commit"
REJECTION_KEY = CONFIG_PREFIX + "rejection"
MANAGED_PREFIXES = (POLICIES_PREFIX, AUTHORIZATION_PREFIX)
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
MAX_REPORTED_ISSUES = 200  # a rejection record stays small; the log has every issue


class TransactionTooLargeError(GitOpsError):
    """A commit changes more keys than etcd accepts in one transaction."""


def authorization_key(policy: AuthorizationPolicy) -> str:
    return keys.authorization_key(policy.key.namespace, policy.name)


def is_managed(key: str) -> bool:
    return key == FEDERATION_KEY or key.startswith(MANAGED_PREFIXES)


def desired_entries(config: DesiredConfig) -> dict[str, bytes]:
    """The managed keys (everything but the commit record) that `config` consists of. Pure."""
    out = {keys.policy_key(p.key): dumps(policy_to_json(p)) for p in config.policies}
    out.update(
        {authorization_key(a): dumps(authorization_to_json(a)) for a in config.authorization}
    )
    if config.federation is not None:
        out[FEDERATION_KEY] = dumps(config.federation)
    return out


@dataclass(frozen=True, slots=True)
class CommitRecord:
    sha: str
    branch: str = ""
    subject: str = ""
    applied_at: str = ""  # RFC 3339

    def to_json(self) -> dict[str, Any]:
        return {
            "sha": self.sha,
            "branch": self.branch,
            "subject": self.subject,
            "appliedAt": self.applied_at,
        }

    @classmethod
    def from_bytes(cls, raw: bytes) -> CommitRecord:
        """Decode the commit key; a bare SHA (the controller's seed format) is accepted too."""
        text = raw.decode("utf-8", "replace").strip()
        if not text.startswith("{"):
            return cls(sha=text)
        o = loads(text, "commit record")
        sha = o.get("sha")
        if not isinstance(sha, str):
            raise CodecError("commit record has no sha")
        return cls(
            sha, str(o.get("branch", "")), str(o.get("subject", "")), str(o.get("appliedAt", ""))
        )


@dataclass(frozen=True, slots=True)
class Rejection:
    sha: str
    rejected_at: str
    issues: tuple[dict[str, Any], ...]  # ConfigIssue.to_json() of each, or a single store error
    total: int = 0  # how many issues there were (`issues` may be truncated)

    def to_json(self) -> dict[str, Any]:
        return {
            "sha": self.sha,
            "rejectedAt": self.rejected_at,
            "issues": list(self.issues[:MAX_REPORTED_ISSUES]),
            "total": self.total or len(self.issues),
        }

    @classmethod
    def from_bytes(cls, raw: bytes) -> Rejection:
        o = loads(raw, "rejection record")
        issues = o.get("issues", [])
        return cls(
            sha=str(o.get("sha", "")),
            rejected_at=str(o.get("rejectedAt", "")),
            issues=tuple(i for i in issues if isinstance(i, dict))
            if isinstance(issues, list)
            else (),
            total=int(o.get("total", 0)) if isinstance(o.get("total"), int) else 0,
        )


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    added: dict[str, bytes] = field(default_factory=dict)
    changed: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # key -> (old, new)
    removed: dict[str, bytes] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)

    def __len__(self) -> int:
        return len(self.added) + len(self.changed) + len(self.removed)


def diff_entries(current: Mapping[str, bytes], desired: Mapping[str, bytes]) -> ConfigDiff:
    """What turns the managed keys `current` into `desired`. Pure."""
    return ConfigDiff(
        added={k: v for k, v in sorted(desired.items()) if k not in current},
        changed={
            k: (current[k], v)
            for k, v in sorted(desired.items())
            if k in current and current[k] != v
        },
        removed={k: v for k, v in sorted(current.items()) if k not in desired},
    )


@dataclass(frozen=True, slots=True)
class AppliedState:
    entries: dict[str, bytes]  # managed keys only
    commit: CommitRecord | None
    rejection: Rejection | None
    revision: int


class ConfigStore:
    """Reads and writes the GitOps-managed keys under /fedgate/config/."""

    def __init__(
        self,
        client: Etcd3Client,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_txn_ops: int = MAX_TXN_OPS,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._max_ops = max_txn_ops

    async def state(self) -> AppliedState:
        """The applied config, commit and rejection, read at one revision."""
        kv = kv_service(self._client)
        with store_errors("read applied config"):
            response = await kv.get(
                CONFIG_PREFIX, prefix_range_end(CONFIG_PREFIX), timeout=self._timeout
            )
        entries: dict[str, bytes] = {}
        commit: CommitRecord | None = None
        rejection: Rejection | None = None
        for item in response.kvs:
            key = item.key.decode("utf-8", "replace")
            value = bytes(item.value)
            try:
                if key == COMMIT_KEY:
                    commit = CommitRecord.from_bytes(value)
                elif key == REJECTION_KEY:
                    rejection = Rejection.from_bytes(value)
            except (CodecError, ValueError) as e:
                _log.warning("unreadable GitOps record, ignoring it", key=key, error=str(e))
            if is_managed(key):
                entries[key] = value
        return AppliedState(entries, commit, rejection, int(response.header.revision))

    async def apply(
        self, config: DesiredConfig, commit: CommitRecord, fence: Sequence[Any] = ()
    ) -> ConfigDiff:
        """Make the managed keys hold `config` and record `commit`, in one transaction.

        `fence`: extra etcd compares the transaction must also pass (the leader-election key,
        so a deposed leader cannot write). Returns what changed. Raises StoreError,
        StoreConflictError (lost TXN_ATTEMPTS races in a row) or TransactionTooLargeError.
        """
        desired = desired_entries(config)
        kv = kv_service(self._client)
        for _ in range(TXN_ATTEMPTS):
            current = await self.state()
            diff = diff_entries(current.entries, desired)
            ops = [kv.txn_op_put(k, v) for k, v in diff.added.items()]
            ops += [kv.txn_op_put(k, new) for k, (_, new) in diff.changed.items()]
            ops += [kv.txn_op_delete(k) for k in diff.removed]
            ops.append(kv.txn_op_put(COMMIT_KEY, dumps(commit.to_json())))
            if current.rejection is not None:
                ops.append(kv.txn_op_delete(REJECTION_KEY))
            if len(ops) > self._max_ops:
                raise TransactionTooLargeError(
                    f"commit {commit.sha[:12]} changes {len(ops)} keys; etcd accepts at most "
                    f"{self._max_ops} operations in one transaction (raise etcd's --max-txn-ops, "
                    "or apply the change in smaller commits)"
                )
            compares = [unchanged_since(p, current.revision) for p in MANAGED_PREFIXES]
            compares += [
                unchanged_since(k, current.revision)
                for k in (FEDERATION_KEY, COMMIT_KEY, REJECTION_KEY)
            ]
            with store_errors("apply config"):
                result = await kv.txn([*compares, *fence], ops, timeout=self._timeout)
            if result.succeeded:
                return diff
        raise StoreConflictError(f"config apply lost {TXN_ATTEMPTS} transactions in a row")

    async def record_rejection(self, rejection: Rejection) -> None:
        """Write the rejection record; nothing else changes."""
        kv = kv_service(self._client)
        with store_errors("record rejection"):
            await kv.put(REJECTION_KEY, dumps(rejection.to_json()), timeout=self._timeout)
