"""Fixtures for the fedgate/ tests: a real etcd (shared)."""

from tests.etcd_fixture import etcd_server  # noqa: F401  (registers the fixture)
