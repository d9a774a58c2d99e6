"""Errors of the `fedgate` application layer (operator tools: top, the topology page)."""

from __future__ import annotations


class FedgateError(Exception):
    """Base of the application layer's errors."""


class MetricsParseError(FedgateError, ValueError):
    """A /metrics body that is not Prometheus text exposition."""


class ScrapeError(FedgateError):
    """A /metrics endpoint that could not be read (names the target and why)."""
