"""Run a module's config-stream and CA client tests over both gRPC clients (issue 17).

`wire` rebinds the module's `ConfigClient` and `obtain_svid` to the real ones with `wire=` set,
so every existing test runs unchanged against the real grpcio servers with each client."""

from __future__ import annotations

import functools

import pytest

from ca.client import obtain_svid
from federation.api.client import ConfigClient
from federation.api.wire import WIRES


@pytest.fixture(params=WIRES)
def wire(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    real = {"ConfigClient": ConfigClient, "obtain_svid": obtain_svid}
    for name, function in real.items():
        if hasattr(request.module, name):
            bound = functools.partial(function, wire=request.param)
            monkeypatch.setattr(request.module, name, bound)
    return str(request.param)
