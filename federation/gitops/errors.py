"""The GitOps boundary's exceptions (git failures, invalid repositories)."""

from __future__ import annotations

from federation.errors import FederationError


class GitOpsError(FederationError):
    """Base of every error raised by federation.gitops."""


class GitError(GitOpsError):
    """A git command failed or timed out; the message says which and why (stderr included)."""


class RepositoryError(GitOpsError):
    """A configuration checkout cannot be read (missing directory, too large, ...)."""


class SyncNotRunningError(GitOpsError):
    """`trigger()` was called on a sync whose `run()` loop is not running (not the leader)."""
