"""``--plot FILE.png``: the latency and TTFT distributions and a timeline of the run.

matplotlib is imported here only, and only when a plot is asked for, so the load test runs
without it (``pip install 'ollama-gateway[plot]'`` adds it).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loadtest.report import OUTCOMES, Sample, Summary

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MISSING = "--plot needs matplotlib: pip install 'ollama-gateway[plot]' (or: pip install matplotlib)"
_COLOURS = {
    "success": "tab:green",
    "error": "tab:red",
    "429": "tab:orange",
    "503": "tab:purple",
    "other": "tab:gray",
}


def is_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plot(samples: Sequence[Sample], summary: Summary, path: Path, title: str) -> None:
    """Draw four panels into ``path`` (PNG): latency, TTFT, the timeline, requests in flight."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: write a file
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), layout="constrained")
    fig.suptitle(title, fontsize=10)
    (latency_ax, ttft_ax), (timeline_ax, flight_ax) = axes

    ok = [s for s in samples if s.outcome == "success"]
    _histogram(latency_ax, [s.latency_s for s in ok], "latency of successful requests (s)")
    _mark_percentiles(latency_ax, summary.latency_s.p50, summary.latency_s.p95)
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    _histogram(ttft_ax, ttfts, "time to first token (s)")
    _mark_percentiles(ttft_ax, summary.ttft_s.p50, summary.ttft_s.p95)

    for outcome in OUTCOMES:
        group = [s for s in samples if s.outcome == outcome]
        if not group:
            continue
        timeline_ax.hlines(
            [s.index for s in group],
            [s.start_s for s in group],
            [s.end_s for s in group],
            colors=_COLOURS[outcome],
            linewidth=1.2,
            label=f"{outcome} ({len(group)})",
        )
    first = [(s.start_s + s.ttft_s, s.index) for s in samples if s.ttft_s is not None]
    if first:
        xs, ys = zip(*first, strict=True)
        timeline_ax.scatter(xs, ys, s=4, color="black", zorder=3, label="first token")
    timeline_ax.set(
        title="timeline: each request from start to end",
        xlabel="time into the run (s)",
        ylabel="request",
    )
    timeline_ax.legend(loc="upper left", fontsize=8)

    times, counts = in_flight(samples)
    flight_ax.step(times, counts, where="post", color="tab:blue")
    flight_ax.set(title="requests in flight", xlabel="time into the run (s)", ylabel="requests")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def in_flight(samples: Sequence[Sample]) -> tuple[list[float], list[int]]:
    """The number of requests open at each start or end, as a step function."""
    events = sorted([(s.start_s, 1) for s in samples] + [(s.end_s, -1) for s in samples])
    times, counts, open_now = [0.0], [0], 0
    for at, change in events:
        open_now += change
        times.append(at)
        counts.append(open_now)
    return times, counts


def _histogram(ax: Axes, values: Sequence[float], label: str) -> None:
    ax.set(title=label, xlabel="seconds", ylabel="requests")
    if values:
        ax.hist(values, bins=min(40, max(5, len(values) // 3)), color="tab:blue", alpha=0.8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _mark_percentiles(ax: Axes, p50: float | None, p95: float | None) -> None:
    for value, name, style in ((p50, "p50", "--"), (p95, "p95", ":")):
        if value is not None:
            ax.axvline(value, color="black", linestyle=style, label=f"{name} {value:.3f} s")
    if p50 is not None:
        ax.legend(fontsize=8)
