"""The pure core of `fedgate top` and the topology page's rates: parse, diff, aggregate."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedgate import rates
from fedgate.errors import MetricsParseError

HEAD = "# HELP fedgate_requests_total Requests.\n# TYPE fedgate_requests_total counter\n"


def line(src: str, dst: str, svc: str, code: str, reporter: str, value: float) -> str:
    return (
        f'fedgate_requests_total{{source_cluster="{src}",destination_cluster="{dst}",'
        f'destination_service="{svc}",response_code="{code}",reporter="{reporter}"}} {value}\n'
    )


def exposition(*lines: str) -> str:
    return HEAD + "".join(lines)


def test_rates_per_service_and_pair_take_the_busiest_reporter_not_the_sum() -> None:
    before = rates.parse(
        exposition(
            line("east", "west", "echo.demo", "200", "source", 100),
            line("east", "west", "echo.demo", "200", "destination", 100),
            line("east", "west", "echo.demo", "503", "source", 10),
            line("east", "east", "echo.demo", "200", "source", 50),
            line("west", "west", "solo.demo", "200", "source", 0),
        ),
        at=100.0,
    )
    after = rates.parse(
        exposition(
            line("east", "west", "echo.demo", "200", "source", 120),  # +20 in 2 s
            line("east", "west", "echo.demo", "200", "destination", 118),  # saw fewer
            line("east", "west", "echo.demo", "503", "source", 14),  # +4
            line("east", "east", "echo.demo", "200", "source", 70),  # +20
            line("west", "west", "solo.demo", "200", "source", 0),
        ),
        at=102.0,
    )
    table = rates.request_table(before, after)
    assert table.seconds == 2.0
    services = {r.key: r for r in table.services}
    # source reporter: (20 + 4 + 20) / 2 = 22/s; destination reporter saw 9/s
    assert services[("echo.demo",)].rps == pytest.approx(22.0)
    assert services[("echo.demo",)].errors == pytest.approx(2.0)
    assert services[("solo.demo",)].rps == 0.0
    pairs = {r.key: r for r in table.pairs}
    assert pairs[("east", "west")].rps == pytest.approx(12.0)
    assert pairs[("east", "west")].error_ratio == pytest.approx(2.0 / 12.0)
    assert pairs[("east", "east")].rps == pytest.approx(10.0)
    assert next(r.key for r in table.pairs) == ("east", "west")  # busiest first
    text = rates.render(table)
    assert "east -> west" in text
    assert "echo.demo" in text


def test_a_counter_reset_counts_from_zero_and_a_new_series_from_zero() -> None:
    before = rates.parse(exposition(line("a", "b", "s", "200", "source", 500)), at=0.0)
    after = rates.parse(
        exposition(
            line("a", "b", "s", "200", "source", 30),  # process restarted
            line("a", "c", "s", "200", "source", 10),  # new series
        ),
        at=10.0,
    )
    got = rates.by_labels(
        rates.counter_rates(before, after, rates.REQUESTS), ("destination_cluster",)
    )
    assert got == {("b",): 3.0, ("c",): 1.0}


def test_scrapes_out_of_order_are_refused() -> None:
    s = rates.parse(exposition(), at=5.0)
    with pytest.raises(ValueError, match="second must be later"):
        rates.counter_rates(s, s, rates.REQUESTS)


def test_merged_targets_keep_their_series_apart() -> None:
    same = exposition(line("a", "b", "s", "200", "source", 1))
    merged = rates.merge([rates.parse(same, 1.0, "pod-1"), rates.parse(same, 2.0, "pod-2")])
    assert merged.at == 2.0
    assert len(merged.named(rates.REQUESTS)) == 2


def test_no_request_series_says_so() -> None:
    empty = rates.parse("# nothing here\n", 0.0)
    table = rates.request_table(empty, rates.parse("", 1.0))
    assert table.series == 0
    assert "no fedgate_requests_total series" in rates.render(table)


@pytest.mark.parametrize("text", ["<html>hello</html>", "foo{ 3", 'x{a="1"} notanumber'])
def test_non_prometheus_text_is_a_clear_error(text: str) -> None:
    with pytest.raises(MetricsParseError, match="not Prometheus text"):
        rates.parse(text, 0.0)


@given(st.text(max_size=200))
def test_the_parser_never_fails_other_than_with_a_parse_error(text: str) -> None:
    with contextlib.suppress(MetricsParseError):
        rates.parse(text, 0.0)


@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 10**6)), min_size=1, max_size=20),
    st.floats(0.1, 100.0),
)
def test_rates_of_growing_counters_add_up(rows: list[tuple[str, int]], seconds: float) -> None:
    series = {name: value for name, value in rows}
    before = rates.parse(
        exposition(*(line("x", d, "s", "200", "source", 0) for d in series)), at=0.0
    )
    after = rates.parse(
        exposition(*(line("x", d, "s", "200", "source", v) for d, v in series.items())),
        at=seconds,
    )
    total = sum(rates.counter_rates(before, after, rates.REQUESTS).values())
    assert total == pytest.approx(sum(series.values()) / seconds)
