"""The metrics half of the client (a ``Client`` mixin): the daemon's Prometheus text.

    with Client() as c:
        print(c.metrics())      # text exposition format 0.0.4, as a scraper reads it

``MetricsMixin`` uses only the client's ``_call``.
"""
from __future__ import annotations

__all__ = ["MetricsMixin"]


class MetricsMixin:
    def metrics(self) -> str:
        """The daemon's metrics in the Prometheus text format (``metrics`` message)."""
        return self._call("metrics")["text"]
