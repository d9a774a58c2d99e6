"""The file cluster adapter: parsing, atomic updates, tokens, and the polling ClusterSource."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clusters import source
from clusters.source import (
    EndpointEntry,
    ExportEntry,
    FileClusterSource,
    SourceError,
    TokenGrant,
)
from mesh.errors import MeshError
from mesh.interfaces import ClusterSource
from mesh.model import Endpoint, ServiceExport, ServicePort
from mesh.naming import ServiceKey, SpiffeId

TD = "east.fedgate.local"

GOOD = [
    {
        "namespace": "shop",
        "name": "payments",
        "ports": [{"name": "http", "port": 8080, "protocol": "HTTP"}],
        "created": 1700000000.5,
        "endpoints": [
            {"pod": "pay-1", "address": "10.1.0.11", "serviceAccount": "payments"},
            {"pod": "pay-0", "address": "10.1.0.10", "serviceAccount": "payments"},
        ],
    },
    {
        "namespace": "shop",
        "name": "cart",
        "ports": [{"name": "grpc", "port": 9090}],
        "created": 1700000001,
    },
]


def test_parse_good_file() -> None:
    entries = source.parse_exports(json.dumps(GOOD))
    assert entries[0] == ExportEntry(
        namespace="shop",
        name="payments",
        ports=(ServicePort("http", 8080, "HTTP"),),
        created=1700000000.5,
        endpoints=(
            EndpointEntry("pay-1", "10.1.0.11", "payments"),
            EndpointEntry("pay-0", "10.1.0.10", "payments"),
        ),
    )
    # protocol defaults to TCP, endpoints to none, an integer epoch becomes a float
    assert entries[1].ports == (ServicePort("grpc", 9090, "TCP"),)
    assert entries[1].endpoints == ()
    assert entries[1].created == 1700000001.0


def test_round_trip() -> None:
    entries = source.parse_exports(json.dumps(GOOD))
    assert source.parse_exports(source.exports_to_json(entries)) == entries


def test_service_exports_are_bound_sorted_and_carry_spiffe_identities() -> None:
    exports = source.to_service_exports(source.parse_exports(json.dumps(GOOD)), "east", TD)
    assert [e.key for e in exports] == [ServiceKey("shop", "cart"), ServiceKey("shop", "payments")]
    pay = exports[1]
    assert pay.cluster == "east"
    assert pay.created == 1700000000.5
    assert pay.endpoints == (
        Endpoint("east", "10.1.0.10", "pay-0", SpiffeId(TD, "shop", "payments")),
        Endpoint("east", "10.1.0.11", "pay-1", SpiffeId(TD, "shop", "payments")),
    )
    assert pay.endpoints[0].identity.uri == f"spiffe://{TD}/ns/shop/sa/payments"


def _bad(mutate: object) -> list[object]:
    doc: list[object] = json.loads(json.dumps(GOOD))
    assert callable(mutate)
    mutate(doc)
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{", "not valid JSON"),
        ({"namespace": "shop"}, "exports.json: expected a list"),
        ([1], r"exports.json\[0\]: expected an object"),
        (_bad(lambda d: d[0].pop("ports")), r"exports.json\[0\]: missing ports"),
        (_bad(lambda d: d[0].update(colour="red")), r"\[0\]: unknown field 'colour'"),
        (_bad(lambda d: d[0].update(namespace="Shop")), r"\[0\].namespace: .*RFC 1123"),
        (_bad(lambda d: d[1].update(name="")), r"\[1\].name: expected a non-empty string"),
        (_bad(lambda d: d[0].update(created="yesterday")), r"\[0\].created: expected epoch"),
        (_bad(lambda d: d[0].update(created=True)), r"\[0\].created"),
        (_bad(lambda d: d[0].update(created=-1)), r"\[0\].created"),
        (_bad(lambda d: d[0]["ports"][0].update(port="80")), r"ports\[0\].port: expected an int"),
        (_bad(lambda d: d[0]["ports"][0].update(port=70000)), r"ports\[0\]: port 70000"),
        (_bad(lambda d: d[0]["ports"][0].update(protocol="SCTP")), r"ports\[0\]: protocol"),
        (_bad(lambda d: d[0]["ports"].append(d[0]["ports"][0])), "port name 'http' appears twice"),
        (
            _bad(lambda d: d[0]["endpoints"][1].update(address="10.1.0.300")),
            r"endpoints\[1\].address: '10.1.0.300' is not an IP",
        ),
        (
            _bad(lambda d: d[0]["endpoints"][0].pop("serviceAccount")),
            r"endpoints\[0\]: missing serviceAccount",
        ),
        (
            _bad(lambda d: d[0]["endpoints"][0].update(serviceAccount="Pay_SA")),
            r"endpoints\[0\].serviceAccount: service account",
        ),
        (
            _bad(lambda d: d[0]["endpoints"][1].update(pod="pay-1")),
            "pod 'pay-1' appears twice",
        ),
        (_bad(lambda d: d.append(d[0])), r"\[2\]: export payments.shop appears twice"),
    ],
)
def test_malformed_exports_name_the_field(doc: object, message: str) -> None:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(SourceError, match=message):
        source.parse_exports(text)


def test_missing_file_reads_as_empty(tmp_path: Path) -> None:
    assert source.read_exports(tmp_path / "nope.json") == ()
    assert source.read_tokens(tmp_path / "nope.json") == {}


def test_errors_from_files_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "exports.json"
    path.write_text('[{"namespace": "shop"}]')
    with pytest.raises(SourceError, match=rf"{path}\[0\]: missing"):
        source.read_exports(path)


def test_updates(tmp_path: Path) -> None:
    path = source.exports_path(tmp_path, "east")
    assert path == tmp_path / "clusters" / "east" / "exports.json"
    http = ServicePort("http", 8080, "HTTP")
    source.add_export(path, "shop", "payments", [http], created=100.0)
    source.add_endpoint(path, "shop", "payments", "pay-0", "10.1.0.10", "payments")
    source.add_endpoint(path, "shop", "payments", "pay-1", "10.1.0.11", "payments")
    # re-adding an endpoint by pod name replaces it
    source.add_endpoint(path, "shop", "payments", "pay-1", "10.1.0.12", "payments")
    # re-adding an export updates its ports but keeps its creation time and endpoints
    admin = ServicePort("admin", 9000)
    source.add_export(path, "shop", "payments", [http, admin], created=999.0)
    [entry] = source.read_exports(path)
    assert entry.created == 100.0
    assert entry.ports == (http, admin)
    assert [(e.pod, e.address) for e in entry.endpoints] == [
        ("pay-0", "10.1.0.10"),
        ("pay-1", "10.1.0.12"),
    ]

    source.add_export(path, "shop", "cart", [http])  # created defaults to now
    source.add_endpoint(path, "shop", "cart", "pay-0", "10.1.0.10", "cart")
    assert source.remove_pod(path, "pay-0") == 2
    assert source.remove_pod(path, "pay-0") == 0
    assert source.remove_export(path, "shop", "cart") is True
    assert source.remove_export(path, "shop", "cart") is False
    assert [e.name for e in source.read_exports(path)] == ["payments"]
    # no temporary files are left behind; only the file and its lock
    assert sorted(p.name for p in path.parent.iterdir()) == ["exports.json", "exports.json.lock"]


def test_add_endpoint_to_missing_export_fails(tmp_path: Path) -> None:
    path = tmp_path / "exports.json"
    with pytest.raises(SourceError, match=r"no export payments.shop"):
        source.add_endpoint(path, "shop", "payments", "p", "10.1.0.10", "sa")


def test_update_refuses_to_write_invalid_content(tmp_path: Path) -> None:
    path = tmp_path / "exports.json"
    source.add_export(path, "shop", "payments", [ServicePort("http", 80)], created=1.0)
    before = path.read_bytes()
    with pytest.raises(SourceError, match="not an IP"):
        source.add_endpoint(path, "shop", "payments", "p", "nowhere", "sa")
    assert path.read_bytes() == before


def test_tokens(tmp_path: Path) -> None:
    path = source.tokens_path(tmp_path, "west")
    source.add_token(path, "tok-a", "shop", "payments")
    source.add_token(path, "tok-b", "shop", "cart")
    source.add_token(path, "tok-a", "shop", "billing")  # re-adding replaces the grant
    assert source.read_tokens(path) == {
        "tok-a": TokenGrant("shop", "billing"),
        "tok-b": TokenGrant("shop", "cart"),
    }
    assert json.loads(path.read_text())["tok-b"] == {"namespace": "shop", "serviceAccount": "cart"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # the file holds secrets


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("[]", "expected an object"),
        ('{"t": {"namespace": "shop"}}', "missing serviceAccount"),
        ('{"t": {"namespace": "Shop", "serviceAccount": "a"}}', "namespace"),
        ('{"secret-token": 3}', r"\['secret-t'...\]: expected an object"),
    ],
)
def test_malformed_tokens(doc: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        source.parse_tokens(doc)


def test_add_token_validates(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="service account"):
        source.add_token(tmp_path / "t.json", "tok", "shop", "Bad SA")
    with pytest.raises(SourceError, match="token"):
        source.add_token(tmp_path / "t.json", "", "shop", "sa")


# --- FileClusterSource ----------------------------------------------------------------------


class Ticker:
    """A fake sleep: each poll waits until the test calls `tick()`; counts the polls."""

    def __init__(self) -> None:
        self._ticks: asyncio.Queue[None] = asyncio.Queue()
        self._slept = asyncio.Condition()
        self.sleeps = 0

    async def sleep(self, _seconds: float) -> None:
        async with self._slept:
            self.sleeps += 1
            self._slept.notify_all()
        await self._ticks.get()

    def tick(self) -> None:
        self._ticks.put_nowait(None)

    async def until_sleeps(self, n: int) -> None:
        """Wait until the source has gone to sleep `n` times in all."""
        async with self._slept:
            await asyncio.wait_for(self._slept.wait_for(lambda: self.sleeps >= n), timeout=5)


async def _next(it: AsyncIterator[tuple[ServiceExport, ...]]) -> tuple[ServiceExport, ...]:
    return await asyncio.wait_for(anext(it), timeout=5)


async def test_source_yields_at_once_then_on_change(tmp_path: Path) -> None:
    path = tmp_path / "exports.json"
    ticker = Ticker()
    src = FileClusterSource(path, "east", TD, poll_interval=1.0, sleep=ticker.sleep)
    it = src.changes()
    try:
        assert await _next(it) == ()  # no file yet: an empty cluster, yielded immediately
        assert ticker.sleeps == 0

        source.add_export(path, "shop", "payments", [ServicePort("http", 80)], created=5.0)
        ticker.tick()
        [export] = await _next(it)
        assert export.key == ServiceKey("shop", "payments")
        assert export.endpoints == ()

        # Two polls of an unchanged file yield nothing.
        pending = asyncio.ensure_future(_next(it))
        ticker.tick()
        ticker.tick()
        await ticker.until_sleeps(4)  # polled twice, asleep again
        assert not pending.done()
        source.add_endpoint(path, "shop", "payments", "p0", "10.1.0.10", "pay")
        ticker.tick()
        [export] = await pending
        assert export.endpoints == (
            Endpoint("east", "10.1.0.10", "p0", SpiffeId(TD, "shop", "pay")),
        )

        # The content changes (reformatted) but the value does not: nothing is yielded.
        pending = asyncio.ensure_future(_next(it))
        path.write_text(json.dumps(json.loads(path.read_text()), indent=7))
        ticker.tick()
        await ticker.until_sleeps(6)
        assert not pending.done()
        source.remove_pod(path, "p0")
        ticker.tick()
        [export] = await pending
        assert export.endpoints == ()
    finally:
        await it.aclose()


async def test_malformed_file_keeps_previous_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="fedgate.clusters.source")
    path = tmp_path / "exports.json"
    source.add_export(path, "shop", "payments", [ServicePort("http", 80)], created=5.0)
    ticker = Ticker()
    it = FileClusterSource(path, "east", TD, sleep=ticker.sleep).changes()
    try:
        first = await _next(it)
        assert len(first) == 1

        pending = asyncio.ensure_future(_next(it))
        path.write_text('[{"namespace": "shop", "name": "payments"}]')
        ticker.tick()
        ticker.tick()  # a second poll of the same bad content logs nothing new
        await ticker.until_sleeps(3)
        assert not pending.done()  # the previous value stands
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert "missing created, ports" in errors[0].getMessage()

        source.write_exports(path, [])
        ticker.tick()
        assert await pending == ()  # a valid change after the bad one goes through
    finally:
        await it.aclose()


async def test_malformed_at_start_yields_empty(tmp_path: Path) -> None:
    path = tmp_path / "exports.json"
    path.write_text("not json")
    it = FileClusterSource(path, "east", TD, sleep=Ticker().sleep).changes()
    try:
        assert await _next(it) == ()
    finally:
        await it.aclose()


def test_source_is_a_cluster_source(tmp_path: Path) -> None:
    src: ClusterSource = FileClusterSource(tmp_path / "e.json", "east", TD)  # checked by mypy
    assert src is not None


def test_source_rejects_bad_identity_parts(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match="trust domain"):
        FileClusterSource(tmp_path / "e.json", "east", "Not A Domain!")
    with pytest.raises(MeshError, match="cluster name"):
        FileClusterSource(tmp_path / "e.json", "East", TD)
