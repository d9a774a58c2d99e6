"""`fedgate top --once` against real HTTP /metrics endpoints whose counters move."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from fedgate.cli_top import top

SERIES = (
    'fedgate_requests_total{{source_cluster="east",destination_cluster="west",'
    'destination_service="echo.demo.svc.clusterset.local",response_code="{code}",'
    'reporter="source"}} {value}\n'
)


class Counting:
    """A proxy's /metrics whose request counter grows by `step` at every scrape."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.scrapes = 0

    def body(self) -> bytes:
        self.scrapes += 1
        total = self.step * self.scrapes
        return (
            "# TYPE fedgate_requests_total counter\n"
            + SERIES.format(code="200", value=total)
            + SERIES.format(code="503", value=self.scrapes)
        ).encode()


@pytest.fixture
def proxy() -> Iterator[tuple[str, Counting]]:
    counting = Counting(step=100)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = counting.body() if self.path == "/metrics" else b"<html>no</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counting
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_top_once_prints_rates_from_two_scrapes(proxy: tuple[str, Counting]) -> None:
    url, counting = proxy
    result = CliRunner().invoke(
        top, ["--target", f"p1={url}/metrics", "--once", "--json", "--interval", "0.5"]
    )
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    assert counting.scrapes == 2
    (service,) = table["services"]
    assert service["service"] == "echo.demo.svc.clusterset.local"
    # +101 requests (100 ok, 1 failed) over the ~0.5 s window
    assert service["rps"] == pytest.approx(101 / table["seconds"])
    assert service["errors_per_second"] == pytest.approx(1 / table["seconds"])
    (pair,) = table["pairs"]
    assert (pair["source_cluster"], pair["destination_cluster"]) == ("east", "west")
    assert table["unreachable"] == []


def test_top_table_and_unreachable_targets_named(proxy: tuple[str, Counting]) -> None:
    url, _ = proxy
    result = CliRunner().invoke(
        top,
        [
            "--target", f"p1={url}/metrics",
            "--target", "gone=http://127.0.0.1:9/metrics",
            "--target", f"html={url}/other",
            "--once", "--interval", "0.2",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "echo.demo.svc.clusterset.local" in result.output
    assert "east -> west" in result.output
    assert "gone (http://127.0.0.1:9/metrics)" in result.output
    assert "not Prometheus text" in result.output


def test_top_refuses_a_malformed_target_and_fails_when_nothing_answers() -> None:
    bad = CliRunner().invoke(top, ["--target", "no-url", "--once"])
    assert bad.exit_code != 0
    assert "expected NAME=http://host:port/metrics" in bad.output
    dead = CliRunner().invoke(top, ["--target", "x=http://127.0.0.1:9/metrics", "--once"])
    assert dead.exit_code != 0
    assert "no target answered" in dead.output
