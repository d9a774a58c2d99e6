"""A faithful fake Kubernetes API server for tests (see server.py); `python -m tests.kubefake`."""

from tests.kubefake.fake import FakeKubeAPI, TokenIdentity
from tests.kubefake.store import Store, StoreError

__all__ = ["FakeKubeAPI", "Store", "StoreError", "TokenIdentity"]
