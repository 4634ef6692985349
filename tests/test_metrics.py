"""The metrics' fast per-request path renders exactly what aioprometheus's own API would."""

from __future__ import annotations

import re
from pathlib import Path

from aioprometheus.renderer import render

from proxy.metrics import HistogramSeries, Metrics


def test_fast_path_renders_what_the_public_api_renders() -> None:
    """Counters, histograms and gauges updated in place give the same exposition."""
    slow, fast = Metrics(), Metrics()
    series = {"endpoint": "/api/chat", "model": "llama3.2:latest"}
    request = {"method": "POST", **series, "status": "success"}
    for value in (0.0, 0.005, 0.3, 0.3, 2.0, 1920.0, 5000.0):
        slow.duration.observe(series, value)
        fast.observe(fast.duration, series, value)
        slow.requests.inc(request)
        fast.count(fast.requests, request)
        slow.prompt_tokens.add({"model": "m"}, 7)
        fast.count(fast.prompt_tokens, {"model": "m"}, 7)
    slow.errors.inc({"error_type": "ConnectError"})
    fast.count(fast.errors, {"error_type": "ConnectError"})
    slow.active.set({}, 3)
    fast.set(fast.active, {}, 3)
    slow.retries.inc({})
    fast.count(fast.retries, {})
    assert render(fast.registry, [])[0] == render(slow.registry, [])[0]


def test_histogram_series_counts_values_on_bucket_bounds_in_that_bucket() -> None:
    """A value equal to an upper bound counts in that bucket (le), cumulatively."""
    series = HistogramSeries((0.1, 1.0))
    for value in (0.1, 0.5, 1.0, 2.0):
        series.observe(value)
    assert series.buckets == {0.1: 1, 1.0: 3, float("inf"): 4}
    assert (series.observations, series.sum) == (4, 3.6)


def test_the_aioprometheus_internals_the_fast_path_writes_are_still_there() -> None:
    """``Metrics`` writes series in place through aioprometheus's ``MetricDict``: its
    ``store`` and ``__keytransform__``. A release that changes them must fail here, by name,
    before it miscounts in production (pyproject.toml bounds the version for that reason)."""
    metrics = Metrics()
    values = metrics.requests.values
    labels = {"method": "POST", "endpoint": "/api/chat", "model": "m", "status": "success"}
    for name in ("store", "__keytransform__"):
        assert hasattr(values, name), f"aioprometheus's MetricDict has no {name} any more"
    metrics.count(metrics.requests, labels, 2)
    key = values.__keytransform__(labels)
    assert values.store[key] == 2, "__keytransform__ no longer gives the key the store uses"
    assert metrics.requests.get(labels) == 2, "the public API reads another value"
    metrics.observe(metrics.duration, {"endpoint": "/api/chat", "model": "m"}, 0.3)
    series = metrics.duration.get_value({"endpoint": "/api/chat", "model": "m"})
    assert isinstance(series, HistogramSeries), "histograms no longer keep the series given"


def test_the_readme_documents_every_metric_and_only_those() -> None:
    """The README's metrics table names each metric the gateway defines, and no other."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = set(re.findall(r"`(ollama_\w+)", "\n".join(rows)))
    assert documented == set(Metrics().registry.collectors)
