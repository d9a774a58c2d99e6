"""Request rates from two scrapes of Prometheus text, pure (no I/O, no clock).

`fedgate top` and the topology page both scrape `/metrics` twice and diff counters:

    parse(text, at)                      -> Scrape (samples by (name, labels))
    merge([scrape, ...])                 -> one Scrape of several processes (labels + target)
    counter_rates(before, after, name)   -> per label set, per second (a reset counts from 0)
    by_labels(rates, keys)               -> summed over every other label
    request_table(before, after)         -> per service and per cluster pair

A request is counted by each proxy it crosses (`reporter` = source sidecar, destination
sidecar, gateway...), so summing every reporter would count one call two or three times. Per
group, the rate is the largest of the per-reporter sums: the reporter that saw the most of
that group's calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from fedgate.errors import MetricsParseError

REQUESTS = "fedgate_requests_total"
Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs
Key = tuple[str, Labels]


@dataclass(frozen=True, slots=True)
class Scrape:
    at: float  # seconds (any monotonic clock; only differences are used)
    samples: Mapping[Key, float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def named(self, name: str) -> dict[Labels, float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def parse(text: str, at: float, target: str = "") -> Scrape:
    """Every sample of an exposition; `target` (if given) is added as a label so that merged
    scrapes of several processes keep their series apart."""
    samples: dict[Key, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = dict(s.labels)
                if target:
                    labels["target"] = target
                samples[(s.name, tuple(sorted(labels.items())))] = float(s.value)
    except (ValueError, TypeError, IndexError) as e:
        first = text.strip().splitlines()[0][:80] if text.strip() else "(empty)"
        raise MetricsParseError(f"not Prometheus text ({e}); it starts with {first!r}") from e
    return Scrape(at, samples)


def merge(scrapes: Iterable[Scrape]) -> Scrape:
    """One scrape of several targets (parsed with distinct `target`s), at their latest time."""
    samples: dict[Key, float] = {}
    at = 0.0
    for s in scrapes:
        samples.update(s.samples)
        at = max(at, s.at)
    return Scrape(at, samples)


def counter_rates(before: Scrape, after: Scrape, name: str) -> dict[Labels, float]:
    """Per-second increase of counter `name` per label set between two scrapes. A series that
    is new, or went down (the process restarted), counts from zero, as Prometheus' rate()
    does with resets."""
    seconds = after.at - before.at
    if seconds <= 0:
        raise ValueError(f"scrapes are {seconds:.3f} s apart; the second must be later")
    out: dict[Labels, float] = {}
    for labels, value in after.named(name).items():
        old = before.samples.get((name, labels), 0.0)
        out[labels] = (value - old if value >= old else value) / seconds
    return out


def by_labels(rates: Mapping[Labels, float], keys: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """Sum `rates` grouped by the values of `keys` (a missing label groups as "")."""
    out: dict[tuple[str, ...], float] = {}
    for labels, rate in rates.items():
        d = dict(labels)
        group = tuple(d.get(k, "") for k in keys)
        out[group] = out.get(group, 0.0) + rate
    return out


def by_reporter(
    rates: Mapping[Labels, float], keys: tuple[str, ...]
) -> dict[tuple[str, ...], float]:
    """Per group of `keys`, the largest per-reporter sum (see the module docstring)."""
    per = by_labels(rates, (*keys, "reporter"))
    out: dict[tuple[str, ...], float] = {}
    for group, rate in per.items():
        g = group[:-1]
        out[g] = max(out.get(g, 0.0), rate)
    return out


@dataclass(frozen=True, slots=True)
class Row:
    key: tuple[str, ...]
    rps: float  # requests per second
    errors: float  # of which 5xx, per second

    @property
    def error_ratio(self) -> float:
        return self.errors / self.rps if self.rps else 0.0


@dataclass(frozen=True, slots=True)
class RequestTable:
    seconds: float
    services: tuple[Row, ...]  # key: (destination_service,)
    pairs: tuple[Row, ...]  # key: (source_cluster, destination_cluster)
    series: int  # request series seen (0: no process exports fedgate_requests_total yet)


def _rows(
    rates: Mapping[Labels, float], errors: Mapping[Labels, float], keys: tuple[str, ...]
) -> tuple[Row, ...]:
    total = by_reporter(rates, keys)
    failed = by_reporter(errors, keys)
    rows = [Row(k, v, min(v, failed.get(k, 0.0))) for k, v in total.items()]
    return tuple(sorted(rows, key=lambda r: (-r.rps, r.key)))


def request_table(before: Scrape, after: Scrape) -> RequestTable:
    rates = counter_rates(before, after, REQUESTS)
    errors = {k: v for k, v in rates.items() if dict(k).get("response_code", "").startswith("5")}
    return RequestTable(
        seconds=after.at - before.at,
        services=_rows(rates, errors, ("destination_service",)),
        pairs=_rows(rates, errors, ("source_cluster", "destination_cluster")),
        series=len(rates),
    )


def render(table: RequestTable, title: str = "") -> str:
    out = [title] if title else []
    out.append(f"request rates over {table.seconds:.1f} s")
    if table.series == 0:
        out.append(f"  (no {REQUESTS} series in the scraped metrics yet)")
        return "\n".join(out)
    out.append("")
    out.append(f"{'SERVICE':<44}{'RPS':>10}{'5XX/S':>10}{'ERR%':>8}")
    for r in table.services:
        out.append(f"{r.key[0] or '-':<44}{r.rps:>10.1f}{r.errors:>10.1f}{r.error_ratio:>8.1%}")
    out.append("")
    out.append(f"{'SOURCE -> DESTINATION':<44}{'RPS':>10}{'5XX/S':>10}{'ERR%':>8}")
    for r in table.pairs:
        pair = f"{r.key[0] or '-'} -> {r.key[1] or '-'}"
        out.append(f"{pair:<44}{r.rps:>10.1f}{r.errors:>10.1f}{r.error_ratio:>8.1%}")
    return "\n".join(out)
