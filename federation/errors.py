"""The federation boundary's exception family.

etcd3aio and gRPC exceptions are translated at the edge (`federation.etcd.store_errors`) with
`raise ... from e`, so callers catch `StoreError` and never import etcd3aio.
"""


class FederationError(Exception):
    """Base of every error raised by federation/."""


class StoreError(FederationError):
    """The etcd store refused or failed an operation."""


class StoreUnavailableError(StoreError):
    """etcd could not be reached (or did not answer in time); retrying later may succeed."""


class StoreAuthError(StoreError):
    """etcd refused our credentials or permissions; retrying will not help."""


class LeaseLostError(StoreError):
    """A write named a lease that etcd no longer has (it expired or was revoked)."""


class StoreConflictError(StoreError):
    """A compare-and-swap transaction kept losing to concurrent writers."""


class NotLeaderError(FederationError):
    """A leader-only write was attempted by a replica that is not (or no longer) the leader."""


class PolicyFileError(FederationError):
    """A policy YAML document is invalid; the message names the file and the field."""
