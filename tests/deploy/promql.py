"""The metric names a PromQL expression reads, and the names a Prometheus scrape exposes.

A deliberately small extractor, not a PromQL parser: it drops what cannot be a metric name
(string literals, `{...}` label matchers, `[...]` ranges and subqueries, `offset`
durations, the label lists of
`by`/`without`/`on`/`ignoring`/`group_left`/`group_right`, Grafana `$variables`, numbers and
durations), then takes every identifier that is neither a function call (followed by `(`)
nor a keyword. Its test feeds it the shapes the dashboards use. What it does not do: the
`{__name__="..."}` form (the dashboards never use it; `extract` refuses it rather than miss a
name).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?(?:\d+[a-z]+)+")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "atan2"}
)

# The samples a family of each type exposes (the text format's suffixes).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}


def extract(expr: str) -> set[str]:
    """The metric names `expr` selects."""
    if "__name__" in expr:
        raise ValueError(f"{expr!r} selects by __name__, which this extractor does not read")
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL expression of a Grafana dashboard: panel targets (nested rows included)
    and query variables."""

    def panels(items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield str(target["expr"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        # label_values(metric, label): the metric is the first argument.
        m = re.fullmatch(r"\s*label_values\(\s*([^,]+),\s*\w+\s*\)\s*", query)
        yield m.group(1) if m else query


def exposed(scrape: str) -> tuple[set[str], set[str]]:
    """(sample names with at least one sample, every sample name a family declares): a
    counter or histogram with no labelled child yet is declared (HELP/TYPE) but has no
    sample."""
    sampled: set[str] = set()
    declared: set[str] = set()
    for family in text_string_to_metric_families(scrape):
        sampled.update(s.name for s in family.samples)
        declared.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return sampled, declared | sampled
