"""Fixtures for the cluster tests: the shared real etcd and a fresh client per test."""

from tests.etcd_fixture import etcd, etcd_server  # noqa: F401  (registers the fixtures)
