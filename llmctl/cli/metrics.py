"""``llmctl metrics``: the daemon's Prometheus metrics, as text a scraper reads."""
from __future__ import annotations

import click

from .common import client


@click.command("metrics")
@click.pass_context
def metrics(ctx):
    """Print the daemon's metrics (Prometheus text format).

    Requests by type and result, tokens, time-to-first-token and per-token latency
    histograms, queue depths, device memory, instances, jobs' steps and losses.  The daemon
    also serves them on http://127.0.0.1:PORT/metrics when its config sets metrics_port.
    """
    text = client(ctx).metrics()
    click.echo(text, nl=not text.endswith("\n"))


COMMANDS = [metrics]
