"""Fixtures for ca/ tests: a free pair of loopback ports, a real etcd."""

from __future__ import annotations

import socket

from tests.etcd_fixture import etcd_server  # noqa: F401  (registers the fixture)
from tests.helpers import free_port


def free_pair() -> str:
    """host:port whose port + 1 is free too (the CA's renewal port)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return f"127.0.0.1:{port}"
    raise RuntimeError("no free pair of ports")
